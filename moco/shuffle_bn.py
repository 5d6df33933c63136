"""Shuffling BN (MoCo v1 §3.3) on one device: SplitBatchNorm and a key-batch permutation.

A query and its positive key must be normalised with statistics of different samples, or the
model "cheats" through BN. On one device the official CIFAR demo splits every BN into S
sub-batches (strided: sample i goes to split i mod S) and encodes the keys in a random order.
The multi-process form (gather, shuffle across ranks, unshuffle) lives in ``distributed.py``
behind the same :class:`KeyShuffle` interface.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises S interleaved sub-batches separately.

    Input [B, C, H, W] with B divisible by S. Split s holds samples s, s+S, s+2S, ...
    Running statistics become the average over the S per-split updates (REFERENCE.md §3.3).
    In eval mode it is plain BN with the running statistics.
    """

    def __init__(self, num_features: int, num_splits: int, **kw: object) -> None:
        super().__init__(num_features, **kw)  # type: ignore[arg-type]
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        s = self.num_splits
        if not self.training or s == 1:
            return super().forward(input)
        n, c, h, w = input.shape
        if n % s:
            raise ValueError(
                f"SplitBatchNorm: batch {n} is not divisible by --bn-splits {s}; "
                "choose a batch size that is a multiple of the number of splits"
            )
        assert self.running_mean is not None and self.running_var is not None
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
            self.momentum if self.momentum is not None else 0.1,
            self.eps,
        ).view(n, c, h, w)
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(s, c).mean(dim=0))
            self.running_var.copy_(running_var.view(s, c).mean(dim=0))
        return out


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` by a :class:`SplitBatchNorm` (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm):
            new = SplitBatchNorm(
                child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                affine=child.affine, track_running_stats=child.track_running_stats,
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

    The permutation comes from ``generator`` (CPU), so a run is reproducible and resumable.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        perm = torch.randperm(x.shape[0], generator=self.generator).to(x.device)
        return x[perm], torch.argsort(perm)

    def unshuffle(self, k: torch.Tensor, handle: torch.Tensor | None) -> torch.Tensor:
        assert handle is not None
        return k[handle]
