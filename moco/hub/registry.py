"""The authors' released MoCo checkpoints, by name.

Each :class:`ReleasedWeights` says where the file is, how to check it, what network it holds
and what the authors measured with it (ImageNet-1k linear top-1, %). Where each field comes
from:

* ``url``, ``md5`` (v1/v2: the first 8 hex digits, all the README publishes), ``top1``: the
  text of the MoCo repository's README ("Models" table) and of the MoCo v3 repository's
  ``CONFIG.md`` (v3: no checksum published), copied as they read;
* ``paper_top1``, ``finetune_top1``: the papers (MoCo v2 Table 2: 67.5 for 200 epochs; the
  README's mean of 5 runs is 67.5 too, its released file 67.7) and the MoCo v3 README;
* ``recipe``, ``timm_args``: the papers and the repositories' commands (MoCo v3's ViT-S has
  12 heads); ``licence``: the repositories' (CC BY-NC 4.0; the weights state none of their
  own).

**None of the entries has been checked against the files themselves** (``verified=False``):
the registry was written without internet access. A download is still verified against the
published md5 prefix where there is one; a v3 download is logged with its sha256, to be
pinned here once checked.

Names are ``mocov{1,2,3}_{arch}_{epochs}ep``; hyphens are accepted for underscores
(``mocov2-r50-800ep``). Files are in two layouts: ``v1v2`` (``main_moco.py``: ``state_dict``
with ``module.encoder_q.*``, the v1 ``fc`` or v2 ``fc.0``/``fc.2`` head) and ``v3`` (MoCo v3's
``main_moco.py``: ``state_dict`` with ``module.base_encoder.*``, whose ``fc.*`` (ResNet) or
``head.*`` (ViT) is the projector, plus ``module.momentum_encoder.*`` and
``module.predictor.*``).
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any

from moco.core.errors import HubError
from moco.data.recipes import IMAGENET_MEAN, IMAGENET_STD

V1V2_README = "facebookresearch/moco README, 'Models' table"
V3_CONFIG = "facebookresearch/moco-v3 CONFIG.md (and README 'Main Results')"
NOT_VERIFIED = ("URL and checksum copied from the authors' README, not checked against the file "
                "(the registry was written offline)")


@dataclass(frozen=True)
class ReleasedWeights:
    """One released checkpoint.

    ``arch``: a torchvision ResNet name (``resnet50``) or a timm model name with
    ``timm_args`` (the MoCo v3 ViT-S has 12 heads where timm's ``vit_small_patch16_224`` has
    6); ``top1``: the authors' linear top-1 (%) for this file, from ``top1_source``;
    ``paper_top1``: the paper's figure for the same recipe when it differs or is separate;
    ``md5``/``sha256``: the whole digest or the published prefix; ``verified``: whether the
    URL and checksum were checked against the file.
    """

    name: str
    method: str
    arch: str
    epochs: int
    top1: float
    top1_source: str
    url: str
    layout: str
    paper: str
    recipe: str
    md5: str | None = None
    sha256: str | None = None
    paper_top1: float | None = None
    finetune_top1: float | None = None
    timm_args: dict[str, Any] = field(default_factory=dict)
    image_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    licence: str = "cc-by-nc-4.0"
    verified: bool = False
    note: str = NOT_VERIFIED

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def family(self) -> str:
        """``torchvision`` (a torchvision ResNet) or ``timm`` (a timm model, the ViTs)."""
        return "timm" if self.arch.startswith("vit_") else "torchvision"

    @property
    def checksum_text(self) -> str:
        if self.sha256:
            return f"sha256 {self.sha256}"
        if self.md5:
            return f"md5 {self.md5}" + (" (prefix)" if len(self.md5) < 32 else "")
        return "none published"

    def transforms(self) -> Any:
        """The evaluation preprocessing of these weights (as ``main_lincls.py``: resize the
        short side to 256, center-crop 224, normalise with the ImageNet mean/std): a PIL
        image -> a tensor [3, 224, 224]."""
        from moco.data.augment import eval_transform

        return eval_transform(self.image_size, self.mean, self.std)


_V1 = "He et al., Momentum Contrast for Unsupervised Visual Representation Learning, CVPR 2020"
_V2 = "Chen et al., Improved Baselines with Momentum Contrastive Learning, arXiv 2003.04297"
_V3 = ("Chen, Xie, He, An Empirical Study of Training Self-Supervised Vision Transformers, "
       "ICCV 2021")
_DL = "https://dl.fbaipublicfiles.com"


def _v1v2(name: str, method: str, epochs: int, top1: float, md5: str, recipe: str,
          paper_top1: float) -> ReleasedWeights:
    folder = f"moco_{method[-2:].lower()}_{epochs}ep"
    return ReleasedWeights(
        name=name, method=method, arch="resnet50", epochs=epochs, top1=top1,
        top1_source=V1V2_README, paper_top1=paper_top1,
        url=f"{_DL}/moco/moco_checkpoints/{folder}/{folder}_pretrain.pth.tar", md5=md5,
        layout="v1v2", paper=_V1 if method == "MoCo v1" else _V2, recipe=recipe)


def _v3(name: str, arch: str, folder: str, epochs: int, top1: float, recipe: str,
        **extra: Any) -> ReleasedWeights:
    return ReleasedWeights(
        name=name, method="MoCo v3", arch=arch, epochs=epochs, top1=top1,
        top1_source=V3_CONFIG, url=f"{_DL}/moco-v3/{folder}/{folder}.pth.tar", layout="v3",
        paper=_V3, recipe=recipe, **extra)


_V1_RECIPE = "linear head, K 65536, m 0.999, T 0.07, batch 256, lr 0.03 steps at 120/160"
_V2_RECIPE = "MLP head, aug+ (blur), cosine lr, K 65536, m 0.999, T 0.2, batch 256, lr 0.03"
_V3_R50 = "LARS, batch 4096, 2-layer projector and predictor (4096-d, 256-d out), T 1.0"
_V3_VIT = ("AdamW lr 1.5e-4 x batch/256, wd 0.1, batch 4096, 40 warm-up epochs, T 0.2, "
           "random patch projection, momentum 0.99 with cosine")

REGISTRY: dict[str, ReleasedWeights] = {w.name: w for w in (
    _v1v2("mocov1_r50_200ep", "MoCo v1", 200, 60.6, "b251726a", _V1_RECIPE, 60.6),
    _v1v2("mocov2_r50_200ep", "MoCo v2", 200, 67.7, "59fd9945", _V2_RECIPE, 67.5),
    _v1v2("mocov2_r50_800ep", "MoCo v2", 800, 71.1, "a04e12f8", _V2_RECIPE, 71.1),
    _v3("mocov3_r50_100ep", "resnet50", "r-50-100ep", 100, 68.9,
        f"{_V3_R50}, base lr 0.6, wd 1e-6, momentum 0.99"),
    _v3("mocov3_r50_300ep", "resnet50", "r-50-300ep", 300, 72.8,
        f"{_V3_R50}, base lr 0.3, wd 1e-6, momentum 0.99"),
    _v3("mocov3_r50_1000ep", "resnet50", "r-50-1000ep", 1000, 74.6,
        f"{_V3_R50}, base lr 0.3, wd 1.5e-6, momentum 0.996"),
    _v3("mocov3_vit_small_300ep", "vit_small_patch16_224", "vit-s-300ep", 300, 73.2,
        f"ViT-S/16 (12 heads), {_V3_VIT}", finetune_top1=81.4, timm_args={"num_heads": 12}),
    _v3("mocov3_vit_base_300ep", "vit_base_patch16_224", "vit-b-300ep", 300, 76.7,
        f"ViT-B/16, {_V3_VIT}", finetune_top1=83.2),
)}


def canonical_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def list_weights(pattern: str = "*") -> list[str]:
    """Names of the released weights matching a shell-style ``pattern`` (``"mocov3*"``)."""
    pat = canonical_name(pattern)
    return [n for n in REGISTRY if fnmatch.fnmatchcase(n, pat)]


def get_weights(name: str) -> ReleasedWeights:
    """The entry called ``name`` (hyphens or underscores); :class:`HubError` with the closest
    names otherwise."""
    key = canonical_name(name)
    if key in REGISTRY:
        return REGISTRY[key]
    close = difflib.get_close_matches(key, list(REGISTRY), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise HubError(f"no released weights named {name!r}; {hint}list them with: moco zoo list")
