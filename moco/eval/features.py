"""Features of images through a frozen encoder: the one extractor (:func:`extract_features`)
and the one evaluation pipeline of the kNN protocol (:func:`source_features`), shared by the
training monitor (:mod:`moco.engine.evaluation`) and ``moco knn`` (:mod:`moco.cli.knn`), so
that both give the same figure for the same weights by construction.

The pipeline is :func:`moco.data.loaders.eval_batches` (resize + center crop + normalize; the
decoded-image cache when it fits in memory, else the per-image PIL transform) driven by
:class:`~moco.data.input_settings.InputSettings`: the run's own during pretraining, and for a
checkpoint the settings its run recorded (:func:`eval_config`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moco.data.input_settings import InputSettings
from moco.data.source import ImageSource

#: The settings of a pretraining run that decide how its evaluation images are read and
#: encoded (the monitor's), taken from a checkpoint by :func:`eval_config`.
EVAL_SETTINGS = ("image_size", "mean", "std", "loader", "on_bad_image", "channels_last",
                 "precision")


@torch.no_grad()
def extract_features(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, Any]],
    device: torch.device,
    *,
    n: int | None = None,
    normalize: bool = True,
    dtype: torch.dtype = torch.float32,
    out_device: torch.device | str = "cpu",
    channels_last: bool = False,
    autocast_dtype: torch.dtype | None = None,
    progress: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``model`` (in eval mode, restored afterwards) on every batch ``(images [B,3,H,W],
    labels [B])``: features [N, D] in ``dtype`` on ``out_device`` and labels [N] (int64, -1
    for unlabeled images).

    ``normalize`` L2-normalises each row (the kNN features; computed in float32, under
    autocast too). With ``n`` (the number of images) the features go into one preallocated
    tensor: the peak memory is the bank itself, not twice it (list + cat). ``out_device`` may
    be the GPU: the training monitor keeps its bank there, read in place by every query
    chunk. ``progress``: an optional tqdm bar advanced by each batch's size.
    """
    was_training = model.training
    model.eval()
    out_device = torch.device(out_device)
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    out: torch.Tensor | None = None
    labels = torch.full((n or 0,), -1, dtype=torch.long)
    pos = 0
    try:
        for x, y in batches:
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                f = model(x)
            f = F.normalize(f.float(), dim=1) if normalize else f.float()
            f = f.to(out_device, dtype)
            y = torch.as_tensor(y).cpu()
            b = f.shape[0]
            if n is None:
                parts.append((f, y))
            else:
                if pos + b > n:
                    raise ValueError(f"more images than expected ({n})")
                if out is None:
                    out = torch.empty((n, f.shape[1]), dtype=dtype, device=out_device)
                out[pos:pos + b] = f
                labels[pos:pos + b] = y
            pos += b
            if progress is not None:
                progress.update(b)
    finally:
        model.train(was_training)
    if out is None and not parts:  # no batch at all
        raise ValueError("no images to extract features from")
    if n is None:
        return torch.cat([f for f, _ in parts]), torch.cat([y for _, y in parts]).to(out_device)
    if pos != n:
        raise ValueError(f"expected {n} images, got {pos}")
    assert out is not None
    return out, labels.to(out_device)


def source_features(model: nn.Module, source: ImageSource, cfg: InputSettings,
                    device: torch.device, workers: int, *,
                    autocast_dtype: torch.dtype | None, dtype: torch.dtype = torch.float32,
                    out_device: torch.device | str = "cpu", batch_size: int = 256,
                    progress: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The L2-normalised features [N, D] and labels [N] of every image of ``source``, in
    order, through the one evaluation pipeline (see the module docstring)."""
    from moco.data.loaders import eval_batches

    return extract_features(model, eval_batches(cfg, source, device, workers, batch_size),
                            device, n=len(source), dtype=dtype, out_device=out_device,
                            autocast_dtype=autocast_dtype, progress=progress)


@dataclass(frozen=True)
class EvalSettings:
    """How a checkpoint's images are read (``inputs``) and encoded (``precision``: auto,
    fp32, bf16 or fp16)."""

    inputs: InputSettings
    precision: str = "auto"


def eval_config(recorded: dict[str, Any] | None, *, image_size: int, mean: Iterable[float],
                std: Iterable[float], cache_dir: str = "", workers: int = -1,
                precision: str | None = None) -> EvalSettings:
    """The evaluation settings of a checkpoint: :data:`EVAL_SETTINGS` as its pretraining run
    recorded them (``recorded``: the checkpoint's config; defaults for other files), with the
    image size, mean and std given (the caller's choice, else the recorded ones) and this
    machine's cache folder and workers. ``precision`` overrides the recorded one."""
    values = {k: v for k, v in (recorded or {}).items() if k in EVAL_SETTINGS}
    recorded_precision = str(values.pop("precision", "auto"))
    values.update(image_size=int(image_size), mean=tuple(float(x) for x in mean),
                  std=tuple(float(x) for x in std), cache_dir=cache_dir, workers=workers)
    return EvalSettings(InputSettings(**values), precision or recorded_precision)
