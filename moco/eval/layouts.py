"""Checkpoint layouts: where each pretraining code keeps the encoder that evaluation uses.

One table, :data:`LAYOUTS` (keys after the DDP ``module.`` prefix, which is optional):

============  =================================  =====================  =========================================
layout        written by                         evaluation encoder     dropped
============  =================================  =====================  =========================================
``demo``      the MoCo CIFAR-10 notebook         ``encoder_q.net.N.*``  ``encoder_k.*``, ``queue``, ``queue_ptr``
              (``ModelBase``)                    (renamed to
                                                 torchvision's names)
``original``  ``main_moco.py`` of MoCo v1/v2     ``encoder_q.*``        ``encoder_k.*``, ``queue``, ``queue_ptr``
              (``moco/builder.py``)
``mocov3``    ``main_moco.py`` of MoCo v3        ``base_encoder.*``     ``momentum_encoder.*``, ``predictor.*``
              (``moco/builder.py`` of v3)
============  =================================  =====================  =========================================

The evaluation encoder keeps its projection head under the backbone's head name (``fc.*`` for
ResNets: v1's Linear, v2's ``fc.0``/``fc.2`` MLP, v3's ``fc.0``-``fc.4`` MLP with BN;
``head.*`` for ViTs: v3's 3-layer MLP); kNN on backbone features, ``lincls`` and the exports
drop it, as ``main_lincls.py`` of v1/v2 (``module.encoder_q.fc*``) and of v3
(``module.base_encoder.fc*`` / ``head*``) do. Files with none of these prefixes are bare
network state dicts (a torchvision ResNet, a ``-a timm:NAME`` backbone's ``body.*``, a timm
VisionTransformer, a ``moco lincls`` checkpoint, an export).

Another pretraining code joins the table with :func:`register_layout`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moco.core.errors import CheckpointError

PREFIX = "module."


@dataclass(frozen=True)
class Layout:
    """One row of the table: ``encoder`` is the prefix of the evaluation encoder's keys,
    ``dropped`` the prefixes (or exact names) of the rest of the model; ``rename`` maps an
    encoder key (prefix removed) to the network's name when the layout uses other names."""

    name: str
    written_by: str
    encoder: str
    dropped: tuple[str, ...]
    rename: Callable[[str], str] | None = None

    def holds(self, keys: list[str]) -> bool:
        return any(k.startswith(self.encoder) for k in keys)


# The notebook's ``ModelBase.net`` (an ``nn.Sequential``) indices -> torchvision names.
_DEMO_NET = {"0": "conv1", "1": "bn1", "3": "layer1", "4": "layer2", "5": "layer3", "6": "layer4",
             "9": "fc"}


def _demo_key(rest: str) -> str:
    """``3.0.conv1.weight`` -> ``layer1.0.conv1.weight`` (the notebook's ``ModelBase.net``)."""
    index, _, name = rest.partition(".")
    if index not in _DEMO_NET or not name:
        raise CheckpointError(f"unexpected key encoder_q.net.{rest} in a CIFAR-demo checkpoint")
    return f"{_DEMO_NET[index]}.{name}"


#: The layouts, looked for in order (the first whose encoder prefix occurs wins).
LAYOUTS: list[Layout] = [
    Layout("demo", "the MoCo CIFAR-10 notebook", "encoder_q.net.",
           ("encoder_k.", "queue", "queue_ptr"), _demo_key),
    Layout("original", "main_moco.py of MoCo v1/v2", "encoder_q.",
           ("encoder_k.", "queue", "queue_ptr")),
    Layout("mocov3", "main_moco.py of MoCo v3", "base_encoder.",
           ("momentum_encoder.", "predictor.")),
]


def register_layout(layout: Layout, *, before: str | None = None) -> None:
    """Add ``layout`` to :data:`LAYOUTS` (at the end, or before the layout named ``before``,
    for an encoder prefix that another row's prefix also matches)."""
    names = [row.name for row in LAYOUTS]
    if layout.name in names:
        raise ValueError(f"a checkpoint layout named {layout.name!r} is registered already")
    LAYOUTS.insert(names.index(before) if before in names else len(LAYOUTS), layout)


def strip_module(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def find_layout(keys: list[str]) -> Layout | None:
    """The first layout whose evaluation encoder is in ``keys`` (``module.`` removed)."""
    return next((row for row in LAYOUTS if row.holds(keys)), None)


def encoder_of(layout: Layout, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The evaluation encoder of ``state`` under the network's names, in the file's order."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        k = strip_module(k)
        if k.startswith(layout.encoder):
            rest = k[len(layout.encoder):]
            out[layout.rename(rest) if layout.rename else rest] = v
    return out


def is_vit_state(keys: list[str] | dict[str, torch.Tensor]) -> bool:
    """Whether these are a timm VisionTransformer's keys (patch embedding, attention blocks)."""
    return "patch_embed.proj.weight" in keys and "blocks.0.attn.qkv.weight" in keys


def bare_layout(keys: list[str]) -> str | None:
    """The name of a bare network state dict's layout: ``torchvision`` (a ResNet), ``timm``
    (a ``-a timm:NAME`` backbone: ``body.*`` and ``fc.*``), ``vit`` (a timm
    VisionTransformer), or None when the keys are none of these."""
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "torchvision"
    if is_vit_state(keys):
        return "vit"
    if keys and all(k.startswith(("body.", "fc.")) for k in keys):
        return "timm"
    return None


def no_encoder_message(path: object, keys: list[str]) -> str:
    """Why a file with none of the layouts' encoders is refused."""
    sample = ", ".join(keys[:3]) or "none"
    prefixes = " or ".join(row.encoder for row in LAYOUTS if row.name != "demo")
    return (f"{path} has no encoder_q weights: no key starts with {prefixes} (its keys start "
            f"with: {sample}); it is not a MoCo pretraining checkpoint, nor a torchvision "
            "ResNet or timm ViT state dict (a moco export --format timm file is for "
            "timm.create_model, not for moco)")
