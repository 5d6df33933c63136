"""Which network a checkpoint's encoder is: the architecture given (``--arch``), recorded in
the file, or inferred from its tensors' names and shapes, and the network built from it.

Every backbone of the registry (:func:`moco.core.backbones.register_backbone`: torchvision
ResNets, wide ResNets, ``timm:NAME`` CNNs, your own) is matched by its tensors, without its
head (``fc`` / ``head`` / ``classifier``, :func:`moco.core.backbones.head_name`) and without
``conv1.weight`` (a ResNet may have the CIFAR stem). A timm VisionTransformer that no
registered architecture matches is rebuilt from its tensors (:mod:`moco.eval.vit_spec`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moco.core.backbones import (
    accepted_archs_text,
    available_backbones,
    build_backbone,
    head_name,
    is_known_arch,
)
from moco.core.errors import CheckpointError, ConfigError
from moco.core.timm_backbone import timm_name
from moco.eval.layouts import is_vit_state
from moco.eval.vit_spec import (
    TIMM_FAMILIES,
    ViTSpec,
    build_vit,
    heads_for,
    spec_from_state,
    warn_assumed_heads,
)


@dataclass
class Network:
    """A resolved architecture: its name, and for a ViT rebuilt from its tensors its spec."""

    arch: str
    vit: ViTSpec | None = None


@functools.cache
def _signature(arch: str) -> tuple[str, dict[str, tuple[int, ...]]]:
    """``arch``'s head prefix (``fc.``, ``head.``) and the shapes of its other tensors except
    ``conv1.weight`` (the stem may be the CIFAR one), built on the meta device: no memory, no
    time."""
    model = meta_backbone(arch).model
    head = head_name(model) + "."
    return head, {k: tuple(v.shape) for k, v in model.state_dict().items()
                  if not k.startswith(head) and k != "conv1.weight"}


def _shapes(arch: str, state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The shapes of ``state``'s tensors that :func:`_signature` compares (not the head)."""
    head, _ = _signature(arch)
    return {k: tuple(v.shape) for k, v in state.items()
            if not k.startswith(head) and k != "conv1.weight"}


