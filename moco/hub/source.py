"""What a Hub model folder is made of, from whatever the user has: a checkpoint file (any
layout :mod:`moco.eval.pretrained` reads, and MoCo v3's) or a loaded model
(:func:`moco.load_pretrained`, :func:`moco.from_pretrained`, or the ``(model, info)`` pair
of :func:`moco.load_backbone`).

The result, :class:`Exportable`, holds the backbone's tensors under its network's own names
(torchvision's for ResNets, timm's for timm models; no head), loaded once into the network
so that they are exactly what the network accepts, and a :class:`ModelInfo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moco.core.backbones import head_name
from moco.core.errors import CheckpointError, HubError
from moco.core.timm_backbone import is_timm_arch, timm_name
from moco.hub.networks import ModelInfo, build_network, feature_width, load_strict
from moco.hub.v3 import is_v3_state, read_v3_backbone, v3_network
from moco.utils.checkpoint import load_checkpoint, model_state


@dataclass
class Exportable:
    """A backbone ready to be written: ``tensors`` [name -> tensor] without the head;
    ``checkpoint`` the file it came from (None for a model); ``layout`` that file's layout;
    ``run_config`` the pretraining settings recorded in it (our checkpoints only)."""

    info: ModelInfo
    tensors: dict[str, torch.Tensor]
    checkpoint: Path | None = None
    layout: str = "model"
    run_config: dict[str, Any] | None = None


def _method(head: str | None, cfg: dict[str, Any]) -> str:
    """The method's name as the papers say it, from the recorded settings or the head."""
    if cfg.get("method"):
        return str(cfg["method"])
    mechanism = cfg.get("mechanism", "moco")
    if mechanism != "moco":
        return f"contrastive learning, {mechanism} mechanism (MoCo v1 §4.1)"
    if cfg:
        return "MoCo v2" if cfg.get("mlp") else "MoCo v1"
    return {"mlp": "MoCo v2", "linear": "MoCo v1"}.get(head or "", "MoCo")


def _is_v3_file(path: Path) -> bool:
    try:
        return is_v3_state(model_state(load_checkpoint(path), path))
    except CheckpointError:
        return False


def from_checkpoint(path: str | Path) -> Exportable:
    """The query encoder's backbone of a MoCo v1/v2 checkpoint (ours, ``main_moco.py``'s, the
    CIFAR notebook's, a torchvision or safetensors export) or MoCo v3's ``base_encoder``."""
    from moco.eval.encoders import build_features_model
    from moco.eval.pretrained import describe_encoder, read_encoder

    p = Path(path)
    try:
        w = read_encoder(p)
    except CheckpointError:
        if p.suffix != ".safetensors" and _is_v3_file(p):
            return _from_v3(p)
        raise
    pinfo = describe_encoder(w, None, p)
    state = build_features_model(w, pinfo, path=p).state_dict()
    if is_timm_arch(pinfo.arch):  # TimmBackbone: the timm model is its ``body``
        family, arch = "timm", timm_name(pinfo.arch)
        state = {k[len("body."):]: v for k, v in state.items() if k.startswith("body.")}
    else:
        family, arch = "torchvision", pinfo.arch
    cfg = pinfo.config or {}
    info = ModelInfo(family=family, arch=arch, feature_dim=pinfo.backbone_dim,
                     method=("MoCo v3" if pinfo.layout == "mocov3" else _method(pinfo.head, cfg)),
                     cifar_stem=pinfo.cifar_stem,
                     image_size=pinfo.image_size, mean=pinfo.mean, std=pinfo.std,
                     epochs=pinfo.epoch, source=p.name)
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    return Exportable(info, tensors, p, pinfo.layout, cfg or None)


def _from_v3(path: Path) -> Exportable:
    v3 = read_v3_backbone(path)
    family, arch, args = v3_network(v3.arch, path)
    info = ModelInfo(family=family, arch=arch, feature_dim=0, method="MoCo v3",
                     model_args=args, epochs=v3.epoch, source=path.name)
    model = load_strict(build_network(info), v3.state, path, f"{arch} (MoCo v3)")
    info.feature_dim = feature_width(model, family, arch)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    return Exportable(info, tensors, path, "v3")


def from_model(model: nn.Module, info: ModelInfo) -> Exportable:
    """The backbone of a loaded ``model``; a head with weights (``num_classes``) is left out."""
    state = model.state_dict()
    head = head_name(model)
    if any(True for _ in model.get_submodule(head).parameters()):
        state = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    return Exportable(info, tensors)


def exportable(source: Any) -> Exportable:
    """:class:`Exportable` from a checkpoint path, a model carrying ``moco_info`` (from
    :func:`moco.load_pretrained` / :func:`moco.from_pretrained`), or ``(model, info)`` from
    :func:`moco.load_backbone`."""
    if isinstance(source, (str, Path)):
        return from_checkpoint(source)
    info = getattr(source, "moco_info", None)
    if isinstance(source, nn.Module) and isinstance(info, ModelInfo):
        return from_model(source, info)
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], nn.Module):
        return _from_backbone_pair(source[0], source[1])
    raise HubError(f"cannot export a {type(source).__name__}: pass a checkpoint file, a model "
                   "from moco.load_pretrained or moco.from_pretrained, or the (model, info) "
                   "pair of moco.load_backbone")


def _from_backbone_pair(model: nn.Module, pinfo: Any) -> Exportable:
    from moco.eval.pretrained import PretrainedInfo

    if not isinstance(pinfo, PretrainedInfo) or pinfo.features != "backbone":
        raise HubError("pass the (model, info) pair of moco.load_backbone with the backbone "
                       "features (not keep_head=True)")
    family, arch = ("timm", timm_name(pinfo.arch)) if is_timm_arch(pinfo.arch) else \
        ("torchvision", pinfo.arch)
    state = model.state_dict()
    if family == "timm":
        state = {k[len("body."):]: v for k, v in state.items() if k.startswith("body.")}
    info = ModelInfo(family=family, arch=arch, feature_dim=pinfo.backbone_dim,
                     method=_method(pinfo.head, pinfo.config or {}), cifar_stem=pinfo.cifar_stem,
                     image_size=pinfo.image_size, mean=pinfo.mean, std=pinfo.std,
                     epochs=pinfo.epoch, source=Path(pinfo.path).name)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    return Exportable(info, tensors, Path(pinfo.path), pinfo.layout, pinfo.config)
