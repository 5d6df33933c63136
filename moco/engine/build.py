"""What a run is built from its configuration: the model (the registered method
``--mechanism`` names, :mod:`moco.core.methods`), the optimizer and the learning rate of each
step (registered by name, :mod:`moco.engine.optimizers`), and the one line that describes the
run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moco.core.backbones import BackboneOptions
from moco.core.method_base import PretrainingMethod
from moco.core.methods import build_method, method_spec
from moco.core.model import build_encoder
from moco.core.momentum import ConstantMomentum, CosineMomentum
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


def backbone_options(cfg: MocoConfig) -> BackboneOptions:
    """What the backbone is built with: the run's image size (a ViT's position embedding),
    ``--patch-size``, ``--stop-grad-conv1`` and ``--cifar-stem``, then what the method asks
    (MoCo v3: zero-initialised residual blocks, any network with or without BatchNorm);
    ``--zero-init-residual true|false`` over the method's choice."""
    spec = method_spec(cfg.mechanism)
    options: dict[str, Any] = {
        "cifar_stem": cfg.cifar_stem, "image_size": cfg.image_size,
        "patch_size": cfg.patch_size or None, "stop_grad_conv1": cfg.stop_grad_conv1,
        **spec.backbone_options(cfg)}
    if isinstance(cfg.zero_init_residual, bool):
        options["zero_init_residual"] = cfg.zero_init_residual
    return BackboneOptions(**options)


def build_model(cfg: MocoConfig, device: torch.device,
                num_samples: int | None = None) -> PretrainingMethod:
    """The method ``cfg.mechanism`` around the query encoder (backbone + projection head,
    SplitBN if asked and the method uses Shuffling BN), seeded by ``cfg.seed``, on ``device``
    (compiled, channels_last as asked). ``num_samples``: the training-set size (the memory
    bank needs it). ``--moco-m-cos`` turns a constant EMA momentum into the cosine one."""
    spec = method_spec(cfg.mechanism)
    split = spec.shuffle_bn and cfg.shuffle_bn in (*SPLIT_BN_MODES, "auto")
    with seeded(cfg.seed):
        encoder = build_encoder(cfg.arch, cfg.moco_dim, mlp=cfg.mlp, cifar_stem=cfg.cifar_stem,
                                bn_splits=cfg.bn_splits if split else 1,
                                options=backbone_options(cfg))
        model = build_method(cfg.mechanism, cfg, encoder, num_samples)
    if cfg.moco_m_cos and isinstance(model.momentum_schedule, ConstantMomentum):
        model.momentum_schedule = CosineMomentum(model.momentum_schedule.m)
    model = model.to(device)
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


def lr_text(cfg: MocoConfig) -> str:
    """The lr and its rule: "lr 2.4 = base 0.6 x 4096 / 256" with ``--lr-scale linear``."""
    if cfg.lr_scale == "linear":
        return f"lr {cfg.effective_lr:.6g} = base {cfg.lr:g} x {cfg.batch_size} / 256"
    return f"lr {cfg.lr:g}"


def optimisation_text(cfg: MocoConfig) -> str:
    """The optimizer and lr schedule when they are not the defaults (sgd, auto)."""
    parts = [cfg.optimizer] if cfg.optimizer != "sgd" else []
    if cfg.lr_schedule != "auto":
        parts.append(cfg.lr_schedule)
    if cfg.warmup_epochs:
        parts.append(f"{cfg.warmup_epochs} warmup epoch{'s' if cfg.warmup_epochs != 1 else ''}")
    return "".join(f" {p}," for p in parts)


def bn_text(cfg: MocoConfig, runtime: Runtime) -> str:
    """How BatchNorm sees the batch: the Shuffling BN mode, or the global batch."""
    mode, w = runtime.shuffle_bn, runtime.dist.world_size
    if not method_spec(cfg.mechanism).shuffle_bn:
        return "BN over the global batch" + (f" (synchronised over {w} processes)" if w > 1 else "")
    return f"shuffle-BN {mode}" + (f" ({cfg.bn_splits} splits)" if mode == "split" else "")


def describe_run(cfg: MocoConfig, runtime: Runtime, images: int) -> str:
    """One line: the mechanism, network, data (``images`` training images), batch (and its
    split over the processes), learning rate (and its rule), optimizer, dictionary, head,
    augmentation, BatchNorm, device, precision, workers and the run folder."""
    w = runtime.dist.world_size
    procs = f" = {w} processes x {cfg.batch_size // w} ({runtime.dist.backend})" if w > 1 else ""
    spec = method_spec(cfg.mechanism)
    dictionary = spec.dictionary(cfg, images)
    patch = f" (patch {cfg.patch_size})" if cfg.patch_size else ""
    return (f"{spec.title} pretraining: {cfg.arch}{' (CIFAR stem)' if cfg.cifar_stem else ''}"
            f"{patch}, {images} images from {cfg.data}, {cfg.image_size} px, batch "
            f"{cfg.batch_size}{procs}, {lr_text(cfg)},{optimisation_text(cfg)} "
            f"{dictionary + ', ' if dictionary else ''}T {cfg.moco_t}, {spec.head(cfg)}, aug "
            f"{cfg.aug}, {bn_text(cfg, runtime)}, device {runtime.device}, "
            f"{precision_name(runtime.autocast_dtype)}, {runtime.workers} workers -> "
            f"{Path(cfg.output)}")
