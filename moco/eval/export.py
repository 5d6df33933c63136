"""Export a pretrained encoder for downstream code (``moco export``).

Formats:

* ``torchvision``: a state dict (``torch.save``) of the backbone under torchvision names, no
  ``fc``: ``torchvision.models.<arch>().load_state_dict(sd, strict=False)`` reports exactly
  ``fc.weight`` and ``fc.bias`` missing and nothing unexpected.
* ``detectron2``: exactly ``detection/convert-pretrain-to-detectron2.py`` of the original code:
  a pickle of ``{"model": {name: ndarray}, "__author__": "MOCO", "matching_heuristics": True}``
  with the renaming rules applied to ``module.encoder_q.*`` (the head kept as ``stem.fc*``).
* ``safetensors``: the backbone tensors plus string metadata (``arch``, ``cifar_stem``,
  ``feature_dim``, ``image_size``, ``mean``, ``std``, ...), loadable with
  ``safetensors.torch.load_file`` and by :func:`moco.eval.encoders.load_backbone`.
* ``timm``: a state dict under timm's names with the model's default classifier at timm's
  fresh initialisation (pretraining trains none), so that ``timm.create_model(NAME,
  pretrained=True, pretrained_cfg_overlay=dict(file=OUT))`` loads it strictly with the default
  head; for ``-a timm:NAME`` backbones and for torchvision ResNets that timm has under the same
  name (resnet50, resnext50_32x4d, ...). ``.safetensors`` output when ``OUT`` ends so, else
  ``torch.save``.

A torchvision-format file has no ``fc``: ``timm.create_model`` loads it only with
``num_classes=0`` (timm then drops the classifier and loads the rest non-strictly).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moco.core.errors import ConfigError, OutputError
from moco.core.timm_backbone import is_timm_arch, timm_name, timm_state_dict
from moco.detection.settings import c4_problem
from moco.eval.encoders import build_features_model
from moco.eval.pretrained import EncoderWeights, PretrainedInfo, describe_encoder, read_encoder
from moco.utils.atomic import atomic_path, atomic_write
from moco.utils.checkpoint import CheckpointError, torch_save

EXPORT_FORMATS = ("torchvision", "detectron2", "safetensors", "timm")
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


def _original_encoder_keys(w: EncoderWeights) -> dict[str, torch.Tensor]:
    """The query encoder (head included) under the original's ``module.encoder_q.`` names."""
    return {f"module.encoder_q.{k}": v for k, v in w.state.items()}


def _stem_warning(info: PretrainedInfo, consumer: str) -> list[str]:
    if not info.cifar_stem:
        return []
    return [f"this {info.arch} has the CIFAR stem (conv1 3x3 stride 1, no max-pool): a stock "
            f"{consumer} has a 7x7 conv1 and will refuse conv1.weight; build the model with the "
            f"same stem (moco.core.backbones.build_backbone({info.arch!r}, cifar_stem=True), or "
            "replace conv1 by Conv2d(3, 64, 3, 1, 1, bias=False) and maxpool by Identity)"]


def _builder_note(arch: str) -> list[str]:
    """How to build the network a torchvision-format export of ``arch`` loads into, when it is
    not ``torchvision.models.<arch>()``."""
    from moco.core.wide_resnet import WIDE_RESNETS

    if arch in WIDE_RESNETS:
        return [f"{arch} is torchvision's ResNet with every layer {WIDE_RESNETS[arch][2]}x wider: "
                f"build it with moco.core.wide_resnet.{arch}() and load_state_dict(sd, strict=False) "
                "(only fc.weight and fc.bias missing)"]
    if arch == "resnext50_32x8d":
        return ["build it with torchvision.models.resnet.ResNet(Bottleneck, [3, 4, 6, 3], "
                "groups=32, width_per_group=8) (or moco.core.backbones.build_backbone"
                "('resnext50_32x8d').model) and load_state_dict(sd, strict=False)"]
    return []


