"""Training and evaluation batches, whatever produces them.

A :class:`TrainLoader` yields :class:`Batch` es of two views already on the device. The
per-image PIL pipeline (``--loader pil``, the original recipe) lives here; the same interface
is the seam for faster pipelines. Randomness depends only on (seed, epoch, position), so a
run resumes mid-epoch exactly and the global order does not depend on the process count.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.utils.data import DataLoader

from moco.augment import TwoViews, eval_transform, pretrain_transform
from moco.config import MocoConfig
from moco.data import (
    EpochBatchSampler,
    EvalDataset,
    ImageSource,
    TwoViewDataset,
    ignore_stop_signals,
)


@dataclass
class Batch:
    """Two views [B,3,S,S] on the device and the dataset indices [B] of their images."""

    im_q: torch.Tensor
    im_k: torch.Tensor
    index: torch.Tensor


class TrainLoader(Protocol):
    def steps(self) -> int:
        """Full batches per epoch (the last partial batch is dropped, as the original)."""
        ...

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The epoch's batches from ``start_step`` on."""
        ...


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class _IndexedTwoViews(TwoViewDataset):
    """(q, k, index loaded, index replaced or -1): with ``--on-bad-image skip`` an unreadable
    image is replaced by the next readable one (``moco.data.load_checked``)."""

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:  # type: ignore[override]
        q, k, loaded = self.views(item)
        return q, k, loaded, (item[0] if loaded != item[0] else -1)


class PILTrainLoader:
    """The original recipe: PIL decode + torchvision transforms in DataLoader workers."""

    def __init__(self, cfg: MocoConfig, source: ImageSource, device: torch.device, workers: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.cfg, self.source, self.device, self.workers = cfg, source, device, workers
        self.rank, self.world_size = rank, world_size
        self.dataset = _IndexedTwoViews(source, TwoViews(pretrain_transform(
            cfg.aug, cfg.image_size, cfg.crop_min_scale, cfg.mean, cfg.std)), cfg.on_bad_image)
        self.bad_images: set[int] = set()  # indices replaced under --on-bad-image skip

    def _sampler(self, epoch: int, start_step: int) -> EpochBatchSampler:
        return EpochBatchSampler(len(self.source), self.cfg.batch_size, self.cfg.seed, epoch,
                                 start_step, self.rank, self.world_size)

    def steps(self) -> int:
        return self._sampler(0, 0).steps()

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        loader = DataLoader(self.dataset, batch_sampler=self._sampler(epoch, start_step),
                            num_workers=self.workers, pin_memory=self.device.type == "cuda",
                            prefetch_factor=4 if self.workers else None,
                            worker_init_fn=ignore_stop_signals if self.workers else None)
        cl = self.cfg.channels_last_on(self.device.type)
        for q, k, idx, bad in loader:
            self.bad_images.update(int(i) for i in bad if i >= 0)
            yield Batch(_to_device(q, self.device, cl), _to_device(k, self.device, cl), idx)


def make_train_loader(cfg: MocoConfig, source: ImageSource, device: torch.device, workers: int,
                      rank: int = 0, world_size: int = 1) -> TrainLoader:
    """The training pipeline ``cfg.loader`` asks for: ``pil``, the original per-image recipe
    above; ``auto`` / ``tensor``, the batched pipeline of :mod:`moco.tensor_loader` (decoded
    cache when it fits in memory, else decoding in workers; augmentation on ``device``)."""
    if cfg.loader == "pil":
        return PILTrainLoader(cfg, source, device, workers, rank, world_size)
    from moco.tensor_loader import make_tensor_loader

    return make_tensor_loader(cfg, source, device, workers, rank, world_size)


def eval_batches(cfg: MocoConfig, source: ImageSource, device: torch.device, workers: int,
                 batch_size: int = 256) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Un-augmented images of ``source`` (resize + center crop) and their labels, in order.

    Except with ``--loader pil``, from the decoded cache (:mod:`moco.cache`) when it fits,
    resized and cropped by tensor ops on ``device``."""
    if cfg.loader != "pil":
        from moco.tensor_loader import decoded_or_none, eval_batches_decoded

        decoded = decoded_or_none(cfg, source, workers)
        if decoded is not None:
            yield from eval_batches_decoded(cfg, decoded, device, batch_size)
            return
    tf = eval_transform(cfg.image_size, cfg.mean, cfg.std)
    loader = DataLoader(EvalDataset(source, tf, cfg.on_bad_image), batch_size=batch_size,
                        shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_stop_signals if workers else None)
    for x, y in loader:
        yield _to_device(x, device, cfg.channels_last_on(device.type)), y
