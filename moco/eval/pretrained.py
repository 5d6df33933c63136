"""Read a pretrained encoder, whoever wrote the checkpoint: its weights
(:func:`read_encoder`), architecture (given, recorded or inferred) and a
:class:`PretrainedInfo` describing it (:func:`describe_encoder`).

:func:`moco.eval.encoders.load_backbone` builds the network ``[B,3,H,W] -> [B, D]`` (head =
identity, eval mode) from them in one call. Accepted files (the layouts:
:mod:`moco.eval.layouts`):

* checkpoints written by ``moco pretrain`` (the original layout plus our ``moco`` entry);
* checkpoints written by the original ``main_moco.py`` of MoCo v1/v2: ``state_dict`` with
  ``module.encoder_q.*`` (v1 ``fc`` or v2 ``fc.0``/``fc.2`` head), ``module.encoder_k.*``,
  ``module.queue``, ``module.queue_ptr``;
* checkpoints of ``main_moco.py`` of MoCo v3 (the authors' ``r-50-*ep.pth.tar``,
  ``vit-s-300ep.pth.tar``): ``module.base_encoder.*`` (a torchvision ResNet whose ``fc`` is
  the projector, or a timm-named ViT whose ``head`` is), ``module.momentum_encoder.*``,
  ``module.predictor.*``;
* the CIFAR-10 notebook's checkpoints: ``encoder_q.net.N`` keys (its ``ModelBase``), no
  ``module.``;
* bare network state dicts (torchvision ResNets, timm ViTs, ``-a timm:NAME`` backbones,
  optionally with their classifier and ``module.``), which covers the exports and ``moco
  lincls`` checkpoints;
* safetensors files written by ``moco export --format safetensors`` (told by their
  content, whatever their name).

The architecture comes from ``--arch``, else the checkpoint's ``arch`` key or our
``moco.engine.config``, else it is inferred from the tensor shapes
(:mod:`moco.eval.architectures`); the CIFAR stem is read from the shape of ``conv1.weight``
(3x3 instead of 7x7). Files are read with ``torch.load(weights_only=True)`` or safetensors:
nothing in them is executed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moco.core.backbones import HEAD_NAMES
from moco.core.timm_backbone import is_timm_arch
from moco.data.recipes import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from moco.eval.architectures import (
    Network,
    infer_arch,
    meta_backbone,
    network_head_name,
    pooled_dim,
    resolve,
)
from moco.eval.layouts import bare_layout, encoder_of, find_layout, no_encoder_message, strip_module
from moco.eval.vit_spec import ViTSpec
from moco.utils.checkpoint import (
    CheckpointError,
    check_finite,
    load_checkpoint,
    model_state,
    read_head,
)

if TYPE_CHECKING:
    from moco.eval.preprocess import Preprocess

__all__ = ["EncoderWeights", "PretrainedInfo", "describe_encoder", "infer_arch", "read_encoder"]


@dataclass
class PretrainedInfo:
    """What :func:`~moco.eval.encoders.load_backbone` found in a checkpoint.

    ``feature_dim`` is the width D of what the returned model outputs (the pooled backbone
    features or a ViT's [CLS] token, or the projection head's output with ``keep_head``);
    ``backbone_dim`` is always the width before the head (512 for ResNet-18, 2048 for
    ResNet-50, 384 for ViT-S). ``layout`` is ``moco`` (written by us), a row of
    :data:`moco.eval.layouts.LAYOUTS` (``original``, ``mocov3``, ``demo``), a bare state dict
    (``torchvision``, ``timm``, ``vit``, ``state_dict``) or ``safetensors``. ``head`` is
    ``linear``, ``mlp`` or None when the file has no projection head. ``vit``: the spec
    (:class:`~moco.eval.vit_spec.ViTSpec` as JSON) of a ViT rebuilt from its tensors.
    ``image_size``, ``mean`` and ``std`` are the pretraining run's when recorded, else 32 px +
    CIFAR constants for a CIFAR stem, a ViT's own size, and 224 px + ImageNet constants
    otherwise.
    """

    path: str
    arch: str
    cifar_stem: bool
    feature_dim: int
    backbone_dim: int
    layout: str
    head: str | None = None
    head_dim: int | None = None
    epoch: int | None = None
    image_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    knn_features: str | None = None
    features: str = "backbone"
    config: dict[str, Any] | None = field(default=None, repr=False)
    vit: str | None = None

    def transforms(self) -> Preprocess:
        """The preprocessing the encoder expects, like torchvision's ``weights.transforms()``:
        any image (PIL, any mode, or a path) -> RGB, resized and center-cropped to
        ``image_size``, normalised with ``mean``/``std``: [3, S, S]
        (:class:`~moco.eval.preprocess.Preprocess`)."""
        from moco.eval.preprocess import Preprocess

        return Preprocess(self.image_size, self.mean, self.std)

    def network(self) -> Network:
        """The architecture to build (with the ViT spec of a ViT rebuilt from its tensors)."""
        return Network(self.arch, ViTSpec.from_json(self.vit) if self.vit else None)

    def describe(self) -> str:
        stem = " (CIFAR stem)" if self.cifar_stem else ""
        vit = f" ({ViTSpec.from_json(self.vit).describe()})" if self.vit else ""
        ep = f", epoch {self.epoch}" if self.epoch is not None else ""
        return (f"{self.arch}{stem}{vit}, {self.layout} checkpoint{ep}, {self.feature_dim}-d "
                f"features, {self.image_size} px")


@dataclass
class EncoderWeights:
    """The query encoder of a checkpoint under its network's names, head included.

    ``state``: ``conv1.weight``, ``bn1.*``, ``layerL.B.*`` (a ResNet), then the head's keys
    when the file has them (``fc.*`` / ``fc.0.*``, ``fc.2.*`` for a ResNet; ``head.*`` for a
    ViT), in the file's order. ``head_name`` is the attribute of the head
    (:func:`moco.core.backbones.head_name`): ``fc`` unless the keys say otherwise.
    """

    state: dict[str, torch.Tensor]
    layout: str
    ckpt: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)
    head_name: str = ""
    pretraining: bool = False  # a pretraining layout: the head is a projection head

    def __post_init__(self) -> None:
        if not self.head_name:
            self.head_name = head_name_of_keys(self.state)

    def is_head(self, key: str) -> bool:
        return key.startswith(self.head_name + ".")

    @property
    def backbone(self) -> dict[str, torch.Tensor]:
        """The encoder without its head (what ``main_lincls.py`` keeps)."""
        return {k: v for k, v in self.state.items() if not self.is_head(k)}

    @property
    def head(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state.items() if self.is_head(k)}


def head_name_of_keys(state: dict[str, Any]) -> str:
    """The head's attribute in a state dict's keys: the first of
    :data:`~moco.core.backbones.HEAD_NAMES` (``fc``, ``head``, ``classifier``) that prefixes a
    key, else ``fc``."""
    for name in HEAD_NAMES:
        if any(k.startswith(name + ".") for k in state):
            return name
    return "fc"


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for k in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[k] = f.get_tensor(k)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p} is not a readable safetensors file (truncated or corrupt): "
                              f"{e}") from None
    return tensors, metadata


def is_safetensors(head: bytes, size: int) -> bool:
    """Whether a file of ``size`` bytes that starts with ``head`` (9 bytes or more) is a
    safetensors file: an 8-byte little-endian header length that fits the file, then the JSON
    header's ``{``."""
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def file_kind(p: Path) -> str:
    """``safetensors`` or ``torch`` (a ``torch.save`` zip or legacy pickle), told by the
    file's first bytes whatever its name; a clear :class:`CheckpointError` for anything else
    (empty, a numpy array, text, an image, a damaged safetensors file)."""
    head = read_head(p, 9)
    if is_safetensors(head, p.stat().st_size):
        return "safetensors"
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return "torch"
    if not head:
        raise CheckpointError(f"{p} is empty: not a checkpoint")
    if head.startswith(b"\x93NUMPY"):
        raise CheckpointError(f"{p} is a numpy .npy file (e.g. moco embed's output), not a "
                              "checkpoint")
    if p.suffix == ".safetensors":
        raise CheckpointError(f"{p} is not a readable safetensors file (truncated or corrupt): "
                              "its header is damaged")
    raise CheckpointError(f"{p} is not a checkpoint: it was not written by torch.save "
                          "(nor is it a safetensors file)")


