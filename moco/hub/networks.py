"""The networks that released and shared weights load into, and what travels with them.

Two families: ``torchvision`` (a ResNet built by :func:`moco.core.backbones.build_backbone`,
``fc`` = identity: [B,3,H,W] -> pooled features [B, D]) and ``timm`` (a timm model built
with ``num_classes=0``: the MoCo v3 ViTs, whose output is the [CLS] token after the final
norm (MoCo v3 §4), and ``-a timm:NAME`` CNNs). :class:`ModelInfo` is what a loaded model
carries as ``model.moco_info`` beside its preprocessing ``model.transform``, like
torchvision's ``Weights.transforms()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from moco.core.backbones import build_backbone, set_head
from moco.core.errors import CheckpointError, ConfigError
from moco.core.timm_backbone import create_timm_model
from moco.data.recipes import IMAGENET_MEAN, IMAGENET_STD
from moco.utils.checkpoint import state_mismatch

FAMILIES = ("torchvision", "timm")

#: torchvision ResNets that timm has under the same name with the same tensor names and
#: shapes (tests/hub checks each against timm), so a folder of their weights is also a timm
#: model folder.
TIMM_SAME_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                   "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2")


@dataclass
class ModelInfo:
    """What a loaded backbone is: ``family`` and ``arch`` (a torchvision or timm name) with
    ``model_args`` (timm keyword arguments), the CIFAR stem, the feature width D, the
    preprocessing (``image_size``, ``mean``, ``std``) and where it came from. ``released``
    is the registry entry (:class:`moco.hub.registry.ReleasedWeights`) of the authors'
    weights, ``config`` the ``moco`` section of a Hub folder's ``config.json``."""

    family: str
    arch: str
    feature_dim: int
    method: str = "MoCo"
    model_args: dict[str, Any] = field(default_factory=dict)
    cifar_stem: bool = False
    image_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    epochs: int | None = None
    source: str = ""
    released: Any = None
    config: dict[str, Any] | None = None

    @property
    def timm_compatible(self) -> bool:
        """Whether timm builds the same network under ``arch`` (its weights load there)."""
        return self.family == "timm" or (self.arch in TIMM_SAME_NAMES and not self.cifar_stem)

    def transforms(self) -> Any:
        """The evaluation preprocessing: a PIL image -> a normalised tensor [3, S, S]."""
        from moco.data.augment import eval_transform

        return eval_transform(self.image_size, self.mean, self.std)


def build_network(info: ModelInfo) -> nn.Module:
    """The network of ``info`` at random initialisation, without a head, in eval mode."""
    if info.family == "torchvision":
        model = build_backbone(info.arch, cifar_stem=info.cifar_stem).model
        model.fc = nn.Identity()
    elif info.family == "timm":
        model = create_timm_model(info.arch, num_classes=0, **info.model_args)
    else:
        raise ConfigError(f"unknown network family {info.family!r}; expected one of "
                          f"{', '.join(FAMILIES)}")
    return model.eval()


def feature_width(model: nn.Module, family: str, arch: str) -> int:
    """D, the width of what the headless ``model`` outputs."""
    if family == "timm":
        return int(cast(int, model.num_features))
    with torch.device("meta"):
        return build_backbone(arch).feature_dim


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], where: str | Path,
                what: str) -> nn.Module:
    """``model.load_state_dict(state, strict=True)``; a mismatch is a one-line
    :class:`CheckpointError` naming ``where`` and the first differing key."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise CheckpointError(f"{where} does not load into {what}: "
                              f"{state_mismatch(model, state)}") from None
    return model


def attach_head(model: nn.Module, info: ModelInfo, num_classes: int) -> nn.Module:
    """Give ``model`` a fresh classifier Linear(D, ``num_classes``), initialised as
    ``main_lincls.py`` does (weight N(0, 0.01), bias 0): output [B, num_classes]."""
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    head = nn.Linear(info.feature_dim, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    if info.family == "timm":
        model.reset_classifier(num_classes)  # type: ignore[operator]
        set_head(model, head)
    else:
        model.fc = head
    return model


def finish(model: nn.Module, info: ModelInfo, num_classes: int | None,
           device: str | torch.device) -> nn.Module:
    """The model returned to users: the head (removed, or fresh with ``num_classes``),
    ``model.transform`` and ``model.moco_info`` attached, on ``device``, in eval mode."""
    from moco.utils.runtime import resolve_device

    if num_classes is not None:
        attach_head(model, info, num_classes)
    vars(model).update(transform=info.transforms(), moco_info=info)  # plain attributes
    return model.to(resolve_device(device)).eval()