def matches(arch: str, state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` (with or without its head) has ``arch``'s names and shapes."""
    return _signature(arch)[1] == _shapes(arch, state)


def infer_arch(backbone: dict[str, torch.Tensor]) -> str | None:
    """The registered architecture whose tensors have exactly these names and shapes."""
    for arch in available_backbones():
        if matches(arch, backbone):
            return arch
    return None


def first_mismatch(arch: str, backbone: dict[str, torch.Tensor]) -> str:
    sig, got = _signature(arch)[1], _shapes(arch, backbone)
    for k in sig:
        if k not in got:
            return f"{k} is missing"
        if sig[k] != got[k]:
            return f"{k} has shape {list(got[k])}, {arch} needs {list(sig[k])}"
    extra = sorted(set(got) - set(sig))
    return f"unexpected key {extra[0]}" if extra else "no difference"


def resolve(backbone: dict[str, torch.Tensor], arch: str | None, recorded: str | None,
            path: object, recorded_vit: str | None = None) -> Network:
    """The network of ``backbone`` (an encoder's tensors), checked against ``arch``
    (``--arch``) and ``recorded`` (the file's architecture) when given; ``recorded_vit`` is a
    ViT spec the file records (:meth:`ViTSpec.to_json`)."""
    if arch is not None and recorded and recorded != arch:
        raise CheckpointError(f"{path} is a {recorded} checkpoint but --arch is {arch}; pass "
                              f"--arch {recorded} (or leave --arch out)")
    wanted = arch or recorded
    if is_vit_state(backbone) and not _registered_match(wanted, backbone):
        if wanted and not is_vit_name(wanted):
            raise CheckpointError(f"{path} holds a Vision Transformer, not a {wanted}; leave "
                                  "--arch out or name a ViT (vit_small, timm:NAME)")
        return Network(wanted or "vit", _vit_spec(backbone, wanted, path, recorded_vit))
    if arch is not None and not is_known_arch(arch):
        raise ConfigError(f"-a/--arch: unknown architecture {arch!r}; choose one of: "
                          f"{accepted_archs_text()}")
    if wanted and is_known_arch(wanted):
        if not matches(wanted, backbone):
            found = infer_arch(backbone)
            if found is not None:
                raise CheckpointError(f"{path} holds {found} weights (from the tensor shapes) but "
                                      f"{'--arch is' if arch else 'it says it is'} {wanted}")
            raise CheckpointError(f"{path} does not match {wanted}: "
                                  f"{first_mismatch(wanted, backbone)}")
        return Network(str(wanted))
    found = infer_arch(backbone)
    if found is None:
        name = f" ({wanted!r} is not a known architecture)" if wanted else ""
        raise CheckpointError(f"cannot tell the architecture of {path}{name}: its tensors match "
                              f"none of {', '.join(available_backbones())} (a timm:NAME "
                              "backbone must be named: pass -a timm:NAME)")
    return Network(found)


def _registered_match(name: str | None, state: dict[str, torch.Tensor]) -> bool:
    return bool(name) and name in available_backbones() and matches(str(name), state)


def is_vit_name(name: str) -> bool:
    """Whether ``name`` names a Vision Transformer (``vit``, ``vit_small``, ``timm:vit_*``,
    ``timm:deit_*``)."""
    return timm_name(name).startswith(("vit", "deit"))


def _vit_spec(backbone: dict[str, torch.Tensor], name: str | None, path: object,
              recorded: str | None) -> ViTSpec:
    """The spec of a ViT's tensors: recorded in the file, else read from the shapes with the
    heads of ``name`` (:func:`moco.eval.vit_spec.heads_for`)."""
    spec = spec_from_state(backbone, path=path)
    if recorded:
        spec = ViTSpec.from_json(recorded)
        if spec != spec_from_state(backbone, spec.num_heads, path):
            raise CheckpointError(f"{path}: the ViT recorded in the file ({spec.describe()}) does "
                                  "not match its tensors")
        return spec
    family = next((f for f in TIMM_FAMILIES.values() if name and name.startswith(f)), None)
    if family and TIMM_FAMILIES.get(spec.embed_dim) != family:
        raise CheckpointError(f"{path} holds a ViT of width {spec.embed_dim} "
                              f"({TIMM_FAMILIES.get(spec.embed_dim, 'no standard size')}), not "
                              f"a {name}")
    heads, source = heads_for(name, spec.embed_dim)
    spec = spec_from_state(backbone, heads, path)
    if source == "assumed":
        warn_assumed_heads(spec, path)
    return spec


def build_network(net: Network, cifar_stem: bool = False) -> nn.Module:
    """The network of ``net`` with random weights and its default head (a registered
    backbone) or no head (a ViT rebuilt from its spec: ``head`` is the identity)."""
    if net.vit is not None:
        return build_vit(net.vit)
    return build_backbone(net.arch, cifar_stem=cifar_stem).model


def pooled_dim(net: Network) -> int:
    """Width D of the features that enter the head (2048 for ResNet-50, 384 for ViT-S)."""
    return net.vit.embed_dim if net.vit is not None else _pooled_dim(net.arch)


def network_head_name(net: Network) -> str:
    return "head" if net.vit is not None else _signature(net.arch)[0][:-1]


@functools.cache
def _pooled_dim(arch: str) -> int:
    return int(meta_backbone(arch).feature_dim)


def meta_backbone(arch: str) -> Any:
    """``build_backbone(arch)`` on the meta device; a name the registry or timm refuses is a
    :class:`~moco.core.errors.ConfigError` naming ``-a/--arch``."""
    try:
        with torch.device("meta"):
            return build_backbone(arch)
    except ValueError as e:
        raise ConfigError(f"-a/--arch {arch}: {e}") from None