def read_encoder(path: str | Path) -> EncoderWeights:
    """The query encoder's weights of any accepted file (see the module docstring), a
    safetensors or a torch file told by its content, not its name.

    Raises :class:`CheckpointError` for a missing, truncated or foreign file, or one without
    encoder weights.
    """
    p = Path(path)
    if file_kind(p) == "safetensors":
        tensors, metadata = _read_safetensors(p)
        if "embeddings" in tensors and "conv1.weight" not in tensors:
            raise CheckpointError(f"{p} holds embeddings (moco embed), not encoder weights")
        check_finite(tensors, p, "encoder")
        return EncoderWeights(tensors, "safetensors", {}, metadata)
    ckpt = load_checkpoint(p)
    state = model_state(ckpt, p)
    keys = [strip_module(k) for k in state]
    row = find_layout(keys)
    if row is not None:
        out = encoder_of(row, state)
        layout = "moco" if isinstance(ckpt.get("moco"), dict) else row.name
    else:
        layout = bare_layout(keys) or ("state_dict" if isinstance(ckpt.get("arch"), str) else "")
        if not layout:
            raise CheckpointError(no_encoder_message(p, list(state)))
        out = dict(zip(keys, state.values(), strict=True))
    check_finite(out, p, "encoder")
    return EncoderWeights(out, layout, ckpt, pretraining=row is not None)


