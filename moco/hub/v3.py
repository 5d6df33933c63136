"""The backbone of a MoCo v3 checkpoint (MoCo v3's ``main_moco.py``).

Layout: ``state_dict`` with ``module.base_encoder.*`` (the backbone, whose ``fc.*`` for a
ResNet or ``head.*`` for a ViT is the projector MLP), ``module.momentum_encoder.*`` (its EMA
twin) and ``module.predictor.*``; ``arch`` names the network (``resnet50``, ``vit_small``,
``vit_base``). The features are ``base_encoder`` without the projector, as MoCo v3's
``main_lincls.py`` loads them (MoCo v3 §4).

:func:`read_v3_backbone` is the one reader of this layout in the hub; it is meant to be
replaced by :mod:`moco.eval.pretrained`'s own once that reads MoCo v3 files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moco.core.errors import CheckpointError
from moco.utils.checkpoint import check_finite, load_checkpoint, model_state

V3_PREFIX = "module.base_encoder."
#: MoCo v3's ``-a`` names -> (timm model, its keyword arguments): its ViT-S has 12 heads
#: where timm's ``vit_small_patch16_224`` has 6 (the tensor shapes are the same).
V3_VITS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_small": ("vit_small_patch16_224", {"num_heads": 12}),
    "vit_base": ("vit_base_patch16_224", {}),
}


def is_v3_state(keys: Any) -> bool:
    return any(str(k).startswith((V3_PREFIX, "base_encoder.")) for k in keys)


@dataclass
class V3Backbone:
    """``state``: ``base_encoder`` without its projector, under the network's own names
    (torchvision's or timm's); ``arch`` and ``epoch``: the file's entries (None when absent)."""

    state: dict[str, torch.Tensor]
    arch: str | None
    epoch: int | None


def read_v3_backbone(path: str | Path) -> V3Backbone:
    """The backbone of the MoCo v3 checkpoint at ``path``; :class:`CheckpointError` for
    another layout."""
    ckpt = load_checkpoint(path)
    state = model_state(ckpt, path)
    prefix = V3_PREFIX if any(k.startswith(V3_PREFIX) for k in state) else "base_encoder."
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not inner:
        sample = ", ".join(list(state)[:3]) or "none"
        raise CheckpointError(f"{path} has no module.base_encoder.* weights (keys start with: "
                              f"{sample}): not a MoCo v3 checkpoint")
    projector = "head." if any(k.startswith("head.") for k in inner) else "fc."
    out = {k: v for k, v in inner.items() if not k.startswith(projector)}
    check_finite(out, path, "encoder")
    arch, epoch = ckpt.get("arch"), ckpt.get("epoch")
    return V3Backbone(out, str(arch) if arch else None,
                      int(epoch) if isinstance(epoch, int) else None)


def v3_network(arch: str | None, path: str | Path) -> tuple[str, str, dict[str, Any]]:
    """``(family, name, model_args)`` for a MoCo v3 ``arch``: a torchvision ResNet or a timm
    ViT. The convolutional-stem ViTs (``vit_conv_*``) have no timm equivalent."""
    if arch in V3_VITS:
        name, args = V3_VITS[arch]
        return "timm", name, dict(args)
    if arch and arch.startswith("resnet"):
        return "torchvision", arch, {}
    raise CheckpointError(f"{path} is a MoCo v3 {arch or 'unnamed'} checkpoint; the hub reads "
                          f"resnet* and {', '.join(V3_VITS)} (timm's ViTs)")
