"""A pretrained encoder as a network: the backbone (its head, ``fc`` or ``head``, replaced by
the identity) or the whole encoder with its projection head, in eval mode (its features:
:mod:`moco.eval.features`). Heads are found and replaced through the backbone contract of
:mod:`moco.core.backbones` (:func:`~moco.core.backbones.set_head`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moco.core.backbones import set_head
from moco.core.errors import ConfigError
from moco.eval.architectures import build_network
from moco.eval.pretrained import EncoderWeights, PretrainedInfo, describe_encoder, read_encoder
from moco.utils.checkpoint import (
    CheckpointError,
    state_mismatch,
)
from moco.utils.runtime import resolve_device


def build_features_model(w: EncoderWeights, info: PretrainedInfo, *, keep_head: bool = False,
                         path: str | Path = "checkpoint") -> nn.Module:
    """The network of ``info`` with ``w``'s weights loaded strictly, in eval mode.

    Without ``keep_head``: the head is the identity, output [B, backbone_dim]. With it: the
    projection head (v1 Linear, v2 MLP) is rebuilt from its tensors and kept, output
    [B, head_dim].
    """
    model = build_network(info.network(), info.cifar_stem)
    state = w.backbone
    if keep_head:
        if info.head is None or info.head_dim is None:
            raise CheckpointError(f"{path} has no projection head (it is a {info.layout} "
                                  "checkpoint); use the backbone features")
        set_head(model, head_from_state(w.head, w.head_name))
        state = {**state, **w.head}
    else:
        set_head(model, nn.Identity())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise CheckpointError(f"{path} does not load into {info.arch}"
                              f"{' (CIFAR stem)' if info.cifar_stem else ''}: "
                              f"{state_mismatch(model, state)}") from None
    return model.eval()


def head_from_state(state: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """The projection head whose tensors are ``state``'s ``PREFIX.*`` keys, rebuilt from their
    names and shapes: ``PREFIX.weight`` [out, in] alone is one Linear (MoCo v1); numbered
    layers ``PREFIX.N.*`` are a Sequential in which a 2-D ``weight`` is a Linear (with a bias
    when ``bias`` is there), a ``running_mean`` a BatchNorm1d (affine when ``weight`` is
    there) and every index without tensors a ReLU (MoCo v2: Linear, ReLU, Linear; MoCo v3 §4:
    Linear, BN, ReLU, Linear, BN without affine)."""
    keys = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    if "weight" in keys and keys["weight"].dim() == 2:
        w = keys["weight"]
        return nn.Linear(w.shape[1], w.shape[0], bias="bias" in keys)
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in keys.items():
        index, _, name = k.partition(".")
        if not index.isdigit():
            raise CheckpointError(f"cannot rebuild the head from the tensor {prefix}.{k}")
        layers.setdefault(int(index), {})[name] = v
    if not layers:
        raise CheckpointError(f"no {prefix}.* tensors: the checkpoint has no projection head")
    return nn.Sequential(*[_layer(layers.get(i, {}), f"{prefix}.{i}")
                           for i in range(max(layers) + 1)])


def _layer(t: dict[str, torch.Tensor], where: str) -> nn.Module:
    if not t:
        return nn.ReLU()
    if "running_mean" in t:
        return nn.BatchNorm1d(t["running_mean"].shape[0], affine="weight" in t)
    if "weight" in t and t["weight"].dim() == 2:
        return nn.Linear(t["weight"].shape[1], t["weight"].shape[0], bias="bias" in t)
    raise CheckpointError(f"cannot rebuild the head layer {where} (tensors {sorted(t)})")


def load_backbone(ckpt_path: str | Path, arch: str | None = None, device: str | torch.device = "cpu",
                  *, keep_head: bool = False) -> tuple[nn.Module, PretrainedInfo]:
    """Load the pretrained query encoder of ``ckpt_path``, ready for features.

    Returns ``(model, info)``: ``model`` maps images [B,3,H,W] (normalised with ``info.mean``
    / ``info.std`` at ``info.image_size`` px: ``info.transforms()`` does it, like torchvision's
    ``weights.transforms()``) to features [B, D] with ``D = info.feature_dim`` (pooled
    backbone features, a ViT's [CLS] token; the projection head's output with ``keep_head``),
    in eval mode, on ``device`` (``"cpu"``, ``"cuda:0"``, ``"auto"`` or a ``torch.device``).
    ``arch`` checks the architecture (an error names both when the file holds another one);
    without it the architecture is read from the file (a registered backbone's name too) or
    inferred from its tensors.

    Example::

        model, info = load_backbone("runs/pretrain/checkpoint_0199.pth.tar")
        preprocess = info.transforms()
        feats = model(torch.stack([preprocess(img) for img in images]))  # [B, 2048] for resnet50
    """
    return load_encoder(ckpt_path, arch, device, features="head" if keep_head else "backbone")


def load_encoder(ckpt_path: str | Path, arch: str | None = None, device: str | torch.device = "cpu",
                 *, features: str | None = None) -> tuple[nn.Module, PretrainedInfo]:
    """:func:`load_backbone` with a choice of output: ``features`` = ``backbone`` (pooled
    features), ``head`` (projection head output), or None for what the pretraining run's kNN
    monitor used (``backbone`` when the file does not say or has no head). The choice is in
    ``info.features``."""
    if features not in (None, "backbone", "head"):
        raise ConfigError(f"expected --features to be backbone or head, got {features!r}")
    w = read_encoder(ckpt_path)
    info = describe_encoder(w, arch, ckpt_path)
    if features is None:
        features = "head" if info.knn_features == "head" and info.head is not None else "backbone"
    model = build_features_model(w, info, keep_head=features == "head", path=ckpt_path)
    info.features = features
    if features == "head":
        assert info.head_dim is not None
        info.feature_dim = info.head_dim
    return model.to(resolve_device(device)), info