def export_checkpoint(ckpt_path: str | Path, fmt: str, out: str | Path,
                      arch: str | None = None, *, seed: int = 0) -> ExportResult:
    """Export the query encoder of ``ckpt_path`` (any file :func:`load_backbone` accepts) to
    ``out`` in format ``fmt`` (one of :data:`EXPORT_FORMATS`). ``seed``: the timm format's
    fresh classifier initialisation."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    src, dst = Path(ckpt_path), Path(out)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise OutputError(f"--out {dst} is the input checkpoint; choose another file")
    w = read_encoder(src)
    info = describe_encoder(w, arch, src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    is_timm = is_timm_arch(info.arch)
    if is_timm and fmt in ("torchvision", "detectron2"):
        raise ConfigError(f"{info.arch} is a timm model, not a torchvision ResNet: export it with "
                         "--format timm (for timm.create_model) or --format safetensors")
    # Load into the network once: the export holds exactly what the model accepts.
    backbone = build_features_model(w, info, path=src).state_dict()
    warnings: list[str] = []
    notes: list[str] = []
    if fmt == "torchvision":
        warnings += _stem_warning(info, f"torchvision.models.{info.arch}()")
        notes += _builder_note(info.arch)
        state = {k: v.detach().clone() for k, v in backbone.items()}
        atomic_write(dst, lambda f: torch_save(state, f))
        n = len(state)
    elif fmt == "detectron2":
        problem = c4_problem(info.arch)
        if problem is not None and not info.cifar_stem:
            warnings.append(f"{problem}; the MoCo R-C4 configs will not build with these weights")
        warnings += _stem_warning(info, "detectron2 ResNet")
        if w.layout in ("torchvision", "safetensors"):
            warnings.append(f"{src} is a bare backbone ({w.layout}): only its backbone keys are "
                            "converted (the original script expects a MoCo checkpoint)")
            obj = detectron2_checkpoint({f"module.encoder_q.{k}": v for k, v in backbone.items()})
        else:
            obj = detectron2_checkpoint(_original_encoder_keys(w))
        atomic_write(dst, lambda f: pickle.dump(obj, f))
        n = len(obj["model"])
    elif fmt == "timm":
        if info.cifar_stem:
            raise ConfigError(f"this {info.arch} has the CIFAR stem (3x3 conv1, no max-pool): "
                             f"timm's {timm_name(info.arch)} has the 7x7 stem; export it as "
                             "torchvision or safetensors")
        tensors, heads = timm_state_dict(info.arch, backbone, seed=seed)
        if dst.suffix == ".safetensors":
            write_safetensors(dst, tensors, {"format": "pt", "source": src.name,
                                             "arch": info.arch})
        else:
            atomic_write(dst, lambda f: torch_save(tensors, f))
        n = len(tensors)
        name = timm_name(info.arch)
        notes.append(f"the classifier ({', '.join(heads)}) is timm's fresh initialisation, not "
                     "trained (MoCo pretraining trains no classifier): fine-tune it, or build the "
                     "model with num_classes=N for your classes")
        notes.append(f"load with timm.create_model({name!r}, pretrained=True, "
                     f"pretrained_cfg_overlay=dict(file={str(dst)!r}))")
    else:
        tensors = {k: v.detach().contiguous().clone() for k, v in backbone.items()}
        metadata = {
            "format": SAFETENSORS_FORMAT, "arch": info.arch,
            "cifar_stem": "true" if info.cifar_stem else "false",
            "feature_dim": str(info.backbone_dim), "image_size": str(info.image_size),
            "mean": json.dumps(list(info.mean)), "std": json.dumps(list(info.std)),
            "source": src.name, "source_layout": info.layout,
            "epoch": "" if info.epoch is None else str(info.epoch),
        }
        write_safetensors(dst, tensors, metadata)
        n = len(tensors)
    return ExportResult(dst, fmt, n, info, warnings, notes)
