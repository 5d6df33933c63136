"""Backbones by name (``-a/--arch``), optionally with the CIFAR stem (the CIFAR-10 notebook's
``ModelBase``: 3x3 stride-1 conv1, no max-pool).

* torchvision ResNets: ``resnet18`` ... ``resnet152``, ``resnext50_32x4d``,
  ``resnext101_32x8d``, torchvision's ``wide_resnet50_2``/``wide_resnet101_2`` (bottleneck
  widened only), and ``resnext50_32x8d`` (the MoCo paper's RX50, torchvision's ResNet class
  with 32 groups of width 8);
* the MoCo/CPC papers' wide ResNets, every layer k times wider: ``resnet50w2``,
  ``resnet50w4`` (and ``resnet18w2/w4``, ``resnet34w2/w4``), see :mod:`moco.core.wide_resnet`;
* ``timm:NAME``: any timm CNN with BatchNorm (optional dependency), see
  :mod:`moco.core.timm_backbone`.

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

import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from moco.core.errors import ConfigError
from moco.core.timm_backbone import PREFIX as TIMM_PREFIX
from moco.core.timm_backbone import build_timm_backbone, is_timm_arch
from moco.core.wide_resnet import WIDE_RESNETS, wide_resnet

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


def _wide(name: str) -> BackboneFactory:
    def build(norm_layer: NormLayer | None) -> nn.Module:
        return wide_resnet(name, norm_layer=norm_layer)

    return build


def _resnext50_32x8d(norm_layer: NormLayer | None) -> nn.Module:
    """ResNeXt-50 32x8d, the MoCo v1 paper's RX50 (Table 1: 46M parameters); torchvision has
    the class but no builder for this width."""
    model: nn.Module = ResNet(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=8,
                              norm_layer=norm_layer)
    return model


for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
              "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d"):
    register_backbone(_name, _torchvision(_name))
for _name in WIDE_RESNETS:
    register_backbone(_name, _wide(_name))
register_backbone("resnext50_32x8d", _resnext50_32x8d)


def available_backbones() -> list[str]:
    """The registered names (``timm:NAME`` is accepted too but not listed)."""
    return sorted(_REGISTRY)


def accepted_archs_text() -> str:
    return f"{', '.join(available_backbones())}, or {TIMM_PREFIX}NAME for a timm CNN with BatchNorm"


def is_known_arch(name: str) -> bool:
    """Whether ``name`` is registered or has the ``timm:`` form (timm checks the rest)."""
    return name in _REGISTRY or (is_timm_arch(name) and len(name) > len(TIMM_PREFIX))


def check_arch(name: str) -> None:
    """Raise :class:`ConfigError` (a ValueError) naming what is accepted unless ``name`` is a
    known architecture."""
    if not is_known_arch(name):
        raise ConfigError(f"unknown architecture {name!r}; choose one of: {accepted_archs_text()}")


@dataclass
class Backbone:
    """A network ending in ``fc`` plus the width of the features that enter ``fc``."""

    model: nn.Module
    feature_dim: int


def build_backbone(name: str, *, cifar_stem: bool = False, norm_layer: NormLayer | None = None) -> Backbone:
    """Build the named backbone with random weights (no download)."""
    check_arch(name)
    if is_timm_arch(name):
        if cifar_stem:
            raise ConfigError(f"--cifar-stem replaces the stem of torchvision ResNets; {name} keeps "
                              "its own: pass --cifar-stem false (or choose a torchvision ResNet)")
        if norm_layer is not None:
            raise ConfigError(f"{name}: a custom norm_layer is for torchvision ResNets only")
        model: nn.Module = build_timm_backbone(name)
    else:
        model = _REGISTRY[name](norm_layer)
    if cifar_stem:
        width = int(model.conv1.out_channels)  # type: ignore[union-attr,arg-type]
        model.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    fc = model.fc
    if not isinstance(fc, nn.Linear):
        raise ConfigError(f"backbone {name!r} must end in a Linear named 'fc'")
    return Backbone(model=model, feature_dim=fc.in_features)


#: Where networks keep their classification (or, in MoCo, projection) head, in the order
#: looked for: torchvision ResNets ``fc``, timm ViTs and ConvNeXts ``head``, timm
#: EfficientNets/MobileNets ``classifier``. A network may name its own with a ``moco_head``
#: attribute (a dotted path, e.g. ``"head.fc"``).
HEAD_NAMES = ("fc", "head", "classifier")


def head_name(model: nn.Module) -> str:
    """The attribute path of ``model``'s head: its ``moco_head`` if it has one, else the first
    of :data:`HEAD_NAMES` it holds as a module. :class:`ConfigError` when none is found: which
    layer is the head cannot be told."""
    declared = getattr(model, "moco_head", None)
    if isinstance(declared, str):
        return declared
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ConfigError(
        f"this {type(model).__name__} has no head layer ({', '.join(HEAD_NAMES)}), so its "
        "projection head cannot be told apart; name the head 'fc' (as torchvision's ResNets "
        "and build_encoder do), set model.moco_head = 'path.to.head', or take the features "
        "from your own backbone")


def get_head(model: nn.Module) -> nn.Module:
    """The head module of ``model`` (see :func:`head_name`)."""
    head: nn.Module = model.get_submodule(head_name(model))
    return head


def set_head(model: nn.Module, head: nn.Module) -> None:
    """Replace ``model``'s head (see :func:`head_name`) by ``head``, in place."""
    parent_name, _, attr = head_name(model).rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, head)


def strip_head(encoder: nn.Module) -> nn.Module:
    """A copy of ``encoder`` whose head is the identity: input [B,3,H,W] -> features [B, D]
    (pooled features for ResNets, the [CLS] token after the final norm for ViTs).
    An encoder without a recognisable head is a :class:`ConfigError` (see :func:`head_name`)."""
    head_name(encoder)  # the error before the copy
    features = copy.deepcopy(encoder)
    set_head(features, nn.Identity())
    return features


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def feature_dim_of(encoder: nn.Module) -> int:
    """Width D of the features that enter ``encoder``'s head: the head's first Linear's input
    width (a Linear head, or a Sequential MLP that starts with one)."""
    head = get_head(encoder)
    first = head
    while isinstance(first, nn.Sequential) and len(first) > 0:
        first = first[0]
    if isinstance(first, nn.Linear):
        return first.in_features
    raise ConfigError(f"cannot infer the feature width of this encoder: its head "
                      f"{head_name(encoder)!r} does not start with a Linear layer")
