"""Backbones by name (``-a/--arch``), optionally with the CIFAR stem (the CIFAR-10 notebook's
``ModelBase``: 3x3 stride-1 conv1, no max-pool).

* torchvision ResNets: ``resnet18`` ... ``resnet152``, ``resnext50_32x4d``,
  ``resnext101_32x8d``, torchvision's ``wide_resnet50_2``/``wide_resnet101_2`` (bottleneck
  widened only), and ``resnext50_32x8d`` (the MoCo paper's RX50, torchvision's ResNet class
  with 32 groups of width 8);
* the MoCo/CPC papers' wide ResNets, every layer k times wider: ``resnet50w2``,
  ``resnet50w4`` (and ``resnet18w2/w4``, ``resnet34w2/w4``), see :mod:`moco.core.wide_resnet`;
* the ViTs of MoCo v3: ``vit_tiny``, ``vit_small``, ``vit_base`` (timm's VisionTransformer
  with MoCo v3's position embedding and initialisation, any patch size), see
  :mod:`moco.core.vit`;
* ``timm:NAME``: any timm model (optional dependency; MoCo v1/v2's Shuffling BN needs one
  with BatchNorm), see :mod:`moco.core.timm_backbone`.

What a name needs beyond itself (image and patch size, the random patch projection,
zero-initialised residual blocks, ...) comes in a :class:`BackboneOptions`.

Every backbone ends in a Linear head: ``fc`` for torchvision-style networks, ``head`` for
ViTs (see :func:`head_name`); MoCo replaces it by its projection head, so checkpoints keep
the original key names (``encoder_q.conv1.weight``, ..., ``encoder_q.fc.weight``;
``base_encoder.head.0.weight`` for a MoCo v3 ViT). The CIFAR stem replaces ``conv1``
by a 3x3 stride-1 conv and drops the max-pool; unlike the demo's ``net.N`` layout it keeps
torchvision's names, so the same loaders and exporters work for both stems.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from moco.core.errors import ConfigError
from moco.core.timm_backbone import PREFIX as TIMM_PREFIX
from moco.core.timm_backbone import build_timm_backbone, is_timm_arch
from moco.core.vit import VIT_SIZES, freeze_patch_projection, vision_transformer
from moco.core.wide_resnet import WIDE_RESNETS, wide_resnet

NormLayer = Callable[[int], nn.Module]
#: A factory of the original form: ``factory(norm_layer)`` -> network.
BackboneFactory = Callable[[NormLayer | None], nn.Module]


@dataclass(frozen=True)
class BackboneOptions:
    """What building a backbone may need beyond its name.

    * ``cifar_stem``: 3x3 stride-1 ``conv1`` and no max-pool (torchvision-style ResNets);
    * ``norm_layer``: the BatchNorm replacement of torchvision-style ResNets (None: BatchNorm2d);
    * ``image_size``: the input size of a ViT (its patch grid and position embedding; default
      224). CNNs take any size and ignore it;
    * ``patch_size``: the patch size of ``vit_*`` (default 16; 4 suits 32-px CIFAR);
    * ``stop_grad_conv1``: the random patch projection of ViTs (MoCo v3 §4.2);
    * ``zero_init_residual``: the last BatchNorm of every torchvision residual block starts at
      0 (torchvision's option, MoCo v3's ResNets); networks without such blocks ignore it
      (timm's ResNets zero it already);
    * ``require_batchnorm``: refuse a ``timm:NAME`` network without BatchNorm, which MoCo
      v1/v2's Shuffling BN needs; MoCo v3 and evaluation pass False.
    """

    cifar_stem: bool = False
    norm_layer: NormLayer | None = None
    image_size: int | None = None
    patch_size: int | None = None
    stop_grad_conv1: bool = False
    zero_init_residual: bool = False
    require_batchnorm: bool = True


#: A factory that receives every option: ``factory(options)`` -> network.
OptionsFactory = Callable[[BackboneOptions], nn.Module]

_REGISTRY: dict[str, OptionsFactory] = {}


def register_backbone(name: str, factory: BackboneFactory | OptionsFactory, *,
                      takes_options: bool = False) -> None:
    """Make ``name`` available to :func:`build_backbone` (and ``--arch``).

    ``factory(norm_layer)`` must return a network whose head (its last layer, a Linear) is
    named ``fc``, ``head`` or ``classifier`` (see :func:`head_name`), and accept
    ``norm_layer=None`` for the default BatchNorm2d. With ``takes_options=True`` it is called
    as ``factory(options)`` with a :class:`BackboneOptions` instead (image size, patch size,
    ...); the options a plain factory cannot take are refused for it.
    """
    if takes_options:
        _REGISTRY[name] = factory  # type: ignore[assignment]
        return
    plain: BackboneFactory = factory  # type: ignore[assignment]

    def build(options: BackboneOptions) -> nn.Module:
        if options.patch_size is not None:
            raise ConfigError(f"--patch-size is for the ViTs (vit_tiny, vit_small, vit_base), "
                              f"not {name}")
        return plain(options.norm_layer)

    _REGISTRY[name] = build


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


def _vit(name: str) -> OptionsFactory:
    def build(o: BackboneOptions) -> nn.Module:
        if o.norm_layer is not None:
            raise ConfigError(f"{name}: a custom norm_layer is for torchvision ResNets only")
        return vision_transformer(name, o.image_size, o.patch_size)

    return build


for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
              "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d"):
    register_backbone(_name, _torchvision(_name))
for _name in WIDE_RESNETS:
    register_backbone(_name, _wide(_name))
register_backbone("resnext50_32x8d", _resnext50_32x8d)
for _name in VIT_SIZES:
    register_backbone(_name, _vit(_name), takes_options=True)


def available_backbones() -> list[str]:
    """The registered names (``timm:NAME`` is accepted too but not listed)."""
    return sorted(_REGISTRY)


def accepted_archs_text() -> str:
    return (f"{', '.join(available_backbones())}, or {TIMM_PREFIX}NAME for a timm model (MoCo "
            "v1/v2 need one with BatchNorm)")


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
    """A network ending in its head (``fc``, ``head`` or ``classifier``, a Linear) plus the
    width of the features that enter the head."""

    model: nn.Module
    feature_dim: int


def build_backbone(name: str, *, cifar_stem: bool = False, norm_layer: NormLayer | None = None,
                   options: BackboneOptions | None = None) -> Backbone:
    """Build the named backbone with random weights (no download). ``cifar_stem`` and
    ``norm_layer`` are shorthands for those fields of ``options``."""
    check_arch(name)
    o = options or BackboneOptions()
    o = replace(o, cifar_stem=o.cifar_stem or cifar_stem, norm_layer=norm_layer or o.norm_layer)
    if is_timm_arch(name):
        if o.cifar_stem:
            raise ConfigError(f"--cifar-stem replaces the stem of torchvision ResNets; {name} keeps "
                              "its own: pass --cifar-stem false (or choose a torchvision ResNet)")
        if o.norm_layer is not None:
            raise ConfigError(f"{name}: a custom norm_layer is for torchvision ResNets only")
        if o.patch_size is not None:
            raise ConfigError(f"--patch-size: the patch size of {name} is part of its timm name")
        model: nn.Module = build_timm_backbone(name, require_batchnorm=o.require_batchnorm,
                                               image_size=o.image_size)
    else:
        model = _REGISTRY[name](o)
    _apply_options(name, model, o)
    head = get_head(model)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"backbone {name!r} must end in a Linear head named fc, head or "
                          f"classifier, not a {type(head).__name__}")
    return Backbone(model=model, feature_dim=head.in_features)


def _apply_options(name: str, model: nn.Module, o: BackboneOptions) -> None:
    """The options every network takes after its factory: the CIFAR stem, the zero-init of
    residual blocks, the random patch projection."""
    if o.cifar_stem:
        conv1 = getattr(model, "conv1", None)
        if not isinstance(conv1, nn.Conv2d):
            raise ConfigError(f"--cifar-stem replaces the conv1 of ResNets; {name} has none "
                              "(ViTs: choose the patch size instead, e.g. --patch-size 4)")
        model.conv1 = nn.Conv2d(3, conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    if o.zero_init_residual:
        zero_init_residual(model)
    if o.stop_grad_conv1:
        freeze_patch_projection(model)


@torch.no_grad()
def zero_init_residual(model: nn.Module) -> None:
    """Zero the last BatchNorm's weight of every torchvision residual block (``bn3`` of a
    Bottleneck, ``bn2`` of a BasicBlock): each block starts as the identity (torchvision's
    ``zero_init_residual``, Goyal et al. 2017)."""
    for m in model.modules():
        last = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
        if isinstance(last, nn.modules.batchnorm._BatchNorm) and last.weight is not None:
            nn.init.zeros_(last.weight)


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