def _config_of(w: EncoderWeights) -> dict[str, Any] | None:
    """The pretraining settings recorded in the file (our ``moco.engine.config`` entry), as far as
    they describe the encoder: arch, image_size, mean, std, knn_features. A ``moco lincls``
    checkpoint records the same preprocessing at the top of its ``moco`` entry."""
    ours = w.ckpt.get("moco")
    if not isinstance(ours, dict):
        return None
    if ours.get("kind") == "lincls":
        return {k: ours[k] for k in ("image_size", "mean", "std") if k in ours}
    if isinstance(ours.get("config"), dict):
        return dict(ours["config"])
    return None


def _head_kind(head: dict[str, torch.Tensor]) -> tuple[str | None, int | None]:
    """``linear`` (one Linear: MoCo v1) or ``mlp`` (v2, v3) and the output width of the head's
    last Linear layer; (None, None) without a head."""
    linears = [v for k, v in head.items() if k.endswith(".weight") and v.dim() == 2]
    if not linears:
        return None, None
    return ("linear" if len(head) <= 2 and len(linears) == 1 else "mlp"), int(linears[-1].shape[0])


def describe_encoder(w: EncoderWeights, arch: str | None = None,
                     path: str | Path = "checkpoint") -> PretrainedInfo:
    """Architecture, stem, widths and preprocessing of the encoder in ``w`` (``arch``:
    ``--arch``, checked against the file)."""
    cfg = _config_of(w) or {}
    meta = w.metadata
    recorded = w.ckpt.get("arch") or cfg.get("arch") or meta.get("arch")
    net = resolve(w.state, arch, recorded, path, meta.get("vit") or cfg.get("vit"))
    w.head_name = network_head_name(net)
    cifar_stem = _cifar_stem(net, w.state)
    head, head_dim = _head_kind(w.head) if w.pretraining else (None, None)
    if cfg.get("image_size") or meta.get("image_size"):
        image_size = int(cfg.get("image_size") or meta["image_size"])
    else:
        image_size = net.vit.img_size if net.vit else 32 if cifar_stem else 224
    default_mean, default_std = (CIFAR_MEAN, CIFAR_STD) if cifar_stem else (IMAGENET_MEAN, IMAGENET_STD)
    mean = tuple(cfg.get("mean") or json.loads(meta.get("mean", "null") or "null") or default_mean)
    std = tuple(cfg.get("std") or json.loads(meta.get("std", "null") or "null") or default_std)
    epoch = w.ckpt.get("epoch")
    dim = pooled_dim(net)
    return PretrainedInfo(
        path=str(path), arch=net.arch, cifar_stem=cifar_stem, feature_dim=dim,
        backbone_dim=dim, layout=w.layout, head=head, head_dim=head_dim,
        epoch=int(epoch) if isinstance(epoch, int) else None, image_size=image_size,
        mean=tuple(float(x) for x in mean), std=tuple(float(x) for x in std),
        knn_features=cfg.get("knn_features"), config=cfg or None,
        vit=net.vit.to_json() if net.vit else None,
    )


def _cifar_stem(net: Network, state: dict[str, torch.Tensor]) -> bool:
    """Whether the file's ``conv1.weight`` differs from the architecture's own (a ResNet's 3x3
    CIFAR stem in place of its 7x7 one); False for ViTs, timm models and networks without a
    ``conv1``."""
    conv1 = state.get("conv1.weight")
    if net.vit is not None or is_timm_arch(net.arch) or conv1 is None:
        return False
    default = meta_backbone(net.arch).model.state_dict().get("conv1.weight")
    return default is not None and tuple(conv1.shape) != tuple(default.shape)
