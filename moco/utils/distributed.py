"""Multi-process and multi-node training with ``torchrun`` and DistributedDataParallel.

Without torchrun (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1`` outside torchrun)
everything is a single process, rank 0 of 1, and nothing here communicates. Under torchrun
(even ``--nproc_per_node 1``: the multi-process path on one process, e.g. to test NCCL on
one GPU), :func:`init_distributed` joins the process group (NCCL on CUDA, one GPU per process
chosen by ``LOCAL_RANK``; gloo on the CPU) with a timeout, so that a rank that dies or hangs
stops the job instead of blocking the others forever.

Shuffling BN across processes (the original's ``_batch_shuffle_ddp``) is one of the paper's
parts: :class:`moco.core.shuffle_bn.DDPShuffle`, with the other shuffles;
:func:`moco.core.shuffle_bn.make_key_shuffle` picks the one of a ``--shuffle-bn`` mode. The
collectives are in :mod:`moco.core.collectives`.
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from moco.core.errors import DistributedError

T = TypeVar("T")


_owns_group = False  # whether init_distributed created the default process group


@dataclass
class DistContext:
    """Who this process is. ``world_size == 1`` means no process group and no communication.

    ``comm_device`` is where small tensors used for coordination live (the process's GPU with
    NCCL, the CPU with gloo).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    local_world_size: int = 1  # processes on this machine (torchrun's LOCAL_WORLD_SIZE)
    grouped: bool = False  # a process group is joined (also with one process under torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether this process is in a process group and communicates."""
        return self.world_size > 1 or self.grouped

    def barrier(self) -> None:
        """Wait until every rank reaches this point (bounded by the process-group timeout)."""
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.enabled:
            return obj
        box: list[Any] = [obj]
        dist.broadcast_object_list(box, src=0, device=self.comm_device)
        return box[0]

    def all_gather_object(self, obj: T) -> list[T]:
        """``obj`` of every rank, in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def agree_signal(self, signum: int | None) -> int | None:
        """The largest signal number any rank has received (None if none did): every rank
        gets the same answer, so all of them stop at the same step."""
        if not self.enabled:
            return signum
        t = torch.tensor([signum or 0], dtype=torch.long, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        value = int(t.item())
        return value or None

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only (file-system work: one writer). If it raises, every rank
        raises the same exception, so no rank waits for a peer that has given up."""
        if not self.enabled:
            return fn()
        result: T | None = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # propagated to every rank below
                error = e
        error = self.broadcast_object(error)
        if error is not None:
            raise error
        return result

    @torch.no_grad()
    def broadcast_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers of ``module`` (e.g. BN running statistics) on every rank."""
        if self.enabled:
            for b in module.buffers():
                dist.broadcast(b, src=0)

    def local_device(self, device: torch.device) -> torch.device:
        """The device this process trains on: ``cuda:LOCAL_RANK`` under torchrun on CUDA."""
        if not self.enabled or device.type != "cuda":
            return device
        if device.index is not None and device.index != self.local_rank:
            raise DistributedError(
                f"--device {device} under torchrun: each process uses the GPU of its LOCAL_RANK "
                "(cuda:0..N-1); pass --device cuda (or auto) and choose GPUs with "
                "CUDA_VISIBLE_DEVICES")
        return torch.device("cuda", self.local_rank)


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise DistributedError(f"environment variable {name}={v!r} is not an integer") from None


def init_distributed(device: torch.device, timeout_minutes: float = 30.0) -> DistContext:
    """Join torchrun's process group, or return a single-process context without torchrun.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (set by torchrun; ``MASTER_ADDR`` and
    ``MASTER_PORT`` are read by ``init_process_group``). Backend: NCCL when ``device`` is CUDA
    (this process then uses ``cuda:LOCAL_RANK``), gloo otherwise. Every collective that waits
    longer than ``timeout_minutes`` fails, so a dead or stuck rank stops the job. If the
    default process group already exists (a caller set it up), it is used as is.
    """
    if dist.is_available() and dist.is_initialized():
        g_rank = dist.get_rank()
        env_local = _env_int("LOCAL_RANK")
        backend = str(dist.get_backend())
        comm = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return DistContext(g_rank, dist.get_world_size(),
                           env_local if env_local is not None else g_rank, backend, comm,
                           _env_int("LOCAL_WORLD_SIZE") or 1, grouped=True)
    env_world = _env_int("WORLD_SIZE")
    under_torchrun = bool(os.environ.get("TORCHELASTIC_RUN_ID"))
    if env_world is None or env_world < 1 or (env_world == 1 and not under_torchrun):
        return DistContext()
    env_rank, env_local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if env_rank is None:
        raise DistributedError("WORLD_SIZE is set but RANK is not: launch with torchrun")
    world, rank = env_world, env_rank
    local = env_local if env_local is not None else rank
    local_world = _env_int("LOCAL_WORLD_SIZE") or 1
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed support")
    if timeout_minutes <= 0:
        raise DistributedError(f"--dist-timeout must be > 0 minutes, got {timeout_minutes}")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible: "
                "start at most one process per GPU (--nproc_per_node)")
        cuda = torch.device("cuda", local)
        torch.cuda.set_device(cuda)
        dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timeout,
                                device_id=cuda)
        ctx = DistContext(rank, world, local, "nccl", cuda, local_world, grouped=True)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
        ctx = DistContext(rank, world, local, "gloo", torch.device("cpu"), local_world, grouped=True)
    global _owns_group
    _owns_group = True
    return ctx


def shutdown_distributed() -> None:
    """Leave the process group if :func:`init_distributed` created it (a group set up by the
    caller is left alone)."""
    global _owns_group
    if _owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _owns_group = False


def is_communication_error(e: BaseException) -> bool:
    """Whether ``e`` is a failed collective: a peer that died (connection closed) or one that
    did not arrive within the process-group timeout. gloo raises a plain RuntimeError."""
    if isinstance(e, dist.DistError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and any(
        s in msg for s in ("gloo", "NCCL", "Timed out", "Connection closed", "Connection reset"))


# ----- configuration across ranks ---------------------------------------------------------
def per_rank_batch(batch_size: int, world_size: int) -> int:
    """``-b`` is the global batch over all processes; each process gets ``-b / world_size``."""
    if batch_size % world_size:
        lo = batch_size // world_size * world_size
        raise DistributedError(
            f"--batch-size {batch_size} is the global batch and must be divisible by the "
            f"{world_size} processes; use e.g. -b {max(lo, world_size)} or -b {lo + world_size}")
    return batch_size // world_size


def settings_hash(settings: dict[str, Any], per_rank: frozenset[str] = frozenset()) -> str:
    """A short digest of the settings that must agree across ranks (all but ``per_rank``)."""
    kept = {k: v for k, v in sorted(settings.items()) if k not in per_rank}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_settings(ctx: DistContext, settings: dict[str, Any],
                        per_rank: frozenset[str] = frozenset()) -> None:
    """Raise :class:`DistributedError` on every rank if any rank was given other settings
    (flags, config file or preset), naming the settings that differ and on which ranks;
    ``per_rank`` names those that may differ (paths, worker counts)."""
    if not ctx.enabled:
        return
    everyone = ctx.all_gather_object((settings_hash(settings, per_rank), settings))
    if len({h for h, _ in everyone}) == 1:
        return
    ref = everyone[0][1]
    diffs = []
    for r, (_, s) in enumerate(everyone[1:], start=1):
        for k in sorted(set(ref) | set(s)):
            if k not in per_rank and ref.get(k) != s.get(k):
                diffs.append(f"{k}: rank 0 has {ref.get(k)!r}, rank {r} has {s.get(k)!r}")
    raise DistributedError(
        "the processes were started with different settings; every rank must get the same "
        "flags and config file: " + "; ".join(diffs[:10]) + (" ..." if len(diffs) > 10 else ""))


def wrap_ddp(model: nn.Module, ctx: DistContext, device: torch.device,
             sync_bn: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel (``model`` itself with one process).

    The key encoder's parameters have ``requires_grad=False``, so DDP leaves them out of the
    gradient all-reduce. Buffers are synced from rank 0 once, at construction, but not before
    every forward (``forward_sync_buffers=False``, the successor of ``broadcast_buffers=False``,
    whichever this torch has):
    unlike the original, whose DDP kept the default (``broadcast_buffers=True`` in
    ``main_moco.py``). The queue ([C, K], 32 MiB at K=65536) is identical on every rank by
    construction, and BN running statistics are never used during pretraining; rank 0's own
    buffers, which are what checkpoints and kNN use, are the same either way. With
    ``sync_bn`` every BatchNorm becomes a SyncBatchNorm first (parameters are kept).
    """
    if not ctx.enabled:
        return model
    if sync_bn:
        from moco.core.timm_backbone import convert_sync_batchnorm  # keeps timm's BN + activation

        convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
    # torch 2.11 has only broadcast_buffers (deprecated in 2.13), whose False also skips
    # the buffers' sync at construction: done here, so that both behave the same.
    ddp = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    with torch.no_grad():
        for b in model.buffers():
            dist.broadcast(b, src=0)
    return ddp
