"""The export formats of ``moco export``: a registry, name -> writer, light to import (no torch).

A format is a name, a one-line summary for ``--help`` and its writer, named ``"module:function"``
and imported only when the format is used, so that a command's help and choices cost nothing
and a format may live in a package above :mod:`moco.eval` (the Hugging Face format of
:mod:`moco.hub`, registered by the command layer). The writer is called with an
:class:`moco.eval.export.ExportJob` (the source, the output path, the encoder's weights and
:class:`~moco.eval.pretrained.PretrainedInfo`, the backbone tensors as the network holds them,
the seed), writes ``job.out`` (atomically), may add ``job.warnings`` and ``job.notes``, and
returns how many tensors it wrote. A new format is one function and one
:func:`register_format` call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moco.core.errors import ConfigError


@dataclass(frozen=True)
class ExportFormat:
    """``writer``: ``"package.module:function"`` (or the function itself)."""

    name: str
    summary: str
    writer: str | Callable[[Any], int]

    def load(self) -> Callable[[Any], int]:
        if callable(self.writer):
            return self.writer
        module, _, attr = self.writer.partition(":")
        fn: Callable[[Any], int] = getattr(importlib.import_module(module), attr)
        return fn


_FORMATS: dict[str, ExportFormat] = {}


def register_format(fmt: ExportFormat, *, replace: bool = False) -> None:
    """Make ``fmt`` available to :func:`moco.eval.export.export_checkpoint` and ``moco export
    --format`` (a name taken already is an error unless ``replace``)."""
    if fmt.name in _FORMATS and not replace:
        raise ValueError(f"an export format named {fmt.name!r} is registered already")
    _FORMATS[fmt.name] = fmt


def export_formats() -> list[str]:
    """The registered format names, in registration order."""
    return list(_FORMATS)


def get_format(name: str) -> ExportFormat:
    if name not in _FORMATS:
        raise ConfigError(f"unknown export format {name!r}; choose one of "
                          f"{', '.join(_FORMATS)}")
    return _FORMATS[name]


_W = "moco.eval.export_writers:"
for _fmt in (
    ExportFormat("torchvision", "the backbone's state dict under torchvision's names, no fc "
                 "(torchvision.models.ARCH().load_state_dict(sd, strict=False)); ResNets and "
                 "registered CNNs; .safetensors when the file ends so", _W + "write_torchvision"),
    ExportFormat("detectron2", "the pickle of the original convert-pretrain-to-detectron2.py "
                 "(ResNets; moco detectron2-config prints the training command)",
                 _W + "write_detectron2"),
    ExportFormat("safetensors", "the backbone tensors with arch, stem, image size, mean/std "
                 "(and a ViT's spec) in the metadata; read back by moco", _W + "write_safetensors_export"),
    ExportFormat("timm", "timm's names plus timm's default classifier at a fresh init, for "
                 "timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=FILE)) "
                 "(timm CNNs, ResNets timm has, ViTs); .safetensors when the file ends so",
                 _W + "write_timm"),
    ExportFormat("deit", "a ViT for fine-tuning in DeiT's main.py --finetune: {'model': timm ViT "
                 "keys}, the head left out (as MoCo v3's convert_to_deit.py)", _W + "write_deit"),
):
    register_format(_fmt)
