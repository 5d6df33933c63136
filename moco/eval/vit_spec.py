"""Vision Transformers read from their tensors: timm's ``VisionTransformer`` rebuilt from a
state dict under timm's names (MoCo v3's ViT-S/ViT-B base encoder, DeiT, any timm ``vit_*``).

Everything but the number of attention heads is in the shapes: width D (``cls_token``), depth
(``blocks.N``), patch size and input channels (``patch_embed.proj.weight``), image size (the
tokens of ``pos_embed``), MLP ratio (``blocks.0.mlp.fc1``), qkv bias, layer scale, register
tokens, the pooling (``fc_norm`` means average pooling). The heads split D without changing
any shape, so they come from what the checkpoint records (our exports), else from the
architecture's name: MoCo v3 §4's ``vit_small`` and ``vit_base`` have 12 heads (ViT-S has 12,
where DeiT-S has 6), another registered ViT (``vit_tiny``, one added with
``register_backbone``) the count of its network, a ``timm:NAME`` model timm's own count; else D / 64 (the ViT and DeiT
convention), with a warning.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from moco.core.errors import CheckpointError, ConfigError
from moco.core.timm_backbone import INSTALL_HINT, is_timm_arch, timm_name

_log = logging.getLogger(__name__)

#: MoCo v3's ViTs (``vits.py``, §4): attention heads per architecture name.
MOCOV3_HEADS = {"vit_small": 12, "vit_base": 12}
#: The standard ViT widths and timm's model family of each (for names and the timm export).
TIMM_FAMILIES = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large",
                 1280: "vit_huge"}


@dataclass(frozen=True)
class ViTSpec:
    """The arguments of timm's ``VisionTransformer`` that rebuild a network from its tensors.
    ``layer_scale``: the blocks have ``ls1``/``ls2`` (their values are loaded)."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    class_token: bool = True
    reg_tokens: int = 0
    global_pool: str = "token"
    fc_norm: bool = False
    layer_scale: bool = False
    in_chans: int = 3

    def kwargs(self) -> dict[str, Any]:
        """``VisionTransformer(**kwargs)`` without the classifier (``num_classes=0``)."""
        out = asdict(self)
        out["init_values"] = 1e-5 if out.pop("layer_scale") else None
        out["fc_norm"] = True if self.fc_norm else None
        return {**out, "num_classes": 0}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ViTSpec:
        return cls(**json.loads(text))

    def describe(self) -> str:
        return (f"ViT {self.embed_dim}-d x {self.depth} blocks, {self.num_heads} heads, patch "
                f"{self.patch_size}, {self.img_size} px")


def _square(n: int) -> int | None:
    r = math.isqrt(n)
    return r if r * r == n else None


def spec_from_state(state: dict[str, torch.Tensor], num_heads: int | None = None,
                    path: object = "checkpoint") -> ViTSpec:
    """The :class:`ViTSpec` of a VisionTransformer's tensors (head excluded or not), with
    ``num_heads`` (default: D / 64). :class:`CheckpointError` for tensors no standard ViT has."""
    proj = state["patch_embed.proj.weight"]  # [D, C, p, p]
    if proj.dim() != 4 or proj.shape[-1] != proj.shape[-2]:
        raise CheckpointError(f"{path}: patch_embed.proj.weight {list(proj.shape)} is not a "
                              "square patch projection")
    dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    class_token = "cls_token" in state
    reg = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    tokens = int(state["pos_embed"].shape[1]) if "pos_embed" in state else 0
    grid = _square(tokens - int(class_token) - reg)
    if not grid:
        raise CheckpointError(f"{path}: pos_embed has {tokens} tokens, not a square grid of "
                              "patches after the class and register tokens")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    fc_norm = "fc_norm.weight" in state
    heads = num_heads or max(1, dim // 64)
    if dim % heads:
        raise CheckpointError(f"{path}: {heads} attention heads do not divide the width {dim}")
    return ViTSpec(
        img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
        mlp_ratio=int(state["blocks.0.mlp.fc1.weight"].shape[0]) / dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        qk_norm="blocks.0.attn.q_norm.weight" in state, class_token=class_token,
        reg_tokens=reg, global_pool="avg" if fc_norm or not class_token else "token",
        fc_norm=fc_norm, layer_scale="blocks.0.ls1.gamma" in state, in_chans=int(proj.shape[1]))


def heads_for(arch: str | None, dim: int) -> tuple[int, str]:
    """The number of attention heads of a ViT named ``arch`` (or unnamed) of width ``dim``, and
    where it comes from (for the log)."""
    if arch in MOCOV3_HEADS:
        return MOCOV3_HEADS[arch], f"MoCo v3's {arch}"
    registered = _registered_heads(arch)
    if registered is not None:
        return registered, f"the registered {arch}"
    if arch and is_timm_arch(arch):
        timm = _timm()
        with torch.device("meta"):
            model = timm.create_model(timm_name(arch), pretrained=False)
        return int(model.blocks[0].attn.num_heads), f"timm's {timm_name(arch)}"
    return max(1, dim // 64), "assumed"


def _registered_heads(arch: str | None) -> int | None:
    """The attention heads of ``arch`` when it is a registered ViT backbone (``vit_tiny``, or
    one added with ``register_backbone``), read from the network built on the meta device;
    None for any other name."""
    from moco.core.backbones import available_backbones, build_backbone

    if not arch or arch not in available_backbones():
        return None
    try:
        with torch.device("meta"):
            model = build_backbone(arch).model
        heads = model.get_submodule("blocks.0.attn").num_heads
    except (ConfigError, AttributeError):
        return None
    return int(heads) if isinstance(heads, int) else None


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ConfigError(f"a ViT checkpoint needs the timm package, which is not installed: "
                          f"{INSTALL_HINT}") from None
    return timm


def build_vit(spec: ViTSpec) -> nn.Module:
    """timm's ``VisionTransformer(**spec.kwargs())`` (random weights, no classifier: its
    ``head`` is the identity, the output [B, D] is the [CLS] token after the final norm)."""
    from_timm = _timm().models.vision_transformer.VisionTransformer
    model: nn.Module = from_timm(**spec.kwargs())
    return model


def warn_assumed_heads(spec: ViTSpec, path: object) -> None:
    _log.warning("%s does not record the number of attention heads of its ViT: assuming %d "
                 "(width %d / 64); pass -a vit_small for MoCo v3's 12-head ViT-S, or -a "
                 "timm:NAME", path, spec.num_heads, spec.embed_dim)


def timm_model_args(spec: ViTSpec) -> tuple[str, dict[str, Any]]:
    """timm's model name of ``spec``'s width (``vit_small_patch16_224`` for D 384) and the
    keyword arguments of ``timm.create_model`` that make it ``spec`` (those that differ from
    the named model's defaults, e.g. ``num_heads=12`` for MoCo v3's ViT-S).
    :class:`ConfigError` for a width without a timm model."""
    family = TIMM_FAMILIES.get(spec.embed_dim)
    if family is None:
        raise ConfigError(f"timm has no standard ViT of width {spec.embed_dim} (it has "
                          f"{', '.join(map(str, TIMM_FAMILIES))}); export as safetensors or deit")
    name = f"{family}_patch16_224"
    with torch.device("meta"):
        ref = spec_from_state(_timm().create_model(name, pretrained=False).state_dict())
    ref = ViTSpec(**{**asdict(ref), "num_heads": heads_for(f"timm:{name}", ref.embed_dim)[0]})
    ours, theirs = spec.kwargs(), ref.kwargs()
    return name, {k: v for k, v in ours.items() if v != theirs[k] and k != "num_classes"}
