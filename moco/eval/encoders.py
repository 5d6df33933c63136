"""A pretrained encoder as a network: the backbone (``fc`` = identity) or the whole encoder
with its head, in eval mode, and the features of a source of images through it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moco.core.backbones import (
    build_backbone,
)
from moco.core.errors import ConfigError
from moco.engine.checkpoint import (
    CheckpointError,
    state_mismatch,
)
from moco.engine.runtime import resolve_device
from moco.eval.pretrained import EncoderWeights, PretrainedInfo, describe_encoder, read_encoder


def build_features_model(w: EncoderWeights, info: PretrainedInfo, *, keep_head: bool = False,
                         path: str | Path = "checkpoint") -> nn.Module:
    """The network of ``info`` with ``w``'s weights loaded strictly, in eval mode.

    Without ``keep_head``: ``fc`` = identity, output [B, backbone_dim]. With it: the
    projection head (v1 Linear or v2 MLP) is kept, output [B, head_dim].
    """
    model = build_backbone(info.arch, cifar_stem=info.cifar_stem).model
    state = w.backbone
    if keep_head:
        from moco.core.heads import linear_head, mlp_head

        if info.head is None or info.head_dim is None:
            raise CheckpointError(f"{path} has no projection head (it is a {info.layout} "
                                  "checkpoint); use the backbone features")
        model.fc = (mlp_head if info.head == "mlp" else linear_head)(info.backbone_dim, info.head_dim)
        state = {**state, **w.head}
    else:
        model.fc = nn.Identity()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise CheckpointError(f"{path} does not load into {info.arch}"
                              f"{' (CIFAR stem)' if info.cifar_stem else ''}: "
                              f"{state_mismatch(model, state)}") from None
    return model.eval()


def load_backbone(ckpt_path: str | Path, arch: str | None = None, device: str | torch.device = "cpu",
                  *, keep_head: bool = False) -> tuple[nn.Module, PretrainedInfo]:
    """Load the pretrained query encoder of ``ckpt_path``, ready for features.

    Returns ``(model, info)``: ``model`` maps images [B,3,H,W] (normalised with ``info.mean``
    / ``info.std`` at ``info.image_size`` px) to features [B, D] with ``D = info.feature_dim``
    (pooled backbone features; the projection head's output with ``keep_head``), in eval
    mode, on ``device``. ``arch`` checks the architecture (an error names both when the file
    holds another one); without it the architecture is read or inferred from the file.

    Example::

        model, info = load_backbone("runs/pretrain/checkpoint_0199.pth.tar")
        feats = model(images)  # [B, 2048] for resnet50
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


@torch.no_grad()
def extract_into(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, Any]],
    n: int,
    device: torch.device,
    *,
    normalize: bool = False,
    dtype: torch.dtype = torch.float32,
    progress: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of ``n`` images into one preallocated CPU tensor [n, D] (no list + cat, so the
    peak memory is the bank itself, not twice it) and their labels [n] (-1 when unlabeled).

    ``model`` runs in eval mode; ``normalize`` L2-normalises each row (the kNN features).
    ``progress`` is an optional tqdm bar advanced by the batch size.
    """
    was_training = model.training
    model.eval()
    out: torch.Tensor | None = None
    labels = torch.full((n,), -1, dtype=torch.long)
    pos = 0
    try:
        for x, y in batches:
            f = model(x.to(device, non_blocking=True)).float()
            if normalize:
                f = F.normalize(f, dim=1)
            if out is None:
                out = torch.empty((n, f.shape[1]), dtype=dtype)
            b = f.shape[0]
            if pos + b > n:
                raise ValueError(f"more images than expected ({n})")
            out[pos:pos + b] = f.to("cpu", dtype)
            labels[pos:pos + b] = torch.as_tensor(y)
            pos += b
            if progress is not None:
                progress.update(b)
    finally:
        model.train(was_training)
    if out is None:
        raise ValueError("no images to extract features from")
    if pos != n:
        raise ValueError(f"expected {n} images, got {pos}")
    return out, labels


def image_batches(source: Any, transform: Any, batch_size: int, workers: int,
                  device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(images [B,3,S,S], labels [B])`` of an :class:`moco.data.source.ImageSource`, in
    order, through ``transform`` (labels are -1 for unlabeled sources)."""
    from torch.utils.data import DataLoader

    from moco.data.datasets import EvalDataset

    return DataLoader(EvalDataset(source, transform), batch_size=batch_size, shuffle=False,
                      num_workers=workers, pin_memory=device.type == "cuda")
