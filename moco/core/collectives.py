"""Collectives of a multi-process run: every rank's tensors gathered in rank order, and a
sharded evaluation put back in order.

The shuffle across processes built on them (the original's ``_batch_shuffle_ddp``) is
:class:`moco.core.shuffle_bn.DDPShuffle`. Everything here is the identity without a process
group (:mod:`moco.utils.distributed` joins it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape on all ranks) concatenated along dim 0 in rank
    order. No gradient flows back through it (as ``moco/builder.py``'s
    ``concat_all_gather``). Identity without a group."""
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
    their original order: [n, ...] on every rank. Identity without a process group.

    The ranks' rows are gathered straight into one rank-major buffer and reordered in one
    copy: at most two copies of the result at a time (the buffer and the result), not a list
    of the parts, their concatenation and the result."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    world = dist.get_world_size()
    width = -(-n // world)  # ranks hold width or width - 1 rows: pad to width
    padded = t.new_zeros((width, *t.shape[1:]))
    padded[: t.shape[0]] = t
    # NCCL gathers GPU tensors only: a CPU tensor (e.g. labels) makes the round trip.
    on_cpu_with_nccl = t.device.type == "cpu" and dist.get_backend() == "nccl"
    if on_cpu_with_nccl:
        padded = padded.to(torch.device("cuda", torch.cuda.current_device()))
    every = padded.new_empty((world * width, *t.shape[1:]))
    dist.all_gather_into_tensor(every, padded)  # [world * width, ...], rank-major
    del padded
    # rank r's row i is row i·world + r: [world, width] -> [width, world], the padding last
    out = every.view(world, width, -1).transpose(0, 1).reshape(world * width, *t.shape[1:])[:n]
    del every
    return out.cpu() if on_cpu_with_nccl else out
