"""What a run is built from its configuration: the model (the registered method
``--mechanism`` names, :mod:`moco.core.methods`), the optimizer and the learning rate of each
step (registered by name, :mod:`moco.engine.optimizers`), and the one line that describes the
run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moco.core.method_base import PretrainingMethod
from moco.core.methods import build_method, method_spec
from moco.core.model import build_encoder
from moco.core.seeding import seeded
from moco.engine.config import SPLIT_BN_MODES, MocoConfig
from moco.engine.optimizers import lr_schedule, make_optimizer
from moco.utils.distributed import DistContext
from moco.utils.runtime import precision_name
from moco.utils.schedule import learning_rate


@dataclass(frozen=True)
class Runtime:
    """Where a run trains, as resolved on this machine: the device, the process group, the
    ``--shuffle-bn`` mode this process count runs (``auto`` resolved), the autocast dtype
    (None: fp32), the data-loading workers of this process and the machine's description."""

    device: torch.device
    dist: DistContext
    shuffle_bn: str
    autocast_dtype: torch.dtype | None
    workers: int
    machine: str


def build_model(cfg: MocoConfig, device: torch.device,
                num_samples: int | None = None) -> PretrainingMethod:
    """The method ``cfg.mechanism`` around the query encoder (backbone + projection head,
    SplitBN if asked), seeded by ``cfg.seed``, on ``device`` (compiled, channels_last as
    asked). ``num_samples``: the training-set size (the memory bank needs it)."""
    with seeded(cfg.seed):
        encoder = build_encoder(cfg.arch, cfg.moco_dim, mlp=cfg.mlp, cifar_stem=cfg.cifar_stem,
                                bn_splits=cfg.bn_splits if cfg.shuffle_bn in (*SPLIT_BN_MODES, "auto") else 1)
    model = build_method(cfg.mechanism, cfg, encoder, num_samples).to(device)
    if cfg.compile:  # the encoders; the queue, shuffles and momentum update stay eager
        for child in model.children():
            child.compile()
    if cfg.channels_last_on(device.type):
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(cfg: MocoConfig, model: PretrainingMethod) -> torch.optim.Optimizer:
    """``--optimizer`` over the method's trainable parameters (MoCo: f_q only, f_k is trained
    by momentum); SGD puts wd on every tensor, as the original."""
    return make_optimizer(cfg, model.trainable_parameters())


def epoch_lr(cfg: MocoConfig, epoch: int) -> float:
    """The schedule's lr for the 0-based ``epoch``, before the warmup (``step_lr``)."""
    e = epoch + 1 if cfg.cos_one_based else epoch
    return learning_rate(cfg.effective_lr, e, cfg.epochs, cos=cfg.cos, milestones=cfg.schedule)


def step_lr(cfg: MocoConfig, epoch: int, step: int, steps: int) -> float:
    """The lr of ``step`` (0-based, of ``steps``) in ``epoch``: ``--lr-schedule``'s (by
    default the epoch's lr, ramped per step over the first ``--warmup-epochs`` epochs)."""
    return lr_schedule(cfg)(cfg, epoch, step, steps)


def describe_run(cfg: MocoConfig, runtime: Runtime, images: int) -> str:
    """One line: the mechanism, network, data (``images`` training images), batch (and its
    split over the processes), learning rate, dictionary, head, augmentation, shuffle-BN,
    device, precision, workers and the run folder."""
    w, mode = runtime.dist.world_size, runtime.shuffle_bn
    procs = f" = {w} processes x {cfg.batch_size // w} ({runtime.dist.backend})" if w > 1 else ""
    lr = (f"lr {cfg.effective_lr:.6g} (--lr {cfg.lr:g} x {cfg.batch_size}/256, --lr-scale linear)"
          if cfg.lr_scale == "linear" else f"lr {cfg.lr:g}")
    spec = method_spec(cfg.mechanism)
    dictionary = spec.dictionary(cfg, images)
    return (f"{spec.title} pretraining: {cfg.arch}{' (CIFAR stem)' if cfg.cifar_stem else ''}, "
            f"{images} images from {cfg.data}, {cfg.image_size} px, batch "
            f"{cfg.batch_size}{procs}, {lr}, {dictionary + ', ' if dictionary else ''}T {cfg.moco_t}, "
            f"{'MLP' if cfg.mlp else 'linear'} head, aug {cfg.aug}, shuffle-BN {mode}"
            f"{f' ({cfg.bn_splits} splits)' if mode == 'split' else ''}, device "
            f"{runtime.device}, {precision_name(runtime.autocast_dtype)}, {runtime.workers} "
            f"workers -> {Path(cfg.output)}")
