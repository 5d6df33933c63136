"""One process's part of ``moco lincls``: the frozen backbone's features, the SGD steps of
``fc`` (data-parallel under torchrun) and the evaluation.

The frozen backbone runs in eval mode without gradients, under bf16 autocast when ``dtype`` is
set, channels_last on CUDA (as pretraining's ``--channels-last auto``); its features enter
``fc`` in float32. A step reads nothing back from the device: its loss and correct count are
summed there and read once per epoch (or when a signal stops it). Only ``fc`` is wrapped in DistributedDataParallel:
each process's loss is its summed cross-entropy x ``world_size / m`` (m: the global batch,
:func:`moco.eval.lincls_data.loss_scale`), so DDP's averaged gradient is the single-process mean
over the global batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T
from tqdm import tqdm

from moco.core.backbones import get_head, set_head
from moco.core.device import to_device
from moco.data.augment import eval_transform
from moco.data.datasets import epoch_order
from moco.data.source import ImageSource
from moco.eval import lincls_data as batches
from moco.eval import lincls_protocol as protocol
from moco.eval.features import extract_features
from moco.utils.distributed import DistContext, wrap_ddp
from moco.utils.signals import StopFlag


@dataclass
class LinearEngine:
    """Steps and evaluation of the frozen ``model`` (its ``fc`` trained by ``optimizer``)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    dist: DistContext
    device: torch.device
    dtype: torch.dtype | None
    feature_dim: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int
    seed: int
    workers: int
    progress: bool
    train_source: ImageSource
    val_source: ImageSource
    channels_last: bool | None = None  # None: on CUDA only
    fc_ddp: nn.Module = field(init=False)

    def __post_init__(self) -> None:
        # Only fc learns: it alone is data-parallel (the frozen backbone needs no gradients).
        self.fc_ddp = wrap_ddp(self.fc, self.dist, self.device)
        if self.channels_last is None:
            self.channels_last = self.device.type == "cuda"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    @property
    def fc(self) -> nn.Module:
        """The linear classifier in the network's head slot (``fc`` of a ResNet, ``head`` of a
        ViT: :func:`moco.core.backbones.get_head`): features [B, D] -> logits [B, classes]."""
        return get_head(self.model)

    def eval_tf(self) -> T.Compose:
        return eval_transform(self.image_size, self.mean, self.std)

    def owned(self, source: ImageSource) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return batches.owned_batches(source, self.eval_tf(), self.dist.rank, self.dist.world_size,
                                     self.batch_size, self.workers, self.device.type == "cuda")

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features [b, D] (float32) of the frozen backbone (a ViT's [CLS] token after
        the final norm), no gradient: the network with its head slot the identity."""
        if x.shape[0] == 0:  # this process's part of a last batch smaller than the processes
            return torch.zeros(0, self.feature_dim, device=self.device)
        fc = self.fc
        set_head(self.model, nn.Identity())
        try:
            x = to_device(x, self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                                                 enabled=self.dtype is not None):
                return self.model(x).float()
        finally:
            set_head(self.model, fc)

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.dist.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.dist.comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def step(self, feats: torch.Tensor, y: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step on this process's part of a global batch of ``m`` images: its summed
        cross-entropy and number of correct top-1 predictions, 0-d tensors on the device
        (reading them would wait for the GPU)."""
        logits = self.fc_ddp(feats)
        ce = F.cross_entropy(logits, y, reduction="sum")
        loss = ce * batches.loss_scale(m, self.dist.world_size)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return ce.detach(), (logits.detach().argmax(dim=1) == y).sum()

    def train_epoch(self, epoch: int, start: int, partial: list[float], stop: StopFlag,
                    feats: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[list[float], int]:
        """Sums (loss, correct, images) over the epoch's steps from ``start`` on (``partial``:
        the sums of the steps before), and the steps done (fewer when a signal stopped it)."""
        protocol.set_frozen_mode(self.model)
        n, b = len(self.train_source), self.batch_size
        sampler = batches.StepBatches(n, b, self.seed, epoch, start, self.dist.rank,
                                      self.dist.world_size)
        sums = list(partial) if start else [0.0, 0.0, 0.0]
        if feats is None:
            it: Iterable[tuple[torch.Tensor, torch.Tensor]] = batches.train_batches(
                self.train_source, protocol.train_transform(self.image_size, self.mean, self.std),
                sampler, self.image_size, self.workers, self.device.type == "cuda")
        else:
            it = self.feature_batches(epoch, start, *feats)
        step = start
        # (loss, correct) summed on the device in float64 (in the order a Python sum would),
        # the images counted here
        on_device = torch.tensor(sums[:2], dtype=torch.float64, device=self.device)
        images = sums[2]
        with tqdm(total=n, initial=min(n, start * b), desc=f"train {epoch + 1}", unit="img",
                  leave=False, disable=not self.progress, dynamic_ncols=True) as bar:
            for (x, y), m in zip(it, sampler.global_sizes(), strict=True):
                f = to_device(x, self.device) if feats is not None else self.backbone(x)
                ls, c = self.step(f, to_device(y, self.device), m)
                on_device += torch.stack([ls.to(torch.float64), c.to(torch.float64)])
                images += len(y)
                step += 1
                bar.update(m)
                agreed = self.dist.agree_signal(stop.signal)
                if agreed is not None:  # every process stops after the same step
                    stop.signal = agreed
                    break
        loss, correct = on_device.tolist()  # the epoch's one wait for the device
        return [loss, correct, images], step

    def feature_batches(self, epoch: int, start: int, feats: torch.Tensor, labels: torch.Tensor
                         ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """This process's cached features of each step: the owned members of the batch."""
        order, _ = epoch_order(len(self.train_source), self.seed, epoch)
        r, w, b = self.dist.rank, self.dist.world_size, self.batch_size
        for step in range(start, batches.num_steps(len(order), b)):
            idx = order[step * b:(step + 1) * b]
            rows = idx[batches.owned_part(idx, r, w)] // w
            yield feats[rows], labels[rows]

    @torch.no_grad()
    def validate(self, feats: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[float, float]:
        """Top-1 and top-5 accuracy (%) on the val split (on cached features when given), each
        process on the images it owns, the counts summed over processes."""
        protocol.set_frozen_mode(self.model)
        counts = torch.zeros(2, dtype=torch.int64, device=self.device)  # top-1, top-5 hits
        if feats is not None:
            x_all, y_all = feats
            for start in range(0, len(y_all), 4096):
                logits = self.fc(to_device(x_all[start:start + 4096], self.device))
                counts += _hits(logits, to_device(y_all[start:start + 4096], self.device))
        else:
            with tqdm(total=len(self.val_source), desc="val", unit="img", leave=False,
                      disable=not self.progress, dynamic_ncols=True) as bar:
                for x, y in self.owned(self.val_source):
                    counts += _hits(self.fc(self.backbone(x)), to_device(y, self.device))
                    bar.update(len(y) * self.dist.world_size)
        c1, c5 = counts.tolist()  # one wait for the device
        t1, t5 = self.all_sum([float(c1), float(c5)])
        n = len(self.val_source)
        return 100.0 * t1 / n, 100.0 * t5 / n

    def features(self, source: ImageSource, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen pooled features [n_own, D] and labels of the images this process owns."""
        n_own = len(batches.owned(len(source), self.dist.rank, self.dist.world_size))
        protocol.set_frozen_mode(self.model)
        with tqdm(total=n_own, desc=desc, unit="img", leave=False, disable=not self.progress,
                  dynamic_ncols=True) as bar:
            return extract_features(_Features(self), self.owned(source), self.device, n=n_own,
                                    normalize=False, progress=bar)


def _hits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Top-1 and top-5 hits of logits [B, C] against target [B] as an int64 [2] tensor on
    their device (:func:`moco.eval.lincls_protocol.accuracy` without reading them back)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices == target[:, None]
    return torch.stack([top[:, 0].sum(), top.any(dim=1).sum()])


class _Features(nn.Module):
    """The engine's frozen backbone as a module for :func:`extract_features`: images ->
    features."""

    def __init__(self, engine: LinearEngine) -> None:
        super().__init__()
        self.engine = [engine]  # a list: not registered as a sub-module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine[0].backbone(x)
