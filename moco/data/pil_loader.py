"""The per-image PIL pipeline (``--loader pil``, the original recipe): DataLoader workers
decode and augment each image, the batch is sent to the device.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from moco.data.augment import two_view_transform
from moco.data.batches import Batch, LoaderState, images_to_device
from moco.data.datasets import EpochBatchSampler, TwoViewDataset
from moco.data.input_settings import InputSettings
from moco.data.source import ImageSource, ignore_stop_signals


class _IndexedTwoViews(TwoViewDataset):
    """(q, k, index loaded, index replaced or -1): with ``--on-bad-image skip`` an unreadable
    image is replaced by the next readable one (``moco.data.source.load_checked``)."""

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:  # type: ignore[override]
        q, k, loaded = self.views(item)
        return q, k, loaded, (item[0] if loaded != item[0] else -1)


class PILTrainLoader(LoaderState):
    """The original recipe: PIL decode + torchvision transforms in DataLoader workers."""

    def __init__(self, cfg: InputSettings, source: ImageSource, device: torch.device, workers: int,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.cfg, self.source, self.device, self.workers = cfg, source, device, workers
        self.rank, self.world_size = rank, world_size
        self.dataset = _IndexedTwoViews(source, two_view_transform(
            cfg.aug, cfg.image_size, cfg.crop_min_scale, cfg.mean, cfg.std), cfg.on_bad_image)

    def _sampler(self, epoch: int, start_step: int) -> EpochBatchSampler:
        return EpochBatchSampler(len(self.source), self.cfg.batch_size, self.cfg.seed, epoch,
                                 start_step, self.rank, self.world_size)

    def steps(self) -> int:
        return self._sampler(0, 0).steps()

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        return self.counted(self._batches(epoch, start_step), start_step * self.cfg.batch_size)

    def _batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        loader = DataLoader(self.dataset, batch_sampler=self._sampler(epoch, start_step),
                            num_workers=self.workers, pin_memory=self.device.type == "cuda",
                            prefetch_factor=4 if self.workers else None,
                            worker_init_fn=ignore_stop_signals if self.workers else None)
        cl = self.cfg.channels_last_on(self.device.type)
        for q, k, idx, bad in loader:
            self.bad_images.update(int(i) for i in bad if i >= 0)
            yield Batch(images_to_device(q, self.device, cl), images_to_device(k, self.device, cl), idx)
