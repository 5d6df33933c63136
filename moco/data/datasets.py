"""The order images are read in and the torch Datasets of the per-image (PIL) path.

Randomness depends only on (seed, epoch, position): a run resumes mid-epoch exactly and the
global order does not depend on the process count.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from moco.core.seeding import epoch_generator, stream_generator
from moco.data.source import DataError, ImageSource, check_policy, load_checked


def class_balanced_subset(labels: list[int], n: int, seed: int) -> list[int]:
    """``n`` indices with (as nearly as possible) equal counts per class, drawn with ``seed``."""
    g = stream_generator(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    classes = sorted(by_class)
    # Equal shares; a class smaller than its share gives all it has and the shortfall is
    # spread over the others, so the subset has min(n, len(labels)) images.
    take = dict.fromkeys(classes, 0)
    left = min(n, len(labels))
    while left > 0:
        open_ = [c for c in classes if take[c] < len(by_class[c])]
        per, extra = divmod(left, len(open_))
        for j, c in enumerate(open_):
            add = min(len(by_class[c]) - take[c], per + (1 if j < extra else 0))
            take[c] += add
            left -= add
    chosen: list[int] = []
    for c in classes:
        idx = by_class[c]
        perm = torch.randperm(len(idx), generator=g)[:take[c]]
        chosen += [idx[int(p)] for p in perm]
    return sorted(chosen)


class TwoViewDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Item ``(index, seed)`` -> (query view, key view), both [3, S, S] float.

    Unreadable files follow ``on_bad_image`` (see :func:`load_checked`); :meth:`views` also
    returns the index actually loaded, so a loader can count replaced images.
    """

    def __init__(self, source: ImageSource, two_views: object, on_bad_image: str = "stop") -> None:
        check_policy(on_bad_image)
        self.source = source
        self.two_views = two_views
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.source)

    def views(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(query view, key view, index loaded): the views of the loaded image, seeded by the
        position's seed (so a replacement is as deterministic as the original)."""
        index, seed = item
        img, loaded = load_checked(self.source, index, self.on_bad_image)
        q, k = self.two_views(img, seed)  # type: ignore[operator]
        return q, k, loaded

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, _ = self.views(item)
        return q, k


class EvalDataset(Dataset[tuple[torch.Tensor, int]]):
    """Item i -> (image [3, S, S], label or -1). Unreadable files follow ``on_bad_image``; a
    replaced image keeps the label of index i."""

    def __init__(self, source: ImageSource, transform: object, on_bad_image: str = "stop") -> None:
        check_policy(on_bad_image)
        self.source = source
        self.transform = transform
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        label = self.source.labels[i] if self.source.labels is not None else -1
        img, _ = load_checked(self.source, i, self.on_bad_image)
        return self.transform(img), label  # type: ignore[operator]


def epoch_order(n: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The epoch's sample order [n] and one augmentation seed per position [n].

    Both depend only on (seed, epoch), so a run resumes mid-epoch exactly and the order does
    not depend on the number of workers or processes.
    """
    g = epoch_generator(seed, epoch)
    order = torch.randperm(n, generator=g)
    seeds = torch.randint(0, 2**62, (n,), generator=g)
    return order, seeds


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Full batches of ``(index, seed)`` for one epoch, from ``start_step`` on (drop_last).

    With ``world_size`` > 1, each global batch of ``batch_size * world_size`` samples is cut
    into contiguous per-rank slices, so the global order is the same for any process count.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.global_batch = batch_size * world_size
        if n < self.global_batch:
            raise DataError(
                f"the training set has {n} images, fewer than one batch of {self.global_batch}; "
                "lower --batch-size or add images"
            )

    def steps(self) -> int:
        return self.n // self.global_batch

    def __len__(self) -> int:
        return self.steps() - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order, seeds = epoch_order(self.n, self.seed, self.epoch)
        for step in range(self.start_step, self.steps()):
            lo = step * self.global_batch + self.rank * self.batch_size
            yield [(int(order[i]), int(seeds[i])) for i in range(lo, lo + self.batch_size)]
