"""The settings of the evaluation commands, declared once (:func:`moco.utils.settings.setting`):
:class:`LinclsConfig` (``moco lincls``, :func:`moco.eval.lincls.linear_classification`),
:class:`KnnConfig` (``moco knn``, :func:`moco.eval.knn.knn_evaluate`) and :class:`EmbedConfig`
(``moco embed``, :func:`moco.eval.embed.embed_images`). The commands' flags are generated from
them (:mod:`moco.cli.declared`), and every value is checked by its declaration whether it comes
from the command line or from Python (errors then name the parameter). The flags several
commands share are declared in :mod:`moco.utils.common_settings`. This module imports no
torch: ``moco knn --help`` answers at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moco.core.errors import ConfigError
from moco.utils import common_settings as common
from moco.utils.common_settings import check_batch_fits
from moco.utils.settings import (
    REQUIRED,
    Source,
    check_fields,
    declarations,
    from_parameters,
    label,
    setting,
)

PRECISIONS = ("auto", "fp32", "bf16")  # lincls: the frozen backbone under bf16 or not
KNN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # knn: as the pretraining monitor
FEATURES = ("backbone", "head")
EMBED_SUFFIXES = (".npy", ".safetensors")

#: ``moco lincls --preset NAME``: settings applied under the values given
#: (:class:`LinclsConfig`). ``mocov3``: ``main_lincls.py`` of MoCo v3 and its ``CONFIG.md``
#: (MoCo v3 §4): the lr is the base lr of the architecture (``lr`` None), scaled by the
#: global batch / 256.
LINCLS_PRESETS: dict[str, dict[str, object]] = {
    "mocov3": {"epochs": 90, "batch_size": 1024, "cos": True, "momentum": 0.9, "wd": 0.0,
               "lr": None, "lr_scale": "linear"},
}
#: MoCo v3's base lr of the linear classifier: 3 for ViTs, 0.1 for ResNets (``CONFIG.md``).
V3_LINCLS_BASE_LR = {"vit": 3.0, "other": 0.1}
MAP_METHODS = ("auto", "umap", "tsne", "pca")  # moco.eval.maps: the 2-D map's projections
_D, _E, _M, _O, _U = "data and input", "evaluation", "model", "optimisation", "run"


def features_setting() -> Any:
    """``--features backbone|head`` of the commands that compute kNN features (default: what
    the pretraining run's kNN monitor used)."""
    return setting(None, "--features", group=_E, choices=FEATURES, role="evaluation",
                   default_text="what the pretraining run's kNN monitor used, else backbone",
                   help="pooled backbone features or the projection head's output")


@dataclass
class LinclsConfig:
    """Settings of a linear-classification run; defaults are ``main_lincls.py``'s (§8.1),
    ``preset`` applies a recipe under the values given (``LinclsConfig(data=..., preset=
    "mocov3", epochs=10)``: MoCo v3's protocol for 10 epochs)."""

    data: str = setting(REQUIRED, "data", group=_D, metavar="DATA", role="data", per_rank=True,
                        help="dataset folder with labeled train/ and val/ or test/ (or a "
                        "torchvision CIFAR python folder)")
    pretrained: str = setting(
        "", "--pretrained", group=_M, metavar="CKPT", default_text="the encoder of the "
        "--resume checkpoint", help="MoCo checkpoint (ours, main_moco.py's or the CIFAR demo's)")
    arch: str | None = setting(None, "-a", "--arch", group=_M, default_text="from CKPT",
                               help="expected architecture")
    preset: str = setting(
        "", "--preset", group=_O, choices=("", *LINCLS_PRESETS), help="mocov3: MoCo v3's "
        "protocol (main_lincls.py of v3): SGD momentum 0.9, wd 0, batch 1024, 90 epochs, half "
        "cosine per epoch, lr = base x batch / 256 with base 0.1 for ResNets and 3 for ViTs; "
        "the flags given override it")
    epochs: int = setting(100, "--epochs", group=_O, min=1, help="number of epochs")
    batch_size: int = common.batch_size(256, group=_O, help="GLOBAL batch size over all "
                                        "processes (the result equals one process's)")
    lr: float | None = setting(
        30.0, "--lr", "--learning-rate", group=_O, min=0, help="initial learning rate (the "
        "base lr with --lr-scale linear); none (the mocov3 preset): MoCo v3's base lr for the "
        "architecture, 3 for ViTs and 0.1 for the others")
    lr_scale: str = setting("none", "--lr-scale", group=_O, choices=("none", "linear"),
                            help="none: --lr as given (main_lincls.py of v1/v2); linear: lr = "
                            "--lr x batch / 256 (the global batch; MoCo v3's rule)")
    schedule: list[int] = setting([60, 80], "--schedule", group=_O, min=0, help="epochs at "
                                  "which the lr is multiplied by 0.1 (ignored with --cos)")
    cos: bool = setting(False, "--cos", group=_O, help="cosine lr schedule instead of steps")
    momentum: float = setting(0.9, "--momentum", group=_O, min=0, max=1, max_open=True,
                              help="SGD momentum")
    wd: float = setting(0.0, "--wd", "--weight-decay", group=_O, min=0, help="weight decay")
    workers: int = common.workers(group=_D)
    seed: int = common.seed(group=_O, help="seed for the fc init, order and augmentation")
    device: str = common.device(group=_U)
    output: str = setting("runs/lincls", "--output", group=_U, role="runtime",
                          help="run folder")
    resume: str = setting(
        "", "--resume", group=_U, metavar="PATH|auto", role="runtime", help="continue from a "
        "checkpoint.pth.tar written by moco lincls; auto: from OUTPUT/checkpoint.pth.tar when "
        "it exists, else start from --pretrained")
    evaluate: bool = setting(False, "-e", "--evaluate", group=_U, role="runtime",
                             help="only evaluate the model of --resume on the val split")
    fast: bool = setting(
        False, "--fast", group=_O, help="compute the frozen features once (no augmentation) and "
        "train the linear layer on them: same optimizer and schedule, much faster on CPUs")
    image_size: int | None = common.image_size(None, group=_D, help="input size")
    precision: str = common.precision(
        "auto", PRECISIONS, group=_U, help="the frozen backbone's forward: bf16 autocast, or "
        "fp32 (the original's numerics); auto = bf16 on a GPU that supports it, fp32 on the "
        "CPU. fc, its loss and update are always fp32")
    dist_timeout: float = common.dist_timeout(
        group=_U, help="under torchrun: minutes a process waits for the others before failing")

    def __post_init__(self) -> None:
        check_fields(self, from_parameters("LinclsConfig"))

    def base_lr(self, vit: bool) -> float:
        """The lr before the batch rule: ``lr``, or MoCo v3's for the architecture when None."""
        if self.lr is not None:
            return self.lr
        return V3_LINCLS_BASE_LR["vit" if vit else "other"]

    def effective_lr(self, vit: bool) -> float:
        """The classifier's initial lr: the base lr, x batch / 256 with ``lr_scale`` linear."""
        base = self.base_lr(vit)
        return base * self.batch_size / 256 if self.lr_scale == "linear" else base

    def validate(self, source: Source | None = None) -> None:
        """Check every field again (they may have been assigned since) and the settings
        together; errors name the flags, or the parameters with a :func:`from_parameters`
        ``source`` (the default)."""
        source = source or from_parameters("LinclsConfig")
        check_fields(self, source)
        names = {k: label(k, s, source) for k, s in declarations(LinclsConfig).items()}
        if not (self.pretrained or self.resume):
            raise ConfigError(f"give {names['pretrained']} (a MoCo checkpoint) or "
                              f"{names['resume']} (a checkpoint written by moco lincls)")
        if self.evaluate and not self.resume:
            raise ConfigError(f"{names['evaluate']} needs {names['resume']} with a checkpoint "
                              "written by moco lincls")


def _lincls_init_with_preset(init: Any) -> Any:
    """``LinclsConfig(preset=NAME, **values)`` = the defaults <- the preset <- ``values``."""
    def __init__(self: LinclsConfig, *args: Any, **values: Any) -> None:
        preset = values.get("preset") or ""
        if preset:
            if not isinstance(preset, str) or preset not in LINCLS_PRESETS:
                raise ConfigError(f"expected --preset to be one of {', '.join(LINCLS_PRESETS)}, "
                                  f"got {preset!r}")
            values = {**LINCLS_PRESETS[preset], **values}
        init(self, *args, **values)

    __init__.__doc__ = init.__doc__
    __init__.__wrapped__ = init  # type: ignore[attr-defined]
    return __init__


LinclsConfig.__init__ = _lincls_init_with_preset(LinclsConfig.__init__)  # type: ignore[method-assign]


@dataclass
class KnnConfig:
    """The settings of ``moco knn`` and :func:`knn_evaluate`, declared once."""

    data: str = setting(REQUIRED, "data", group=_D, metavar="DATA", role="data",
                        help="dataset folder with labeled train/ and val/ or test/ (or a "
                        "torchvision CIFAR python folder)")
    pretrained: str = setting(REQUIRED, "--pretrained", group=_E, metavar="CKPT",
                              help="checkpoint to evaluate")
    arch: str | None = setting(None, "-a", "--arch", group=_E, default_text="from CKPT",
                               help="expected architecture")
    k: int = setting(200, "--k", "--knn-k", group=_E, min=1, role="evaluation",
                     help="neighbours")
    t: float = setting(0.1, "--t", "--knn-t", group=_E, min=0, min_open=True,
                       role="evaluation", help="temperature")
    features: str | None = features_setting()
    image_size: int | None = common.image_size(None, group=_D, help="input size")
    batch_size: int = common.batch_size(256, group=_D, help="feature-extraction batch")
    workers: int = common.workers(group=_D)
    device: str = common.device(group=_U)
    bank_chunk: int = setting(65536, "--bank-chunk", group=_U, min=1, role="runtime",
                              help="bank rows compared at once")
    precision: str | None = common.precision(
        None, KNN_PRECISIONS, group=_U, default_text="the pretraining run's --precision, as its "
        "kNN monitor", help="autocast of the feature extraction (auto: bf16/fp16 on a GPU, "
        "fp32 on the CPU)")
    half_bank: bool = setting(False, "--half-bank", group=_U, role="runtime", help="store the "
                              "bank in float16 (half the memory; scores are computed in "
                              "float32 on each chunk)")

    def __post_init__(self) -> None:
        check_fields(self, from_parameters("KnnConfig"))


@dataclass
class EmbedConfig:
    """The settings of ``moco embed`` and :func:`embed_images`, declared once."""

    images: str = setting(REQUIRED, "images", group=_D, metavar="IMAGES", role="data",
                          help="folder of images (searched recursively), one image, or tar "
                          "shards (a .tar file or a folder of them, e.g. OUT/val of moco "
                          "shard; rows named SHARD.tar:KEY.jpg)")
    pretrained: str = setting(REQUIRED, "--pretrained", group=_E, metavar="CKPT",
                              help="checkpoint")
    out: str = setting(REQUIRED, "--out", "-o", group=_E, metavar="FILE", role="runtime",
                       help="output .npy or .safetensors")
    arch: str | None = setting(None, "-a", "--arch", group=_E, default_text="from CKPT",
                               help="expected architecture")
    features: str = setting("backbone", "--features", group=_E, choices=FEATURES,
                            help="pooled backbone features or the projection head's output")
    normalize: bool = setting(False, "--normalize", group=_E, help="L2-normalise each vector")
    image_size: int | None = common.image_size(None, group=_D, help="input size")
    batch_size: int = common.batch_size(64, group=_D, help="images per batch")
    workers: int = common.workers(group=_D)
    device: str = common.device(group=_U)
    skip_bad: bool = setting(False, "--skip-bad", group=_D, role="runtime", help="skip "
                             "unreadable images (listed in the output) instead of stopping")
    plot: str = setting("", "--plot", group=_E, metavar="FILE.png", role="runtime",
                        help="also draw a 2-D map of the embeddings: one point per image, "
                        "coloured by class folder, a few images at their points")
    plot_method: str = setting("auto", "--plot-method", group=_E, choices=MAP_METHODS,
                               role="runtime", help="the map's projection: auto = UMAP when "
                               "umap-learn is installed, else t-SNE (scikit-learn), else PCA "
                               "(pip install 'momentum-contrast[plots]' for the first two)")

    def __post_init__(self) -> None:
        check_fields(self, from_parameters("EmbedConfig"))

    def validate(self, source: Source | None = None) -> None:
        """Check every field again and the output's name (errors name the flags, or the
        parameters with a :func:`from_parameters` ``source``, the default)."""
        source = source or from_parameters("EmbedConfig")
        check_fields(self, source)
        if Path(self.out).suffix not in EMBED_SUFFIXES:
            out = label("out", declarations(EmbedConfig)["out"], source)
            raise ConfigError(f"{out} {self.out}: the file must end in .npy or .safetensors")
        if self.plot and Path(self.plot).suffix.lower() != ".png":
            plot = label("plot", declarations(EmbedConfig)["plot"], source)
            raise ConfigError(f"{plot} {self.plot}: the map is a PNG image; give a name ending "
                              "in .png")
        check_batch_fits(self.batch_size, self.image_size)


@dataclass
class NeighboursConfig:
    """The settings of ``moco neighbours`` and :func:`moco.eval.neighbours.neighbour_grid`
    (what to draw and how the features are computed), declared once."""

    queries: int = setting(8, "--queries", group=_E, min=1, max=256, role="evaluation",
                           help="query images (rows)")
    k: int = setting(8, "--k", group=_E, min=1, max=64, role="evaluation",
                     help="neighbours per query (columns)")
    bank_images: int = setting(10000, "--bank-images", group=_E, min=0, role="evaluation",
                               help="images of the training split searched (class-balanced "
                               "when labeled; 0: all)")
    queries_from: str = setting("auto", "--queries-from", group=_E,
                                choices=("auto", "heldout", "bank"), role="evaluation",
                                help="where the queries come from (auto: val/ or test/ when "
                                "DATA has one)")
    features: str | None = features_setting()
    image_size: int | None = common.image_size(None, group=_D, help="input size")
    batch_size: int = common.batch_size(256, group=_D, help="feature-extraction batch")
    workers: int = common.workers(group=_D)
    device: str = common.device(group=_U)
    precision: str | None = common.precision(
        None, KNN_PRECISIONS, group=_U, default_text="the pretraining run's --precision",
        help="autocast of the feature extraction")
    seed: int = common.seed(group=_E, help="which queries and bank images are drawn")
    title: str | None = setting(None, "--title", group=_U, role="runtime",
                                help="a line above the grid")

    def __post_init__(self) -> None:
        check_fields(self, from_parameters("NeighboursConfig"))
