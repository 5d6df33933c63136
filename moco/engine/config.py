"""Pretraining configuration: :class:`MocoConfig`, each setting declared once.

Every field carries its flags, help, type, choices, range, role and scope in its metadata
(:mod:`moco.utils.settings`). From this one declaration come the ``moco pretrain`` flags and their
help, the check of every value from every source, and the lists of settings that do not change
training (:data:`RESUME_FREE`, :data:`RUNTIME_SETTINGS`) or may differ between ranks
(:data:`PER_RANK_SETTINGS`).

Values are layered: the defaults (``main_moco.py``'s, MoCo v1), then a preset, then a YAML file,
then flags, each over the one before (:func:`moco.engine.config_sources.build_config`).
``MocoConfig(preset="mocov2", lr=0.1)`` applies the preset under the values given.
:meth:`MocoConfig.validate` checks every field and the settings together
(:func:`check_combination`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from moco.core.errors import ConfigError
from moco.data.input_settings import (
    AUGMENTATIONS,
    BAD_IMAGE_POLICIES,
    CROPS,
    DECODES,
    INPUT_DEFAULTS,
    LOADERS,
    InputSettings,
)
from moco.data.recipes import CIFAR_MEAN as CIFAR_MEAN
from moco.data.recipes import CIFAR_STD as CIFAR_STD
from moco.data.recipes import IMAGENET_MEAN as IMAGENET_MEAN
from moco.data.recipes import IMAGENET_STD as IMAGENET_STD
from moco.engine import monitor_settings as monitoring
from moco.engine import presets
from moco.engine.choices import LR_SCHEDULES, MECHANISMS, OPTIMIZERS
from moco.utils import common_settings as common
from moco.utils.memory import FLOAT_BYTES, refuse_if_too_big
from moco.utils.settings import (
    Setting,
    Source,
    coerce,
    declarations,
    from_caller,
    setting,
)

SHUFFLE_BN = ("auto", "split", "none", "ddp", "syncbn")
# Modes that normalise with SplitBatchNorm over --bn-splits sub-batches (with / without the shuffle).
SPLIT_BN_MODES = ("split", "none")
LR_SCALES = ("none", "linear")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
KNN_FEATURES = ("backbone", "head")

#: ``--preset NAME``: the recipes of :mod:`moco.engine.presets`.
PRESETS: dict[str, dict[str, Any]] = presets.PRESETS

_R, _M, _O, _A = "recipe", "model", "optimisation", "data and augmentation"
_E, _U, _S = "monitoring", "run", "input pipeline and speed"
GROUPS = (_R, _M, _O, _A, _E, _U, _S)


@dataclass(kw_only=True)
class MocoConfig:
    """Everything a pretraining run depends on. Defaults are ``main_moco.py``'s (MoCo v1)."""

    data: str = setting(
        "", "data", group=_A, metavar="DATA", role="data", per_rank=True,
        default_text="$MOCO_DATA",
        help="dataset folder with train/ (and val/ or test/)")
    arch: str = setting(
        "resnet50", "-a", "--arch", group=_M,
        help="backbone: resnet18/34/50/101/152, wide_resnet50_2, ... (moco.core.backbones)")
    cifar_stem: bool = setting(False, "--cifar-stem", group=_M,
                               help="3x3 stride-1 conv1 and no max-pool, for 32 px images")
    epochs: int = setting(200, "--epochs", group=_O, min=1, help="number of epochs")
    stop_after_epochs: int = setting(
        0, "--stop-after-epochs", group=_O, min=0, metavar="N", role="runtime",
        per_invocation=True, help="train only the first N epochs of the --epochs schedule, then "
        "save and stop (0 = all); --resume auto continues the same schedule (this flag is not "
        "kept for the resumed run)")
    time_limit: float = setting(
        0.0, "--time-limit", group=_O, min=0, metavar="MINUTES", role="runtime",
        per_invocation=True, help="save and stop at the end of the last epoch whose training "
        "fits in MINUTES (judged from the epochs so far; 0 = no limit); --resume auto continues "
        "the same schedule (this flag is not kept for the resumed run)")
    batch_size: int = common.batch_size(INPUT_DEFAULTS.batch_size, group=_O,
                                        help="GLOBAL batch size over all processes; each of N "
                                        "torchrun processes gets b / N")
    lr: float = setting(0.03, "--lr", "--learning-rate", group=_O, min=0, help="base lr")
    lr_scale: str = setting(
        "none", "--lr-scale", group=_O, choices=LR_SCALES, help="none: --lr is used as given "
        "(the original); linear: lr = --lr x batch / 256 (the global batch, so independent of "
        "the process count)")
    schedule: list[int] = setting([120, 160], "--schedule", group=_O, min=0,
                                  help="epochs at which lr is multiplied by 0.1; ignored with --cos")
    cos: bool = setting(False, "--cos", group=_O, help="cosine lr schedule (per epoch)")
    cos_one_based: bool = setting(False, "--cos-one-based", group=_O,
                                  help="cosine lr at epoch + 1 (the CIFAR demo's schedule)")
    warmup_epochs: int = setting(0, "--warmup-epochs", group=_O, min=0,
                                 help="linear lr warmup over the first N epochs, set per step (not in the papers)")
    optimizer: str = setting("sgd", "--optimizer", group=_O, choices=OPTIMIZERS,
                             help="optimizer over the method's trainable parameters "
                             "(moco.engine.optimizers registers them): sgd = main_moco.py's; "
                             "lars = MoCo v3's for ResNets (no wd or trust ratio on biases and "
                             "norms); adamw = MoCo v3's for ViTs")
    lr_schedule: str = setting(
        "auto", "--lr-schedule", group=_O, choices=LR_SCHEDULES, help="lr of each step "
        "(moco.engine.optimizers registers them): step = x0.1 at --schedule, cosine = half "
        "cosine per epoch, both ramped over --warmup-epochs; warmup-cosine = linear warmup over "
        "--warmup-epochs, then a half cosine per step (MoCo v3); auto = cosine with --cos, "
        "else step")
    momentum: float = setting(0.9, "--momentum", group=_O, min=0, max=1, max_open=True,
                              help="SGD / LARS momentum")
    wd: float = setting(1e-4, "--wd", "--weight-decay", group=_O, min=0, help="weight decay")
    moco_dim: int = setting(128, "--moco-dim", group=_M, min=1, help="feature dimension C")
    moco_k: int = setting(65536, "--moco-k", group=_M, min=1, help="queue size K")
    moco_m: float = setting(0.999, "--moco-m", group=_M, min=0, max=1, max_open=True,
                            help="key-encoder momentum m (m0 with --moco-m-cos)")
    moco_m_cos: bool = setting(False, "--moco-m-cos", group=_M, help="raise the momentum from "
                               "--moco-m to 1 by a half cosine over training, set every step "
                               "(MoCo v3, after BYOL)")
    mlp_dim: int = setting(4096, "--mlp-dim", group=_M, min=1, help="MoCo v3: hidden width of "
                           "the projector and predictor MLPs (their output is --moco-dim)")
    patch_size: int = setting(0, "--patch-size", group=_M, min=0, help="ViTs (vit_tiny, "
                              "vit_small, vit_base): patch size in pixels, dividing --image-size; "
                              "0 = 16 (4 suits 32-px CIFAR)")
    stop_grad_conv1: bool = setting(False, "--stop-grad-conv1", group=_M, help="ViTs: the random "
                                    "patch projection of MoCo v3 (the patch embedding keeps its "
                                    "random initialisation, no gradient)")
    zero_init_residual: bool | str = setting(
        "auto", "--zero-init-residual", group=_M, metavar="auto|true|false",
        help="ResNets: start the last BatchNorm of every residual block at 0 (Goyal et al. "
        "2017); auto = the method's choice (MoCo v3: true, v1/v2: false)")
    moco_t: float = setting(0.07, "--moco-t", group=_M, min=0, min_open=True,
                            help="softmax temperature T")
    mlp: bool = setting(False, "--mlp", group=_M, help="MoCo v2 MLP head")
    aug: str = setting(
        INPUT_DEFAULTS.aug, "--aug", group=_A, choices=AUGMENTATIONS, help="augmentation recipe",
        shortcuts=(("--aug-plus", "v2", "MoCo v2 augmentation (same as --aug v2)"),))
    image_size: int = common.image_size(INPUT_DEFAULTS.image_size, group=_A,
                                        help="crop size in pixels")
    crop_min_scale: float = setting(INPUT_DEFAULTS.crop_min_scale, "--crop-min-scale", group=_A,
                                    min=0, min_open=True,
                                    max=1, help="RandomResizedCrop minimum area fraction")
    mean: list[float] = setting(list(INPUT_DEFAULTS.mean), "--mean", group=_A, length=3,
                                metavar=("R", "G", "B"), help="per-channel mean of the "
                                "normalisation")
    std: list[float] = setting(list(INPUT_DEFAULTS.std), "--std", group=_A, length=3, min=0,
                               min_open=True, metavar=("R", "G", "B"),
                               help="per-channel standard deviation of the normalisation")
    symmetric: bool = setting(False, "--symmetric", group=_M, help="symmetric loss: "
                              "loss(q1,k2)+loss(q2,k1), both key sets enqueued")
    shuffle_bn: str = setting(
        "auto", "--shuffle-bn", group=_M, choices=SHUFFLE_BN, help="shuffling BN: ddp = key "
        "images shuffled across processes, each process's BN on its slice (the original; needs "
        "torchrun); split = SplitBatchNorm + key-batch shuffle within each process; none = no "
        "shuffle, BN over the same --bn-splits sub-batches (per-GPU BN without the shuffle: the "
        "paper's ablation; --bn-splits 1 for plain BN); syncbn = SyncBatchNorm over the global "
        "batch, no shuffle (comparison; GPUs only); auto = ddp under torchrun, split on one "
        "process")
    bn_splits: int = setting(8, "--bn-splits", group=_M, min=1, help="sub-batches of "
                             "SplitBatchNorm")
    seed: int = common.seed(group=_U, help="seed for weights, data order and augmentation")
    workers: int = common.workers(group=_A)
    train_subset: int = setting(0, "--train-subset", group=_A, min=0, help="pretrain on a "
                                "class-balanced subset of N train images (kNN still uses the "
                                "full train set as its bank); 0 = all")
    knn_every: int = setting(1, "--knn-every", group=_E, min=0, role="runtime", help="kNN "
                             "evaluation every N epochs, 0 = never; the last epoch is always "
                             "evaluated")
    knn_k: int = setting(200, "--knn-k", group=_E, min=1, role="evaluation", help="neighbours")
    knn_t: float = setting(0.1, "--knn-t", group=_E, min=0, min_open=True, role="evaluation",
                           help="kNN temperature")
    knn_features: str = setting("backbone", "--knn-features", group=_E, choices=KNN_FEATURES,
                                role="evaluation", help="kNN on pooled backbone features or "
                                "on the head's output")
    knn_bank_images: int = setting(0, "--knn-bank-images", group=_E, min=0, role="evaluation",
                                   help="kNN monitor: a class-balanced subset of N train images "
                                   "as the bank (the ImageNet presets: 10000); 0 = all")
    knn_query_images: int = setting(0, "--knn-query-images", group=_E, min=0, role="evaluation",
                                    help="kNN monitor: a class-balanced subset of N val/test "
                                    "images as the queries (the ImageNet presets: 2000); 0 = all")
    health: bool = monitoring.health_setting(group=_E)
    health_images: int = monitoring.health_images_setting(group=_E)
    probe: bool | str = monitoring.probe_setting(group=_E)
    probe_lr: float = monitoring.probe_lr_setting(group=_E)
    staleness_every: int = setting(
        0, "--staleness-every", group=_E, min=0, role="runtime", help="every N epochs, measure "
        "the loss against the queue vs against K keys freshly encoded by f_k (moco.engine.staleness; "
        "~K/B+2x--staleness-batches key-encoder batches, no training effect); 0 = never; single "
        "process only")
    staleness_batches: int = setting(8, "--staleness-batches", group=_E, min=1, role="runtime",
                                     help="training batches the two dictionaries are compared on")
    output: str = setting("runs/pretrain", "--output", group=_U, role="runtime",
                          help="run folder (never inside DATA)")
    device: str = common.device(group=_U)
    precision: str = common.precision("auto", PRECISIONS, group=_U,
                                      help="auto: bf16 autocast on CUDA, fp32 on CPU")
    channels_last: bool | str = setting(
        INPUT_DEFAULTS.channels_last, "--channels-last", group=_U, help="channels_last memory format: true, false or "
        "auto (on CUDA only: slower on CPUs, docs/benchmarks.md)")
    loader: str = setting(
        INPUT_DEFAULTS.loader, "--loader", group=_S, choices=LOADERS, help="auto / tensor: decoded-image cache "
        "(when the decoded images fit in memory, else decoding in workers) + batched "
        "augmentation on the training device; pil: the original per-image PIL transforms in "
        "DataLoader workers")
    cache_dir: str = setting(
        INPUT_DEFAULTS.cache_dir, "--cache-dir", group=_S, role="runtime", per_rank=True, default_text="$MOCO_CACHE, "
        "else ~/.cache/moco", help="folder of the decoded-image cache, never inside DATA")
    compile: bool = setting(False, "--compile", group=_S, help="torch.compile the encoders "
                            "(the first steps compile for a minute or more)")
    crops: str = setting(
        INPUT_DEFAULTS.crops, "--crops", group=_S, choices=CROPS, help="where the crop boxes are drawn: "
        "original = on each file's original size, decoded each step (the papers' "
        "RandomResizedCrop); short-side = from the decoded cache (images resized to short side "
        "256 for 224 px crops: fewer source pixels per crop); auto = the cache when it keeps "
        "every image whole (none larger than the training size, e.g. CIFAR, STL), else "
        "original. Tar shards always use original")
    decode: str = setting(
        INPUT_DEFAULTS.decode, "--decode", group=_S, choices=DECODES, help="where original-size crops' JPEGs "
        "are decoded: cpu = in the DataLoader workers; gpu = bytes read in the workers, each "
        "batch decoded on the training GPU in one call (nvJPEG; other files on the CPU); "
        "auto = gpu when training on CUDA")
    shuffle_buffer: int = setting(
        INPUT_DEFAULTS.shuffle_buffer, "--shuffle-buffer", group=_S, min=1, help="tar shards: the samples each reader's "
        "shuffle buffer holds (more mixes better and holds more encoded images in memory)")
    on_bad_image: str = setting(
        INPUT_DEFAULTS.on_bad_image, "--on-bad-image", group=_U, choices=BAD_IMAGE_POLICIES, help="an unreadable "
        "image file or folder: stop = stop with an error naming it (after saving the steps "
        "done); skip = replace an image by the next readable one and leave an unreadable folder "
        "out, and count them (the count is logged and in metrics.jsonl as bad_images)")
    mechanism: str = setting(
        "moco", "--mechanism", "--method", group=_M, choices=MECHANISMS, help="pretraining "
        "method, one of the registered ones (moco.register_method adds more); the built-in are "
        "the contrastive mechanisms of MoCo v1 Figure 2: moco = momentum key encoder + queue; "
        "end-to-end = keys from the current batch through the query encoder with gradients "
        "(K = batch - 1); memory-bank = InstDisc bank, --moco-k negatives sampled from it; "
        "mocov3 = MoCo v3: no queue, the global batch's keys as negatives, a predictor, "
        "symmetric loss, no Shuffling BN")
    bank_momentum: float = setting(0.5, "--bank-momentum", group=_M, min=0, max=1, max_open=True,
                                   help="memory bank entry update v <- normalize(m v + (1-m) q) "
                                   "(InstDisc's)")
    resume: str = setting(
        "", "--resume", group=_U, role="runtime", per_invocation=True, metavar="CKPT|auto",
        help="checkpoint to resume from, or 'auto' for the newest readable one in --output; the "
        "run folder's config.yaml supplies every setting not given as a flag, so 'moco pretrain "
        "--output DIR --resume auto' continues a run")
    overwrite: bool = setting(False, "--overwrite", group=_U, role="runtime",
                              per_invocation=True, help="replace a run already in --output "
                              "(its checkpoints, metrics and logs)")
    save_every_steps: int = setting(0, "--save-every-steps", group=_U, min=0, role="runtime",
                                    help="also checkpoint every N steps (0 = per epoch only)")
    keep_last: int = setting(2, "--keep-last", group=_U, min=0, role="runtime",
                             help="checkpoints to keep (0 = all)")
    print_freq: int = setting(10, "-p", "--print-freq", group=_E, min=1, role="runtime",
                              help="TensorBoard step scalars every N steps")
    dist_timeout: float = common.dist_timeout(
        group=_U, help="under torchrun: a collective that waits longer fails and stops the job (a "
        "dead or stuck rank); must exceed rank 0's kNN evaluation and checkpoint time")
    preset: str = setting(
        "", "--preset", group=_R, choices=("", *PRESETS), role="runtime", help="mocov1 / mocov2: "
        "the papers' ImageNet recipes; cifar10: the authors' CIFAR-10 demo recipe; mocov3-r50, "
        "mocov3-vit-small, mocov3-vit-base: MoCo v3's ImageNet recipes; cifar10-mocov3-vit: "
        "MoCo v3 with a ViT-Tiny/4 on CIFAR-10 (moco.engine.presets)")

    def __post_init__(self) -> None:
        check_fields(self, from_caller("MocoConfig"))

    def channels_last_on(self, device_type: str) -> bool:
        """Whether to use the channels_last memory format on a ``device_type`` device."""
        return device_type == "cuda" if self.channels_last == "auto" else bool(self.channels_last)

    def input_settings(self) -> InputSettings:
        """What the input pipeline reads of this run (:mod:`moco.data.input_settings`); the
        batch is the global one (a process's loader takes its slice)."""
        return InputSettings.of(self)

    def validate(self) -> None:
        """Check every field again (they may have been assigned since) and the settings
        together; raise :class:`ConfigError` naming the first bad value and the fix."""
        check_fields(self, lambda key: "in the configuration")
        check_combination(self)

    @property
    def effective_lr(self) -> float:
        """The base lr actually used: ``--lr`` as given (``--lr-scale none``, the original's
        behaviour), or ``--lr x batch / 256`` (``--lr-scale linear``, Goyal et al.). The batch
        is the global one over all processes, so the rule does not depend on the process count."""
        return self.lr * self.batch_size / 256 if self.lr_scale == "linear" else self.lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preset_values(name: Any, where: str = "") -> dict[str, Any]:
    """A copy of preset ``name``'s settings (lists not shared), or :class:`ConfigError`
    naming the presets (``where``: the source, for the message)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"expected --preset to be one of {', '.join(PRESETS)}, got "
                          f"{name!r}{where}")
    return copy.deepcopy(PRESETS[name])


def _init_with_preset(init: Any) -> Any:
    """``MocoConfig(preset=NAME, **values)`` = the defaults <- the preset <- ``values``: the
    one place a preset is applied (:func:`~moco.engine.config_sources.build_config` passes
    the preset it resolved here)."""
    def __init__(self: MocoConfig, **values: Any) -> None:
        preset = values.get("preset") or ""
        if preset:
            values = {**preset_values(preset, " (given to MocoConfig)"), **values}
        init(self, **values)

    __init__.__doc__ = init.__doc__
    __init__.__wrapped__ = init  # type: ignore[attr-defined]
    return __init__


MocoConfig.__init__ = _init_with_preset(MocoConfig.__init__)  # type: ignore[method-assign]

#: ``{field name: its declaration}``, in field order.
SETTINGS: dict[str, Setting] = declarations(MocoConfig)
#: ``{field name: default value}`` (what the help shows).
DEFAULTS: dict[str, Any] = {
    f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[operator]
    for f in dataclasses.fields(MocoConfig)}
#: Settings that may change between a run and its resumption without changing the training.
RESUME_FREE = frozenset(k for k, s in SETTINGS.items() if s.role != "training")
#: Settings that change neither the training nor the reported figures (an ablation re-run may
#: change them without invalidating a finished run).
RUNTIME_SETTINGS = frozenset(k for k, s in SETTINGS.items() if s.role == "runtime")
#: Settings that may differ between torchrun ranks (paths and worker counts of each machine).
PER_RANK_SETTINGS = frozenset(k for k, s in SETTINGS.items() if s.per_rank)
#: Settings of one invocation, never taken from the resumed run's config.yaml.
PER_INVOCATION = frozenset(k for k, s in SETTINGS.items() if s.per_invocation)


def check_fields(cfg: MocoConfig, source: Source) -> None:
    """Check (and normalise: ``"false"`` -> False) every field of ``cfg`` in place."""
    for name, s in SETTINGS.items():
        setattr(cfg, name, coerce(name, s, getattr(cfg, name), source))


def check_combination(cfg: MocoConfig) -> None:
    """Raise :class:`ConfigError` for settings that contradict each other or cannot fit."""
    from moco.core.methods import method_spec

    spec = method_spec(cfg.mechanism)
    if cfg.staleness_every and not spec.has_queue:
        raise ConfigError(f"--staleness-every measures MoCo's queue; --mechanism {cfg.mechanism} "
                          "has none: drop --staleness-every or use --mechanism moco")
    spec.check(cfg)
    if spec.shuffle_bn and cfg.shuffle_bn in SPLIT_BN_MODES and cfg.batch_size % cfg.bn_splits:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is not divisible by --bn-splits {cfg.bn_splits}; "
            "SplitBatchNorm needs equal sub-batches")
    if not cfg.output.strip():
        raise ConfigError("expected --output to name a run folder, got ''")
    check_device_name(cfg.device)
    check_sizes(cfg)


def check_device_name(name: str) -> None:
    """``auto`` or a name ``torch.device`` accepts (whether it is present is checked later)."""
    if name == "auto":
        return
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"expected --device to be auto, cpu, cuda, cuda:N, mps, ..., got "
                          f"{name!r}") from None


def _world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def check_sizes(cfg: MocoConfig, available: int | None = None) -> None:
    """The method's buffers (MoCo's queue: K x dim floats) and one batch of two views must
    each fit in memory."""
    from moco.core.methods import method_spec

    for what, nbytes, fix in method_spec(cfg.mechanism).memory(cfg, None):
        refuse_if_too_big(what, nbytes, fix, available)
    per_process = max(1, cfg.batch_size // _world_size())
    refuse_if_too_big(
        f"one batch (two views of {per_process} images of --image-size {cfg.image_size} px, "
        "float32)", per_process * 2 * 3 * cfg.image_size**2 * FLOAT_BYTES,
        "lower --batch-size or --image-size", available)
