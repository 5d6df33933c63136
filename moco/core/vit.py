"""Vision Transformers as MoCo v3 trains them (MoCo v3 §5, "ViT architecture"; §4.2, the
random patch projection; the authors' ``vits.py``), built on timm's ``VisionTransformer``
(the ``timm`` extra).

* ``vit_tiny`` (dim 192, 3 heads), ``vit_small`` (dim 384, **12** heads: DeiT-S has 6),
  ``vit_base`` (dim 768, 12 heads); all depth 12, mlp_ratio 4, qkv bias, LayerNorm eps 1e-6;
  patch 16 at 224 px by default, any patch size dividing the image (4 for 32-px CIFAR).
* A fixed 2-D sin-cos position embedding (:func:`sincos_position_embedding`): not learned,
  a zero vector for the [CLS] token.
* MoCo v3's initialisation (:func:`init_mocov3_vit`).
* ``stop_grad_conv1``, the random patch projection (§4.2): the patch-embedding convolution
  stays at its random initialisation (:func:`freeze_patch_projection`).

The network is timm's own class, so its state-dict keys are timm's (``cls_token``,
``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``, ``head.*``), the keys of the
authors' ``module.base_encoder.*`` checkpoints once the prefix is removed. Its head is
``head`` (MoCo v3 puts the projector there); with ``head`` the identity the network returns
the [CLS] token after the final norm, [B, dim]: the evaluation features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from moco.core.errors import ConfigError
from moco.core.timm_backbone import INSTALL_HINT


@dataclass(frozen=True)
class ViTSize:
    """Width, depth and attention heads of a ViT."""

    dim: int
    depth: int
    heads: int


#: The ViTs of ``-a`` (MoCo v3 Table 1 for ViT-S/ViT-B; ViT-Ti as DeiT's).
VIT_SIZES: dict[str, ViTSize] = {
    "vit_tiny": ViTSize(192, 12, 3),
    "vit_small": ViTSize(384, 12, 12),
    "vit_base": ViTSize(768, 12, 12),
}
DEFAULT_PATCH = 16
DEFAULT_IMAGE = 224
POS_TEMPERATURE = 10000.0


def _vision_transformer_class() -> Any:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        raise ConfigError(f"the ViT backbones (-a vit_tiny, vit_small, vit_base) are timm's "
                          f"VisionTransformer, and timm is not installed: {INSTALL_HINT}") from None
    return VisionTransformer


def sincos_position_embedding(grid: tuple[int, int], dim: int,
                              temperature: float = POS_TEMPERATURE) -> torch.Tensor:
    """The fixed 2-D sin-cos position embedding [1, 1 + h·w, dim] (float32) of a grid of
    h x w patches taken row by row, after a zero vector for the [CLS] token.

    With ω_i = temperature^(-i / (dim/4)), i = 0 .. dim/4 - 1, the patch in row r, column c
    gets [sin(r·ω), cos(r·ω), sin(c·ω), cos(c·ω)]: a quarter of the channels per function and
    axis. (For the square grids MoCo v3 trains on this is the authors' layout.)
    """
    if dim % 4:
        raise ConfigError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    h, w = grid
    omega = temperature ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)[:, None] * omega
    cols = torch.arange(w, dtype=torch.float64).repeat(h)[:, None] * omega
    patches = torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), patches])[None].float()


@torch.no_grad()
def init_mocov3_vit(model: nn.Module) -> None:
    """MoCo v3's initialisation of a timm ``VisionTransformer`` (the authors' ``vits.py``):

    * every Linear xavier-uniform, biases 0; the fused qkv projection [3·dim, dim] as three
      [dim, dim] matrices (bound √(6 / (dim + dim)), not √(6 / (3·dim + dim)));
    * the [CLS] token N(0, 1e-6²);
    * the patch projection (a p x p convolution, stride p) uniform with the xavier bound over
      fan-in + fan-out = 3·p·p + dim, its bias 0.
    LayerNorms keep weight 1, bias 0; the position embedding is left as it is.
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:
                bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    cls_token = getattr(model, "cls_token", None)
    if isinstance(cls_token, torch.Tensor):
        nn.init.normal_(cls_token, std=1e-6)
    proj = patch_projection(model)
    dim, _, ph, pw = proj.weight.shape
    bound = math.sqrt(6.0 / (3 * ph * pw + dim))
    nn.init.uniform_(proj.weight, -bound, bound)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)


def _patch_embed(model: nn.Module) -> nn.Module | None:
    for owner in (model, getattr(model, "body", None)):
        pe = getattr(owner, "patch_embed", None)
        if isinstance(pe, nn.Module):
            return pe
    return None


def is_vision_transformer(model: nn.Module) -> bool:
    """Whether ``model`` (or the timm ``body`` of a ``timm:NAME`` backbone) embeds patches: a
    ViT, whose MoCo v3 heads differ from a ResNet's (MoCo v3 §5)."""
    return _patch_embed(model) is not None


def patch_projection(model: nn.Module) -> nn.Conv2d:
    """The patch-embedding convolution of a ViT (``patch_embed.proj``, or ``body.patch_embed.proj``
    in a ``timm:NAME`` backbone); :class:`ConfigError` for a network without one."""
    proj = getattr(_patch_embed(model), "proj", None)
    if not isinstance(proj, nn.Conv2d):
        raise ConfigError(f"this {type(model).__name__} has no patch projection "
                          "(patch_embed.proj): the random patch projection (--stop-grad-conv1) "
                          "is for Vision Transformers")
    return proj


def freeze_patch_projection(model: nn.Module) -> None:
    """The random patch projection (MoCo v3 §4.2): the patch-embedding convolution keeps its
    random initialisation; its weight and bias get no gradient (the optimiser skips them)."""
    for p in patch_projection(model).parameters():
        p.requires_grad_(False)


def vision_transformer(name: str, image_size: int | None = None, patch_size: int | None = None,
                       num_classes: int = 1000) -> nn.Module:
    """The ViT ``name`` of :data:`VIT_SIZES` for ``image_size`` px inputs (default 224) cut in
    ``patch_size`` patches (default 16), with MoCo v3's fixed position embedding and
    initialisation; input [B,3,S,S] -> [B, num_classes] (``head``)."""
    size, patch = image_size or DEFAULT_IMAGE, patch_size or DEFAULT_PATCH
    if name not in VIT_SIZES:
        raise ConfigError(f"unknown ViT {name!r}; choose one of {', '.join(VIT_SIZES)}")
    if patch < 1 or size % patch:
        raise ConfigError(f"{name}: the patch size {patch} must divide the image size {size} "
                          "(e.g. --patch-size 16 at 224 px, 4 at 32 px)")
    s = VIT_SIZES[name]
    model: nn.Module = _vision_transformer_class()(
        img_size=size, patch_size=patch, embed_dim=s.dim, depth=s.depth, num_heads=s.heads,
        mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=num_classes)
    grid = tuple(model.patch_embed.grid_size)  # type: ignore[union-attr,arg-type]
    pos = model.pos_embed
    assert isinstance(pos, nn.Parameter)
    with torch.no_grad():
        pos.copy_(sincos_position_embedding((int(grid[0]), int(grid[1])), s.dim))
    pos.requires_grad_(False)
    init_mocov3_vit(model)
    return model
