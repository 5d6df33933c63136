"""Which pipeline a run's batches come from: :func:`make_train_loader` picks the training
loader (a :class:`~moco.data.batches.TrainLoader`) and :func:`eval_batches` the evaluation
images.

The pipelines: the per-image PIL one (``--loader pil``, the original recipe,
:mod:`moco.data.pil_loader`); the batched tensor one from the decoded cache or from workers
that decode (:mod:`moco.data.tensor_loader`); original-size crops from the files or tar shards
(:mod:`moco.data.crop_loader`, :mod:`moco.data.shard_loader`), chosen by
:mod:`moco.data.input_plan`. Randomness depends only on (seed, epoch, position), so a run
resumes mid-epoch exactly and the global order does not depend on the process count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch.utils.data import DataLoader

from moco.data.augment import eval_transform
from moco.data.batches import TrainLoader, images_to_device
from moco.data.datasets import EvalDataset
from moco.data.input_plan import original_crops_loader
from moco.data.input_settings import InputSettings
from moco.data.pil_loader import PILTrainLoader
from moco.data.source import ImageSource, ignore_stop_signals
from moco.data.tensor_loader import (
    DecodeTrainLoader,
    TensorTrainLoader,
    decoded_or_none,
    eval_batches_decoded,
)

_log = logging.getLogger(__name__)


def make_train_loader(cfg: InputSettings, source: ImageSource, device: torch.device, workers: int,
                      rank: int = 0, world_size: int = 1) -> TrainLoader:
    """The training pipeline ``cfg.loader`` asks for: ``pil``, the original per-image recipe;
    ``auto`` / ``tensor``, the batched pipeline (:func:`make_tensor_loader`: original-size
    crops, the decoded cache when it fits in memory, else decoding in workers; augmentation
    on ``device``)."""
    if cfg.loader == "pil":
        return PILTrainLoader(cfg, source, device, workers, rank, world_size)

    return make_tensor_loader(cfg, source, device, workers, rank, world_size)


def eval_batches(cfg: InputSettings, source: ImageSource, device: torch.device, workers: int,
                 batch_size: int = 256) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Un-augmented images of ``source`` (resize + center crop) and their labels, in order.

    Except with ``--loader pil``, from the decoded cache (:mod:`moco.data.cache`) when it
    fits, resized and cropped by tensor ops on ``device``."""
    if cfg.loader != "pil":
        decoded = decoded_or_none(cfg, source, workers)
        if decoded is not None:
            yield from eval_batches_decoded(cfg, decoded, device, batch_size)
            return
    tf = eval_transform(cfg.image_size, cfg.mean, cfg.std)
    loader = DataLoader(EvalDataset(source, tf, cfg.on_bad_image), batch_size=batch_size,
                        shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_stop_signals if workers else None)
    for x, y in loader:
        yield images_to_device(x, device, cfg.channels_last_on(device.type)), y


def make_tensor_loader(cfg: InputSettings, source: ImageSource, device: torch.device, workers: int,
                       rank: int = 0, world_size: int = 1) -> TrainLoader:
    """Original-size crops when the run takes them (:mod:`moco.data.input_plan`), else the
    in-memory pipeline when the decoded images fit, else worker decoding."""
    crops = original_crops_loader(cfg, source, device, workers, rank, world_size)
    if crops is not None:
        return crops
    decoded = decoded_or_none(cfg, source, workers)
    if decoded is not None:
        return TensorTrainLoader(cfg, decoded, device, rank, world_size)
    _log.info("the decoded images do not fit in memory: decoding in workers each epoch")
    return DecodeTrainLoader(cfg, source, device, workers, rank, world_size)
