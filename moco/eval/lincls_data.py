"""Batches of ``moco lincls`` that do not depend on the number of processes.

Every epoch has one global order of the N training images and one augmentation seed per
position (:func:`moco.data.datasets.epoch_order`: both from (seed, epoch) only). Step j's global batch
is positions ``[j*B, (j+1)*B)`` (the last one may be smaller: the original does not drop it);
under torchrun each process takes a part of it, and each part's loss is normalised by the
*global* batch size (:func:`loss_scale`), so the averaged gradient is the one a single process
computes over the whole batch, whatever the process count (up to float rounding), and a run
resumes mid-epoch on any number of processes.

* images (the protocol): the global batch is cut into ``world_size`` contiguous, nearly equal
  parts (:func:`contiguous_part`); each image is augmented under its position's seed;
* cached features (``--fast``): each process holds the features of the images it *owns*
  (index ``i % world_size == rank``, :func:`owned`) and takes the owned members of each batch
  (:func:`owned_part`): the feature bank is split across processes, not copied.

Validation is split by ownership too; the correct counts are summed over processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from moco.core.seeding import seeded
from moco.data.datasets import EvalDataset, epoch_order
from moco.data.source import ImageSource, ignore_stop_signals


def num_steps(n: int, batch_size: int) -> int:
    """Steps per epoch: every image once, the last batch partial (``drop_last=False``)."""
    return -(-n // batch_size)


def contiguous_part(m: int, rank: int, world_size: int) -> range:
    """Positions ``[0, m)`` of a global batch that process ``rank`` computes: contiguous parts
    whose sizes differ by at most one (``torch.tensor_split``); empty when ``m < world_size``
    for the last ranks."""
    q, r = divmod(m, world_size)
    lo = rank * q + min(rank, r)
    return range(lo, lo + q + (1 if rank < r else 0))


def owned(n: int, rank: int, world_size: int) -> list[int]:
    """The dataset indices process ``rank`` holds features of: ``i % world_size == rank``."""
    return list(range(rank, n, world_size))


def owned_part(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Positions of ``indices`` (a global batch [m]) whose image process ``rank`` owns."""
    return torch.nonzero(indices % world_size == rank).flatten()


def loss_scale(m: int, world_size: int) -> float:
    """Factor of a process's *summed* cross-entropy: ``world_size / m`` for a global batch of m.

    Gradient averaging over processes (DDP) divides by ``world_size``, so the result is
    (1/m) x the sum over the whole global batch: the single-process mean, whatever the split.
    """
    return world_size / m


class SeededImages(Dataset[tuple[torch.Tensor, int]]):
    """Item ``(index, seed)`` -> (image ``index`` through ``transform`` with the torch RNG
    seeded by ``seed`` (restored afterwards), its label). The augmentation of an image then
    depends only on (seed, epoch, position): not on workers, processes or a resume."""

    def __init__(self, source: ImageSource, transform: Any) -> None:
        self.inner = EvalDataset(source, transform)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item
        with seeded(seed):
            return self.inner[index]


class StepBatches(Sampler[list[tuple[int, int]]]):
    """This process's ``(index, seed)`` lists of one epoch, one per step from ``start_step``
    (possibly empty: a last batch smaller than the process count)."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.start_step, self.rank, self.world_size = start_step, rank, world_size

    def __len__(self) -> int:
        return max(0, num_steps(self.n, self.batch_size) - self.start_step)

    def global_sizes(self) -> list[int]:
        """Size m of each global batch from ``start_step`` on."""
        b, n = self.batch_size, self.n
        return [min(b, n - j * b) for j in range(self.start_step, num_steps(n, b))]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order, seeds = epoch_order(self.n, self.seed, self.epoch)
        for step in range(self.start_step, num_steps(self.n, self.batch_size)):
            lo = step * self.batch_size
            m = min(self.batch_size, self.n - lo)
            part = contiguous_part(m, self.rank, self.world_size)
            yield [(int(order[lo + i]), int(seeds[lo + i])) for i in part]


class _EmptyAware:
    """``default_collate``, and an empty [0,3,S,S] / [0] pair for an empty list of items."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, items: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        if not items:
            s = self.image_size
            return torch.empty(0, 3, s, s), torch.empty(0, dtype=torch.long)
        x = torch.stack([it[0] for it in items])
        return x, torch.as_tensor([it[1] for it in items], dtype=torch.long)


def train_batches(source: ImageSource, transform: Any, sampler: StepBatches, image_size: int,
                  workers: int, pin_memory: bool) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(images [b,3,S,S], labels [b]) of each step of ``sampler``, in order."""
    return DataLoader(SeededImages(source, transform), batch_sampler=sampler,
                      collate_fn=_EmptyAware(image_size), num_workers=workers,
                      pin_memory=pin_memory, worker_init_fn=ignore_stop_signals if workers else None)


class _Subset(Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, source: ImageSource, transform: Any, indices: Sequence[int]) -> None:
        self.inner = EvalDataset(source, transform)
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.inner[self.indices[i]]


def owned_batches(source: ImageSource, transform: Any, rank: int, world_size: int,
                  batch_size: int, workers: int, pin_memory: bool
                  ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of the images this process owns (:func:`owned`), in index order,
    without augmentation: for cached features and for validation."""
    ds = _Subset(source, transform, owned(len(source), rank, world_size))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=pin_memory, worker_init_fn=ignore_stop_signals if workers else None)
