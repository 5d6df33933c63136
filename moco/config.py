"""Pretraining configuration: one typed dataclass built from defaults, then a preset, then a
YAML file, then command-line flags (each layer overrides the one before)."""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # the demo's constants (REFERENCE.md §6.1)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

AUGMENTATIONS = ("v1", "v2", "cifar-demo")
SHUFFLE_BN = ("auto", "split", "none", "ddp", "syncbn")
# Modes that normalise with SplitBatchNorm over --bn-splits sub-batches (with / without the shuffle).
SPLIT_BN_MODES = ("split", "none")
LR_SCALES = ("none", "linear")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
KNN_FEATURES = ("backbone", "head")
LOADERS = ("auto", "tensor", "pil")
MECHANISMS = ("moco", "end-to-end", "memory-bank")
BAD_IMAGE_POLICIES = ("stop", "skip")


@dataclass
class MocoConfig:
    """Everything a pretraining run depends on. Defaults are ``main_moco.py``'s (MoCo v1)."""

    data: str = ""
    arch: str = "resnet50"
    cifar_stem: bool = False
    epochs: int = 200
    stop_after_epochs: int = 0
    time_limit: float = 0.0
    batch_size: int = 256
    lr: float = 0.03
    lr_scale: str = "none"
    schedule: list[int] = field(default_factory=lambda: [120, 160])
    cos: bool = False
    cos_one_based: bool = False
    warmup_epochs: int = 0
    momentum: float = 0.9
    wd: float = 1e-4
    moco_dim: int = 128
    moco_k: int = 65536
    moco_m: float = 0.999
    moco_t: float = 0.07
    mlp: bool = False
    aug: str = "v1"
    image_size: int = 224
    crop_min_scale: float = 0.2
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    symmetric: bool = False
    shuffle_bn: str = "auto"
    bn_splits: int = 8
    seed: int = 0
    workers: int = -1
    train_subset: int = 0
    knn_every: int = 1
    knn_k: int = 200
    knn_t: float = 0.1
    knn_features: str = "backbone"
    staleness_every: int = 0
    staleness_batches: int = 8
    output: str = "runs/pretrain"
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | str = "auto"  # auto: on CUDA only (slower on CPUs, docs/benchmarks.md)
    loader: str = "auto"
    cache_dir: str = ""
    compile: bool = False
    on_bad_image: str = "stop"
    mechanism: str = "moco"
    bank_momentum: float = 0.5
    resume: str = ""
    save_every_steps: int = 0
    keep_last: int = 2
    print_freq: int = 10
    dist_timeout: float = 30.0
    preset: str = ""

    def channels_last_on(self, device_type: str) -> bool:
        """Whether to use the channels_last memory format on a ``device_type`` device."""
        return device_type == "cuda" if self.channels_last == "auto" else bool(self.channels_last)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value and what would be accepted."""
        checks: list[tuple[bool, str]] = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.stop_after_epochs >= 0, f"--stop-after-epochs must be >= 0, got {self.stop_after_epochs}"),
            (self.time_limit >= 0 and self.time_limit != float("inf"),
             f"--time-limit must be a finite number of minutes >= 0, got {self.time_limit}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr >= 0, f"--lr must be >= 0, got {self.lr}"),
            (self.wd >= 0, f"--wd must be >= 0, got {self.wd}"),
            (0 <= self.moco_m < 1, f"--moco-m must be in [0, 1), got {self.moco_m}"),
            (self.moco_t > 0, f"--moco-t must be > 0, got {self.moco_t}"),
            (self.channels_last in (True, False, "auto"),
             f"--channels-last must be true, false or auto, got {self.channels_last!r}"),
            (self.moco_dim >= 1, f"--moco-dim must be >= 1, got {self.moco_dim}"),
            (self.moco_k >= 1, f"--moco-k must be >= 1, got {self.moco_k}"),
            (self.bn_splits >= 1, f"--bn-splits must be >= 1, got {self.bn_splits}"),
            (self.image_size >= 8, f"--image-size must be >= 8, got {self.image_size}"),
            (0 < self.crop_min_scale <= 1, f"--crop-min-scale must be in (0, 1], got {self.crop_min_scale}"),
            (self.aug in AUGMENTATIONS, f"--aug must be one of {AUGMENTATIONS}, got {self.aug!r}"),
            (self.shuffle_bn in SHUFFLE_BN, f"--shuffle-bn must be one of {SHUFFLE_BN}, got {self.shuffle_bn!r}"),
            (self.lr_scale in LR_SCALES, f"--lr-scale must be one of {LR_SCALES}, got {self.lr_scale!r}"),
            (self.dist_timeout > 0, f"--dist-timeout must be > 0 minutes, got {self.dist_timeout}"),
            (self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.knn_features in KNN_FEATURES, f"--knn-features must be one of {KNN_FEATURES}"),
            (self.loader in LOADERS, f"--loader must be one of {LOADERS}, got {self.loader!r}"),
            (self.mechanism in MECHANISMS, f"--mechanism must be one of {MECHANISMS}"),
            (self.on_bad_image in BAD_IMAGE_POLICIES,
             f"--on-bad-image must be one of {BAD_IMAGE_POLICIES}"),
            (0 <= self.bank_momentum < 1, "--bank-momentum must be in [0, 1)"),
            (self.knn_k >= 1 and self.knn_t > 0, "--knn-k must be >= 1 and --knn-t > 0"),
            (self.staleness_every >= 0 and self.staleness_batches >= 1,
             "--staleness-every must be >= 0 and --staleness-batches >= 1"),
            (self.staleness_every == 0 or self.mechanism == "moco",
             f"--staleness-every measures MoCo's queue; --mechanism {self.mechanism} has none"),
            (len(self.mean) == 3 and len(self.std) == 3, "mean and std need 3 values (RGB)"),
            (self.warmup_epochs >= 0, "--warmup-epochs must be >= 0"),
            (self.save_every_steps >= 0 and self.keep_last >= 0,
             "--save-every-steps and --keep-last must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        keys_per_step = self.batch_size * (2 if self.symmetric else 1)
        if keys_per_step > self.moco_k:
            raise ValueError(
                f"--moco-k {self.moco_k} is smaller than the {keys_per_step} keys enqueued per step "
                f"(batch {self.batch_size}{' x2 for --symmetric' if self.symmetric else ''}); "
                "raise --moco-k or lower --batch-size"
            )
        if self.shuffle_bn in SPLIT_BN_MODES and self.batch_size % self.bn_splits:
            raise ValueError(
                f"--batch-size {self.batch_size} is not divisible by --bn-splits {self.bn_splits}; "
                "SplitBatchNorm needs equal sub-batches"
            )

    @property
    def effective_lr(self) -> float:
        """The base lr actually used: ``--lr`` as given (``--lr-scale none``, the original's
        behaviour), or ``--lr x batch / 256`` (``--lr-scale linear``, Goyal et al.). The batch
        is the global one over all processes, so the rule does not depend on the process count."""
        return self.lr * self.batch_size / 256 if self.lr_scale == "linear" else self.lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # MoCo v1, ImageNet (REFERENCE.md §4.2): the defaults.
    "mocov1": {"arch": "resnet50", "lr": 0.03, "batch_size": 256, "epochs": 200,
               "schedule": [120, 160], "cos": False, "moco_k": 65536, "moco_m": 0.999,
               "moco_t": 0.07, "mlp": False, "aug": "v1", "wd": 1e-4},
    # MoCo v2: + MLP head, τ 0.2, aug+, cosine.
    "mocov2": {"arch": "resnet50", "lr": 0.03, "batch_size": 256, "epochs": 200,
               "schedule": [120, 160], "cos": True, "moco_k": 65536, "moco_m": 0.999,
               "moco_t": 0.2, "mlp": True, "aug": "v2", "wd": 1e-4},
    # The authors' CIFAR-10 demo (REFERENCE.md §6).
    "cifar10": {"arch": "resnet18", "cifar_stem": True, "moco_dim": 128, "moco_k": 4096,
                "moco_m": 0.99, "moco_t": 0.1, "bn_splits": 8, "shuffle_bn": "auto",
                "symmetric": False, "mlp": False, "lr": 0.06, "batch_size": 512,
                "wd": 5e-4, "epochs": 200, "cos": True, "cos_one_based": True, "schedule": [],
                "aug": "cifar-demo", "image_size": 32, "crop_min_scale": 0.08,
                "mean": list(CIFAR_MEAN), "std": list(CIFAR_STD), "knn_k": 200, "knn_t": 0.1,
                "knn_features": "head"},
}


def _check_keys(values: dict[str, Any], where: str) -> None:
    known = {f.name for f in fields(MocoConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config fields (dashes or underscores both accepted)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {p} must hold a mapping of settings, not {type(raw).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    _check_keys(values, f"config file {p}")
    return values


def build_config(
    preset: str | None = None,
    yaml_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> MocoConfig:
    """Defaults <- preset <- YAML file <- overrides (flags). A YAML file may name a preset."""
    file_values = load_yaml(yaml_path) if yaml_path else {}
    overrides = dict(overrides or {})
    _check_keys(overrides, "flags")
    preset = overrides.get("preset") or preset or file_values.get("preset") or ""
    values: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        values.update(copy.deepcopy(PRESETS[preset]))  # lists must not be shared
    values.update(file_values)
    values.update(overrides)
    values["preset"] = preset
    cfg = MocoConfig(**values)
    if not cfg.data:
        cfg.data = default_data_dir()
    return cfg


def default_data_dir() -> str:
    """``$MOCO_DATA``, else ``../shared/data/cifar10`` when present, else empty."""
    env = os.environ.get("MOCO_DATA")
    if env:
        return env
    for candidate in (Path("../shared/data/cifar10"), Path(__file__).resolve().parents[2] / "shared/data/cifar10"):
        if candidate.is_dir():
            return str(candidate)
    return ""


def save_yaml(cfg: MocoConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
