"""Backbones by name: torchvision ResNets, optionally with the CIFAR stem (REFERENCE.md §6.2).

Every backbone is a torchvision-style network whose last layer is ``fc``; MoCo replaces that
``fc`` by its projection head, so checkpoints keep the original key names
(``encoder_q.conv1.weight``, ..., ``encoder_q.fc.weight``). The CIFAR stem replaces ``conv1``
by a 3x3 stride-1 conv and drops the max-pool; unlike the demo's ``net.N`` layout it keeps
torchvision's names, so the same loaders and exporters work for both stems.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

NormLayer = Callable[[int], nn.Module]
BackboneFactory = Callable[[NormLayer | None], nn.Module]

_REGISTRY: dict[str, BackboneFactory] = {}


def register_backbone(name: str, factory: BackboneFactory) -> None:
    """Make ``name`` available to :func:`build_backbone` (and ``--arch``).

    ``factory(norm_layer)`` must return a network with a ``fc`` Linear as its last layer and
    accept ``norm_layer=None`` for the default BatchNorm2d.
    """
    _REGISTRY[name] = factory


def _torchvision(name: str) -> BackboneFactory:
    def build(norm_layer: NormLayer | None) -> nn.Module:
        kwargs = {} if norm_layer is None else {"norm_layer": norm_layer}
        model: nn.Module = getattr(torchvision.models, name)(weights=None, **kwargs)
        return model

    return build


for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
              "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d"):
    register_backbone(_name, _torchvision(_name))


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


@dataclass
class Backbone:
    """A network ending in ``fc`` plus the width of the features that enter ``fc``."""

    model: nn.Module
    feature_dim: int


def build_backbone(name: str, *, cifar_stem: bool = False, norm_layer: NormLayer | None = None) -> Backbone:
    """Build the named backbone with random weights (no download)."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown architecture {name!r}; choose one of: {', '.join(available_backbones())}"
        )
    model = _REGISTRY[name](norm_layer)
    if cifar_stem:
        width = int(model.conv1.out_channels)  # type: ignore[union-attr,arg-type]
        model.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    fc = model.fc
    if not isinstance(fc, nn.Linear):
        raise ValueError(f"backbone {name!r} must end in a Linear named 'fc'")
    return Backbone(model=model, feature_dim=fc.in_features)


def strip_head(encoder: nn.Module) -> nn.Module:
    """A copy of ``encoder`` whose ``fc`` is the identity: input [B,3,H,W] -> features [B, D]."""
    features = copy.deepcopy(encoder)
    features.fc = nn.Identity()
    return features


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def feature_dim_of(encoder: nn.Module) -> int:
    """Width D of the pooled features of an encoder built by :func:`build_backbone`."""
    with torch.no_grad():
        fc = encoder.fc
        if isinstance(fc, nn.Linear):
            return fc.in_features
        first = fc[0] if isinstance(fc, nn.Sequential) else None
        if isinstance(first, nn.Linear):
            return first.in_features
    raise ValueError("cannot infer the feature width of this encoder")
