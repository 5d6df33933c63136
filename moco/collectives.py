"""Collectives of the multi-process run and shuffling BN across processes (MoCo v1 §3.3).

Shuffling BN across processes is the original's ``_batch_shuffle_ddp`` /
``_batch_unshuffle_ddp`` (REFERENCE.md §3.2), behind the :class:`~moco.shuffle_bn.KeyShuffle`
interface of :class:`~moco.model.MoCo`: :class:`DDPShuffle`. Everything here is the identity
without a process group (:mod:`moco.distributed` joins it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moco.runtime import to_device
from moco.shuffle_bn import KeyShuffle


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape on all ranks) concatenated along dim 0 in rank
    order. No gradient flows back through it (REFERENCE.md §1.3). Identity without a group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    fmt = _memory_format(tensor)
    t = tensor.contiguous()
    # NCCL gathers GPU tensors only: a CPU tensor (e.g. dataset indices) makes the round trip.
    on_cpu_with_nccl = t.device.type == "cpu" and dist.get_backend() == "nccl"
    if on_cpu_with_nccl:
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    out = torch.cat(parts, dim=0)
    if on_cpu_with_nccl:
        out = out.cpu()
    return out.contiguous(memory_format=fmt) if fmt is not torch.contiguous_format else out


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """The indices of ``range(n)`` rank ``rank`` handles: rank, rank + world, ... (strided)."""
    return list(range(rank, n, world_size))


@torch.no_grad()
def gather_shards(t: torch.Tensor, n: int) -> torch.Tensor:
    r"""Every rank's rows of ``t`` (rank r holds rows :func:`shard`\ (n, r, world)), put back in
    their original order: [n, ...] on every rank. Identity without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    world = dist.get_world_size()
    width = -(-n // world)  # ranks hold width or width - 1 rows: pad to width
    padded = t.new_zeros((width, *t.shape[1:]))
    padded[: t.shape[0]] = t
    every = concat_all_gather(padded)  # [world * width, ...], rank-major
    out = t.new_empty((n, *t.shape[1:]))
    for r in range(world):
        rows = shard(n, r, world)
        out[rows] = every[r * width: r * width + len(rows)]
    return out


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


