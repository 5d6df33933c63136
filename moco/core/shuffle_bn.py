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

_DIMS = (0, 2)  # of the memory view [B/S, S, H·W, C]: what one split's statistics reduce over


def _memory_view(x: torch.Tensor, splits: int) -> torch.Tensor:
    """A channels_last [B, C, H, W] as its memory [B/S, S, H·W, C], contiguous (a view): split
    s holds samples s, s+S, ... (the split is the second index)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).view(n // splits, splits, h * w, c)


def _from_memory(xm: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`_memory_view`: [B, C, H, W], channels_last."""
    n, c, h, w = shape
    return xm.view(n, h, w, c).permute(0, 3, 1, 2)


def _bcast(t: torch.Tensor) -> torch.Tensor:
    """Per-(split, channel) values [S, C] broadcast over the memory view."""
    return t[None, :, None, :]


def _into(dtype: torch.dtype, like: torch.Tensor, base: torch.Tensor, t1: torch.Tensor,
          t2: torch.Tensor) -> torch.Tensor:
    """base + t1·t2 computed in base's dtype (float32 or float64), returned in ``dtype``, laid
    out like ``like``. Eager and narrower ``dtype``: written straight into a contiguous tensor
    of ``dtype`` (one pass); under ``torch.compile``: out of place (the compiler fuses the
    cast)."""
    if dtype == base.dtype or torch.compiler.is_compiling():
        return torch.addcmul(base, t1, t2).to(dtype)
    return torch.addcmul(base, t1, t2, out=torch.empty_like(like, dtype=dtype))


class _SplitBNChannelsLast(torch.autograd.Function):
    """Training-mode SplitBatchNorm of a channels_last input, without changing its layout.

    The NCHW path folds the S splits into the channels (``view(B/S, C·S, H, W)``), which a
    channels_last tensor cannot do without two copies into NCHW and back. Here the input is
    read as its memory, [B/S, S, H·W, C] (contiguous), and normalised with the per-(split,
    channel) statistics, y = a·x + b with a = w·rstd, b = bias - mean·a; the output has the
    input's layout. Everything is computed in at least float32 (bf16/fp16 are read as they
    are and accumulated in float32; products of two of them are exact in float32, so g·x
    never overflows fp16): forward one statistics pass (two for bf16/fp16) and one pass
    writing y, as BatchNorm; backward three passes over g and x (Σg, Σg·x, then dx). No
    ``out=`` into a strided view, so ``torch.compile`` traces it.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, splits: int,
                weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        xm = _memory_view(x, splits)
        m = (n // splits) * h * w
        stat = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            if x.dtype == stat:
                var, mean = torch.var_mean(xm, dim=_DIMS, correction=0)
            else:  # E[x^2] - E[x]^2 in float32, without a float32 copy of x
                mean = xm.sum(dim=_DIMS, dtype=stat).div_(m)
                sq = torch.linalg.vector_norm(xm, 2, dim=_DIMS, dtype=stat).square_().div_(m)
                var = sq.sub_(mean.square()).clamp_(min=0.0)
            rstd = (var + eps).rsqrt_()  # [S, C]
            a = rstd * weight.to(stat)
            b = torch.addcmul(bias.to(stat), mean, a, value=-1.0)
            ym = _into(x.dtype, xm, _bcast(b), xm, _bcast(a))
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, var)
        ctx.splits = splits
        return _from_memory(ym, x.shape), mean, var

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, *_: torch.Tensor
                 ) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        splits = ctx.splits
        m = (n // splits) * h * w
        stat = mean.dtype
        xm = _memory_view(x, splits)
        gm = _memory_view(g.contiguous(memory_format=torch.channels_last), splits)
        with torch.autocast(x.device.type, enabled=False):
            sum_g = gm.sum(dim=_DIMS, dtype=stat)
            if gm.dtype == stat and xm.dtype == stat:
                sum_gx = (gm * xm).sum(dim=_DIMS)
            else:  # the products in float32 (exact), not in fp16 where they can overflow
                zero = torch.zeros(1, dtype=stat, device=x.device)
                sum_gx = torch.addcmul(zero, gm, xm).sum(dim=_DIMS)
            sum_gxhat = torch.addcmul(sum_gx, mean, sum_g, value=-1.0).mul_(rstd)  # Σ g·x̂
            # dx = (w·rstd/m)(m·g - Σg - x̂·Σ(g·x̂)) = A·g + B·x + C per (split, channel)
            coef_a = rstd * weight.to(stat)
            coef_b = (coef_a * rstd).mul_(sum_gxhat).div_(-m)
            coef_c = (coef_a * sum_g).div_(-m).sub_(coef_b * mean)
            part = torch.addcmul(_bcast(coef_c), xm, _bcast(coef_b))  # B·x + C, float32
            dxm = _into(x.dtype, xm, part, gm, _bcast(coef_a))
        grad_w = sum_gxhat.sum(dim=0).to(weight.dtype)
        grad_b = sum_g.sum(dim=0).to(weight.dtype)
        return _from_memory(dxm, x.shape), None, grad_w, grad_b, None


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
                new = torch.stack([mean, var * (m / max(m - 1, 1))]).mean(dim=1)
                new = new.to(self.running_mean.dtype)
                torch._foreach_lerp_([self.running_mean, self.running_var], [new[0], new[1]],
                                     momentum)
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
