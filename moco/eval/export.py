"""Export a pretrained encoder for downstream code (``moco export``).

The formats are a registry (:mod:`moco.eval.export_formats`: name -> writer, the writers in
:mod:`moco.eval.export_writers`); :func:`export_checkpoint` reads the encoder once (any file
:func:`moco.eval.encoders.load_backbone` accepts: the layouts of :mod:`moco.eval.layouts`),
loads it into its network so that the export holds exactly what the network accepts, and hands
an :class:`ExportJob` to the format's writer:

* ``torchvision``: a state dict (``torch.save``) of the backbone under torchvision's names, no
  head: ``torchvision.models.<arch>().load_state_dict(sd, strict=False)`` reports exactly
  ``fc.weight`` and ``fc.bias`` missing and nothing unexpected (ResNets; a registered CNN
  likewise with its own builder). A ``.safetensors`` file name gives the same tensors as
  safetensors.
* ``detectron2``: exactly ``detection/convert-pretrain-to-detectron2.py`` of the original code:
  a pickle of ``{"model": {name: ndarray}, "__author__": "MOCO", "matching_heuristics": True}``
  with the renaming rules applied to ``module.encoder_q.*`` (the head kept as ``stem.fc*``).
* ``safetensors``: the backbone tensors plus string metadata (``arch``, ``cifar_stem``,
  ``feature_dim``, ``image_size``, ``mean``, ``std``, a ViT's ``vit`` spec, ...), loadable
  with ``safetensors.torch.load_file`` and by :func:`moco.eval.encoders.load_backbone`
  (which knows the file by its content, whatever its name).
* ``timm``: a state dict under timm's names with the model's default classifier at timm's
  fresh initialisation (pretraining trains none), so that ``timm.create_model(NAME,
  pretrained=True, pretrained_cfg_overlay=dict(file=OUT))`` loads it strictly with the default
  head; for ``-a timm:NAME`` backbones, torchvision ResNets that timm has under the same name
  (resnet50, resnext50_32x4d, ...) and ViTs (timm's ``vit_*`` of the same width, with the
  keyword arguments that differ, e.g. ``num_heads=12`` for MoCo v3's ViT-S).
* ``deit``: a ViT for DeiT's fine-tuning (``main.py --finetune``, MoCo v3 §4's end-to-end
  protocol): ``{"model": state_dict}`` under timm's ViT names without the head, which DeiT
  then initialises for its classes (what ``convert_to_deit.py`` of MoCo v3 writes).

A torchvision-format file has no ``fc``: ``timm.create_model`` loads it only with
``num_classes=0`` (timm then drops the classifier and loads the rest non-strictly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moco.core.errors import OutputError
from moco.eval.encoders import build_features_model
from moco.eval.export_formats import export_formats, get_format
from moco.eval.pretrained import EncoderWeights, PretrainedInfo, describe_encoder, read_encoder
from moco.utils.atomic import atomic_path
from moco.utils.checkpoint import CheckpointError

#: The formats this package writes itself (more may be registered: export_formats()).
EXPORT_FORMATS = tuple(export_formats())
SAFETENSORS_FORMAT = "moco-backbone/1"


@dataclass
class ExportResult:
    """Where the export went, what it holds and what the user should know."""

    path: Path
    format: str
    num_tensors: int
    info: PretrainedInfo
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how to load it (wide ResNets, timm)


@dataclass
class ExportJob:
    """What a format's writer gets: ``backbone`` is the encoder without its head as its
    network holds it (``state_dict()`` keys), ``weights`` the file's encoder with its head;
    the writer writes ``out`` and may add ``warnings`` and ``notes``."""

    source: Path
    out: Path
    weights: EncoderWeights
    info: PretrainedInfo
    backbone: dict[str, torch.Tensor]
    seed: int = 0
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` through the one atomic write (it streams: no second copy
    of the tensors in memory). Its write errors (a full disk: "I/O error: No space left on
    device (os error 28)") come as ``SafetensorError``; they are raised as ``OSError``."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:
            raise OSError(f"cannot write {path}: {e}") from None


def detectron2_name(key: str) -> str | None:
    """One key of the checkpoint -> its detectron2 name, or None when it is dropped.

    The rules of ``convert-pretrain-to-detectron2.py`` in order: keep
    only ``module.encoder_q.*`` and remove that prefix; prepend ``stem.`` unless the name
    contains ``layer``; ``layer{t}`` -> ``res{t+1}``; ``bn{t}`` -> ``conv{t}.norm``;
    ``downsample.0`` -> ``shortcut``; ``downsample.1`` -> ``shortcut.norm``.
    """
    prefix = "module.encoder_q."
    if not key.startswith(prefix):
        return None
    k = key.replace(prefix, "")
    if "layer" not in k:
        k = "stem." + k
    for t in (1, 2, 3, 4):
        k = k.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        k = k.replace(f"bn{t}", f"conv{t}.norm")
    k = k.replace("downsample.0", "shortcut")
    return k.replace("downsample.1", "shortcut.norm")


def detectron2_checkpoint(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The conversion script's output for a checkpoint's ``state_dict`` (original keys).

    Returns ``{"model": {name: np.ndarray}, "__author__": "MOCO", "matching_heuristics":
    True}``; float32 arrays, 0-d int64 arrays for ``num_batches_tracked``. For ResNet-50:
    320 model entries (v1 head) or 322 (v2 MLP head).
    """
    model: dict[str, np.ndarray] = {}
    for k, v in state_dict.items():
        name = detectron2_name(k)
        if name is not None:
            model[name] = v.detach().cpu().numpy()
    if not model:
        raise CheckpointError("no module.encoder_q.* keys to convert")
    return {"model": model, "__author__": "MOCO", "matching_heuristics": True}


def export_checkpoint(ckpt_path: str | Path, fmt: str, out: str | Path,
                      arch: str | None = None, *, seed: int = 0) -> ExportResult:
    """Export the query encoder of ``ckpt_path`` (any file :func:`load_backbone` accepts) to
    ``out`` in format ``fmt`` (one of :func:`~moco.eval.export_formats.export_formats`).
    ``seed``: the timm format's fresh classifier initialisation."""
    writer = get_format(fmt).load()
    src, dst = Path(ckpt_path), Path(out)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise OutputError(f"--out {dst} is the input checkpoint; choose another file")
    w = read_encoder(src)
    info = describe_encoder(w, arch, src)
    backbone = build_features_model(w, info, path=src).state_dict()
    job = ExportJob(src, dst, w, info, backbone, seed)
    dst.parent.mkdir(parents=True, exist_ok=True)
    n = writer(job)
    return ExportResult(dst, fmt, n, info, job.warnings, job.notes)

