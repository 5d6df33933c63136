"""The process count a pretraining run meets: ``--shuffle-bn auto`` resolved for it, the global
batch split over the ranks, and the settings every rank must share (the general multi-process
machinery is :mod:`moco.utils.distributed`)."""

from __future__ import annotations

import logging

import torch

from moco.core.errors import DistributedError
from moco.core.methods import method_spec
from moco.engine.config import PER_RANK_SETTINGS, SPLIT_BN_MODES, MocoConfig
from moco.utils.distributed import DistContext, check_same_settings, per_rank_batch


def resolve_shuffle_bn(mode: str, world_size: int, grouped: bool = False) -> str:
    """``auto`` -> ``ddp`` with several processes, ``split`` with one. Modes that need a
    process group are refused without one, with what to use instead; in a group of one
    process (``torchrun --nproc_per_node 1``) they run, with a warning: shuffling one batch
    does not keep a query's BN statistics from its key (a test of the multi-process path)."""
    if mode == "auto":
        return "ddp" if world_size > 1 else "split"
    if world_size == 1 and mode in ("ddp", "syncbn") and grouped:
        logging.getLogger(__name__).warning(
            "--shuffle-bn %s on one process: the key encoder's BN sees the same images as the "
            "query encoder's; this tests the multi-process path, use --shuffle-bn split to train",
            mode)
        return mode
    if world_size == 1 and mode in ("ddp", "syncbn"):
        raise DistributedError(
            f"--shuffle-bn {mode} needs several processes (torchrun --nproc_per_node N, N >= 2); "
            "on one process use --shuffle-bn split (SplitBatchNorm) or none")
    return mode


def resolve_for_world(cfg: MocoConfig, ctx: DistContext, device: torch.device) -> str:
    """The ``--shuffle-bn`` mode this process count runs (``auto`` resolved; ``none`` for a
    method without Shuffling BN, e.g. MoCo v3), after checking that the global batch splits
    evenly over the ranks, that SplitBatchNorm gets equal
    sub-batches on each rank, that SyncBN has GPUs, and that every rank got the same settings.

    ``cfg`` itself is left as requested (``auto`` stays ``auto`` in config.yaml and in
    checkpoints), so a run saved by N processes resumes on M processes or on one.
    """
    check_same_settings(ctx, cfg.to_dict(), PER_RANK_SETTINGS)
    local = per_rank_batch(cfg.batch_size, ctx.world_size)
    if not method_spec(cfg.mechanism).shuffle_bn:
        return "none"  # no shuffle: the model's BN sees the global batch (synchronised)
    mode = resolve_shuffle_bn(cfg.shuffle_bn, ctx.world_size, ctx.grouped)
    if mode in SPLIT_BN_MODES and local % cfg.bn_splits:
        where = f"the per-process batch {local} (-b {cfg.batch_size} / {ctx.world_size})" \
            if ctx.enabled else f"--batch-size {cfg.batch_size}"
        raise DistributedError(
            f"--shuffle-bn {mode}: {where} is not divisible by --bn-splits {cfg.bn_splits}; "
            "SplitBatchNorm needs equal sub-batches")
    if mode == "syncbn" and device.type != "cuda":
        raise DistributedError("--shuffle-bn syncbn: PyTorch's SyncBatchNorm runs on GPUs only; "
                               "on the CPU use --shuffle-bn ddp")
    return mode
