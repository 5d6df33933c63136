"""Shuffling BN (MoCo v1 §3.3): SplitBatchNorm and every key-batch shuffle, on one device and
across processes.

A query and its positive key must be normalised with statistics of different samples, or the
model "cheats" through BN. On one device the official CIFAR demo splits every BN into S
sub-batches (strided: sample i goes to split i mod S) and encodes the keys in a random order
(:class:`LocalShuffle`). Across processes the original gathers the key images of every rank,
shuffles them and unshuffles the keys (:class:`DDPShuffle`). All of them are a
:class:`KeyShuffle`; :func:`make_key_shuffle` picks the one of a ``--shuffle-bn`` mode.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moco.core.collectives import concat_all_gather
from moco.core.device import to_device
from moco.core.errors import ConfigError

_DIMS = (0, 3, 4)  # of [B/S, S, C, H, W]: what one split's statistics reduce over


class _SplitBNChannelsLast(torch.autograd.Function):
    """Training-mode SplitBatchNorm of a channels_last input, without changing its layout.

    The NCHW path folds the S splits into the channels (``view(B/S, C·S, H, W)``), which a
    channels_last tensor cannot do without two copies into NCHW and back. Here the input is
    viewed as [B/S, S, C, H, W] (split s = samples s, s+S, ...: a view in either layout) and
    normalised with the per-(split, channel) statistics, y = a·x + b with a = w·rstd,
    b = bias - mean·a; the output has the input's layout. Statistics and coefficients are
    float32 (bf16/fp16 inputs are read as they are and accumulated in float32).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, splits: int,
                weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        x5 = x.view(n // splits, splits, c, h, w)
        m = (n // splits) * h * w
        with torch.autocast(x.device.type, enabled=False):
            if x.dtype in (torch.float32, torch.float64):
                var, mean = torch.var_mean(x5, dim=_DIMS, correction=0)
            else:  # E[x^2] - E[x]^2 in float32, without a float32 copy of x
                mean = x5.mean(dim=_DIMS, dtype=torch.float32)
                sq = torch.linalg.vector_norm(x5, 2, dim=_DIMS, dtype=torch.float32).square()
                var = (sq / m - mean.square()).clamp_(min=0.0)
            rstd = torch.rsqrt(var + eps)  # [S, C]
            a = weight.to(rstd.dtype) * rstd
            b = bias.to(rstd.dtype) - mean * a
            out = torch.empty_like(x)  # the input's memory format
            out5 = out.view(x5.shape)
            if torch.compiler.is_compiling():
                out5.copy_(torch.addcmul(b[:, :, None, None], x5, a[:, :, None, None]))
            else:  # float32 arithmetic, written in x's dtype
                torch.addcmul(b[:, :, None, None], x5, a[:, :, None, None], out=out5)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, var)
        ctx.splits = splits
        return out, mean, var

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, *_: torch.Tensor
                 ) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        splits = ctx.splits
        m = (n // splits) * h * w
        x5 = x.view(n // splits, splits, c, h, w)
        g5 = g.reshape(x5.shape)
        sum_g = g5.sum(dim=_DIMS, dtype=torch.float32)
        sum_gx = (g5 * x5).sum(dim=_DIMS, dtype=torch.float32)
        sum_gxhat = rstd * (sum_gx - mean * sum_g)  # Σ g·x̂ per (split, channel)
        # dx = (w·rstd/m)(m·g - Σg - x̂·Σ(g·x̂)) = A·g + B·x + C
        coef_a = weight.to(rstd.dtype) * rstd
        coef_b = -coef_a * rstd * sum_gxhat / m
        coef_c = -coef_a * sum_g / m - coef_b * mean
        dx = torch.empty_like(x)
        part = torch.addcmul(coef_c[:, :, None, None], x5, coef_b[:, :, None, None])
        torch.addcmul(part, g5, coef_a[:, :, None, None], out=dx.view(x5.shape))
        grad_w = sum_gxhat.sum(dim=0).to(weight.dtype)
        grad_b = sum_g.sum(dim=0).to(weight.dtype)
        return dx, None, grad_w, grad_b, None


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises S interleaved sub-batches separately.

    Input [B, C, H, W] with B divisible by S. Split s holds samples s, s+S, s+2S, ...
    Running statistics become the average over the S per-split updates (the CIFAR-10 notebook's
    SplitBatchNorm).
    In eval mode it is plain BN with the running statistics. A channels_last input stays
    channels_last (:class:`_SplitBNChannelsLast`), an NCHW one folds the splits into channels.
    """

    def __init__(self, num_features: int, num_splits: int, **kw: object) -> None:
        super().__init__(num_features, **kw)  # type: ignore[arg-type]
        if num_splits < 1:
            raise ConfigError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        s = self.num_splits
        if not self.training or s == 1:
            return super().forward(input)
        n, c, h, w = input.shape
        if n % s:
            raise ConfigError(
                f"SplitBatchNorm: batch {n} is not divisible by --bn-splits {s}; "
                "choose a batch size that is a multiple of the number of splits"
            )
        if (n // s) * h * w <= 1:
            raise ConfigError(
                f"SplitBatchNorm: each of the {s} splits holds {n // s} image(s) of {h}x{w} at "
                "this layer, 1 value per channel, which BatchNorm cannot normalise; use fewer "
                "splits (bn_splits / --bn-splits), a larger batch or larger images")
        assert self.running_mean is not None and self.running_var is not None
        momentum = self.momentum if self.momentum is not None else 0.1
        if not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last):
            out: torch.Tensor
            out, mean, var = _SplitBNChannelsLast.apply(input, s, self.weight, self.bias, self.eps)
            m = (n // s) * h * w
            with torch.no_grad():  # the S per-split updates, averaged (var: unbiased)
                self.running_mean.lerp_(mean.mean(dim=0).to(self.running_mean.dtype), momentum)
                unbiased = var * (m / max(m - 1, 1))
                self.running_var.lerp_(unbiased.mean(dim=0).to(self.running_var.dtype), momentum)
            return out
        running_mean = self.running_mean.repeat(s)
        running_var = self.running_var.repeat(s)
        # [B, C, H, W] -> [B/S, C·S, H, W]: channel c·S... of row j is sample j·S + s.
        out = F.batch_norm(
            input.contiguous().view(-1, c * s, h, w),
            running_mean,
            running_var,
            self.weight.repeat(s),
            self.bias.repeat(s),
            True,
            momentum,
            self.eps,
        ).view(n, c, h, w)
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(s, c).mean(dim=0))
            self.running_var.copy_(running_var.view(s, c).mean(dim=0))
        return out


class SplitBatchNormAct(SplitBatchNorm):
    """:class:`SplitBatchNorm` followed by the sub-modules of the BN it replaces, in order and
    under the same names: timm's ``BatchNormAct2d`` (a BatchNorm2d subclass that applies its
    ``drop`` then ``act`` children after normalising) keeps its activation and state-dict keys."""

    AFTER = ("drop", "act")

    def __init__(self, num_features: int, num_splits: int, after: dict[str, nn.Module],
                 **kw: object) -> None:
        super().__init__(num_features, num_splits, **kw)
        if tuple(after) != self.AFTER[-len(after):]:
            raise ConfigError(f"cannot convert a BatchNorm2d subclass with sub-modules "
                              f"{list(after)} to SplitBatchNorm (only {list(self.AFTER)})")
        for name, m in after.items():
            self.add_module(name, m)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = super().forward(input)
        for m in self.children():
            out = m(out)
        return out


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` by a :class:`SplitBatchNorm` (in place);
    one with sub-modules (timm's ``BatchNormAct2d``) by a :class:`SplitBatchNormAct`."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm):
            after = dict(child.named_children())
            kw = dict(eps=child.eps, momentum=child.momentum, affine=child.affine,
                      track_running_stats=child.track_running_stats)
            new = (SplitBatchNormAct(child.num_features, num_splits, after, **kw) if after
                   else SplitBatchNorm(child.num_features, num_splits, **kw)
                   ).to(device=child.weight.device, dtype=child.weight.dtype)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_split_bn(child, num_splits)
    return module


class KeyShuffle(Protocol):
    """How the key batch is reordered around the key encoder, and how keys are shared.

    ``shuffle(x)`` returns the images to encode here and a handle to undo it;
    ``unshuffle(k, handle)`` returns this process's keys [B, C] in the original order;
    ``gather(k)`` returns the keys of every process [N, C] (what enters the queue).
    """

    def shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def unshuffle(self, k: torch.Tensor, handle: torch.Tensor | None) -> torch.Tensor: ...

    def gather(self, k: torch.Tensor) -> torch.Tensor: ...


class NoShuffle:
    """Keys encoded in the query order (``--shuffle-bn none``, the ablation)."""

    def shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return x, None

    def unshuffle(self, k: torch.Tensor, handle: torch.Tensor | None) -> torch.Tensor:
        return k

    def gather(self, k: torch.Tensor) -> torch.Tensor:
        return k


class LocalShuffle(NoShuffle):
    """Random permutation of the key batch on one device (the demo's ``_batch_shuffle_single_gpu``).

    The permutation comes from ``generator`` (CPU), so a run is reproducible and resumable,
    and the same on every device; on a GPU it is sent with a non-blocking copy (the host does
    not wait for the GPU mid-forward).
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        perm = to_device(torch.randperm(x.shape[0], generator=self.generator), x.device)
        return x[perm], torch.argsort(perm)

    def unshuffle(self, k: torch.Tensor, handle: torch.Tensor | None) -> torch.Tensor:
        assert handle is not None
        return k[handle]


class DDPShuffle:
    """Shuffling BN across processes, as the original's ``_batch_shuffle_ddp`` (§3.2).

    ``shuffle``: all-gather the key images of every rank ([N,...], N = world x B), draw one
    permutation of N (broadcast from rank 0) and keep this rank's B images of it; the key
    encoder then normalises a random subset of the global batch, mostly other ranks' images.
    ``unshuffle``: all-gather the keys and take back this rank's own, in its original order.
    ``gather``: every rank's keys, so the queue is the same on all ranks.

    The permutation comes from ``generator`` (CPU), seeded identically on every rank and
    advanced identically, so its state (saved from rank 0) resumes the run exactly; the
    broadcast from rank 0 keeps the ranks in agreement regardless.
    """

    def __init__(self, generator: torch.Generator, rank: int | None = None,
                 world_size: int | None = None) -> None:
        self.generator = generator
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size

    @torch.no_grad()
    def shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x_all = concat_all_gather(x)
        n = x_all.shape[0]
        perm = to_device(torch.randperm(n, generator=self.generator), x.device)
        if self.world_size > 1:
            dist.broadcast(perm, src=0)
        inv = torch.argsort(perm)
        mine = perm.view(self.world_size, -1)[self.rank]
        return x_all[mine], inv

    @torch.no_grad()
    def unshuffle(self, k: torch.Tensor, handle: torch.Tensor | None) -> torch.Tensor:
        assert handle is not None, "unshuffle needs the handle returned by shuffle"
        k_all = concat_all_gather(k)
        return k_all[handle.view(self.world_size, -1)[self.rank]]

    def gather(self, k: torch.Tensor) -> torch.Tensor:
        return concat_all_gather(k)


class GatherKeys:
    """A per-process :class:`KeyShuffle` (no shuffle, or SplitBN's local shuffle) whose keys
    are still all-gathered for the queue: ``--shuffle-bn none|split|syncbn`` under torchrun."""

    def __init__(self, local: KeyShuffle) -> None:
        self.local = local

    def shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.local.shuffle(x)

    def unshuffle(self, k: torch.Tensor, handle: torch.Tensor | None) -> torch.Tensor:
        return self.local.unshuffle(k, handle)

    def gather(self, k: torch.Tensor) -> torch.Tensor:
        return concat_all_gather(k)


class ProcessGroup(Protocol):
    """Who this process is (``moco.utils.distributed.DistContext`` is one)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def enabled(self) -> bool: ...


def make_key_shuffle(mode: str, ctx: ProcessGroup, generator: torch.Generator) -> KeyShuffle:
    """The :class:`KeyShuffle` of a resolved ``--shuffle-bn`` mode (``split``, ``ddp``, ``none``,
    ``syncbn``) for this process count: in a process group, keys are gathered for the queue."""
    local: KeyShuffle = LocalShuffle(generator) if mode == "split" else NoShuffle()
    if not ctx.enabled:
        return local
    if mode == "ddp":
        return DDPShuffle(generator, ctx.rank, ctx.world_size)
    return GatherKeys(local)
