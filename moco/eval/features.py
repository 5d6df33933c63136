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
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moco.data.input_settings import InputSettings
from moco.data.source import ImageSource
from moco.utils.runtime import resolve_device

#: The settings of a pretraining run that decide how its evaluation images are read and
#: encoded (the monitor's), taken from a checkpoint by :func:`eval_config`.
EVAL_SETTINGS = ("image_size", "mean", "std", "loader", "on_bad_image", "channels_last",
                 "precision")


@dataclass(frozen=True)
class FeatureOptions:
    """How :func:`extract_features` computes and stores the features.

    ``normalize`` L2-normalises each row (the kNN features; computed in float32, under
    autocast too); ``dtype`` and ``out_device`` are where the rows are stored (the training
    monitor keeps its bank on the GPU, read in place by every query chunk);
    ``channels_last`` is the input's memory format; ``autocast_dtype`` the model's autocast
    (None: float32)."""

    normalize: bool = True
    dtype: torch.dtype = torch.float32
    out_device: torch.device | str = "cpu"
    channels_last: bool = False
    autocast_dtype: torch.dtype | None = None


class _Rows:
    """The rows [N, D] and labels [N] collected batch by batch: into one preallocated tensor
    when the number of images ``n`` is known (the peak memory is the bank itself, not twice
    it), else in a list concatenated at the end."""

    def __init__(self, n: int | None, dtype: torch.dtype, device: torch.device) -> None:
        self.n, self.dtype, self.device = n, dtype, device
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.out: torch.Tensor | None = None
        self.labels = torch.full((n or 0,), -1, dtype=torch.long)
        self.pos = 0

    def add(self, f: torch.Tensor, y: torch.Tensor) -> None:
        b = f.shape[0]
        if self.n is None:
            self.parts.append((f, y))
        else:
            if self.pos + b > self.n:
                raise ValueError(f"more images than expected ({self.n})")
            if self.out is None:
                self.out = torch.empty((self.n, f.shape[1]), dtype=self.dtype, device=self.device)
            self.out[self.pos:self.pos + b] = f
            self.labels[self.pos:self.pos + b] = y
        self.pos += b

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.out is None and not self.parts:  # no batch at all
            raise ValueError("no images to extract features from")
        if self.n is None:
            return (torch.cat([f for f, _ in self.parts]),
                    torch.cat([y for _, y in self.parts]).to(self.device))
        if self.pos != self.n:
            raise ValueError(f"expected {self.n} images, got {self.pos}")
        assert self.out is not None
        return self.out, self.labels.to(self.device)


def _encode(model: nn.Module, x: torch.Tensor, device: torch.device,
            opts: FeatureOptions) -> torch.Tensor:
    """The features of one batch as stored: [B, D] in ``opts.dtype`` on ``opts.out_device``."""
    x = x.to(device, non_blocking=True)
    if opts.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=opts.autocast_dtype or torch.float32,
                        enabled=opts.autocast_dtype is not None):
        f = model(x)
    f = F.normalize(f.float(), dim=1) if opts.normalize else f.float()
    return f.to(torch.device(opts.out_device), opts.dtype)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, Any]],
    device: str | torch.device = "cpu",
    *,
    n: int | None = None,
    progress: Any = None,
    options: FeatureOptions | None = None,
    **settings: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``model`` (in eval mode, restored afterwards) on every batch ``(images [B,3,H,W],
    labels [B])`` on ``device`` (``"cpu"``, ``"cuda:0"``, ``"auto"`` or a ``torch.device``):
    features [N, D] and labels [N] (int64, -1 for unlabeled images).

    ``options`` (:class:`FeatureOptions`), or its fields as keywords (``normalize=False``,
    ``out_device=...``), say how they are computed and stored. With ``n`` (the number of
    images) the features go into one preallocated tensor. ``progress``: an optional tqdm bar
    advanced by each batch's size.
    """
    opts = replace(options or FeatureOptions(), **settings)
    dev = resolve_device(device)
    rows = _Rows(n, opts.dtype, torch.device(opts.out_device))
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            f = _encode(model, x, dev, opts)
            rows.add(f, torch.as_tensor(y).cpu())
            if progress is not None:
                progress.update(f.shape[0])
    finally:
        model.train(was_training)
    return rows.result()


def source_features(model: nn.Module, source: ImageSource, cfg: InputSettings,
                    device: str | torch.device, workers: int, *, batch_size: int = 256,
                    progress: Any = None, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The L2-normalised features [N, D] and labels [N] of every image of ``source``, in
    order, through the one evaluation pipeline (see the module docstring). ``options``: the
    fields of :class:`FeatureOptions` (``autocast_dtype``, ``dtype``, ``out_device``)."""
    from moco.data.loaders import eval_batches

    dev = resolve_device(device)
    return extract_features(model, eval_batches(cfg, source, dev, workers, batch_size), dev,
                            n=len(source), progress=progress, **options)


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
