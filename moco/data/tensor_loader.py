"""The tensor pipeline (``--loader tensor``, the default through ``auto``): decoded uint8
images -> batched augmentation on the training device (:mod:`moco.data.batch_augment`).

* :class:`TensorTrainLoader`: for datasets whose decoded pixels fit in memory
  (:mod:`moco.data.cache`). Each step takes its indices from :func:`moco.data.datasets.epoch_order` (the
  same order as the PIL path), gathers the uint8 images, draws every view's parameters from a
  ``torch.Generator`` seeded by (seed, epoch, step) and augments on the device. On CUDA the
  whole array is copied to the GPU once (when it takes under a quarter of the free memory).
* Prefetch (``prefetch``): on CUDA, on by default, batch t+1 is augmented on a side stream
  while step t runs on the main one (:func:`stream_prefetch`; the training step does not wait
  for the GPU, so the host queues both). On the CPU a background thread can prepare the next
  batch; it is off by default there: the model already uses every core, and the thread's work
  then slows the model's threads more than it saves (docs/benchmarks.md).
* :class:`DecodeTrainLoader`: for larger datasets, DataLoader workers decode each step's
  files to uint8 (short side ``short_side``, as the cache's mixed-size layout) and the main
  process augments the padded batch the same way.

Randomness depends only on (seed, epoch, step) and the global position in the batch: a
resumed run gives bit-identical batches, and the views do not depend on the process count
(each rank draws the global batch's parameters and keeps its own slice).
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from moco.core.device import normalize_device, same_device, to_device
from moco.data.aug_params import AugParams
from moco.data.batch_augment import BatchAugment, eval_resize
from moco.data.batches import Batch, LoaderState, step_generator, stream_prefetch, torch_threads
from moco.data.cache import DecodedImages, cached_images, decode_resized
from moco.data.datasets import EpochBatchSampler, epoch_order
from moco.data.input_plan import cache_short_side
from moco.data.input_settings import InputSettings
from moco.data.recipes import eval_resize_size
from moco.data.source import DataError, ImageSource, ignore_stop_signals


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # a read-only memmap: torch only reads it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _rank_params(p: AugParams, global_batch: int, rank: int, batch: int) -> AugParams:
    """This rank's 2B rows of the global batch's 2G parameters (q rows, then k rows)."""
    lo = rank * batch
    sel = torch.cat([torch.arange(lo, lo + batch), torch.arange(global_batch + lo, global_batch + lo + batch)])
    return p.select(sel)


def _finish(q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor, channels_last: bool) -> Batch:
    if channels_last:
        q = q.contiguous(memory_format=torch.channels_last)
        k = k.contiguous(memory_format=torch.channels_last)
    return Batch(q, k, idx)


class TensorTrainLoader(LoaderState):
    """Decoded images in memory -> two augmented views per image, on ``device``.

    ``images``: uint8 [N,H,W,3] (and per-image ``sizes`` [N,2] for a mixed-size cache).
    ``prefetch``: prepare batch t+1 while batch t trains: on a side stream on CUDA (default
    on), in a background thread on the CPU (default off; see the module doc).
    ``aug_threads``: intra-op threads of the CPU augmentation (default 1 on the CPU without
    prefetch, see :func:`torch_threads`; None: unchanged).
    """

    def __init__(self, cfg: InputSettings, images: DecodedImages, device: torch.device,
                 rank: int = 0, world_size: int = 1, prefetch: bool | None = None,
                 aug_threads: int | None = -1) -> None:
        super().__init__()
        device = normalize_device(device)  # cuda -> cuda:<current>, as tensors report it
        self.cfg, self.device, self.rank, self.world_size = cfg, device, rank, world_size
        self.decoded = images
        self.n = len(images)
        self.batch = cfg.batch_size
        self.global_batch = cfg.batch_size * world_size
        if self.n < self.global_batch:
            raise DataError(
                f"the training set has {self.n} images, fewer than one batch of "
                f"{self.global_batch}; lower --batch-size or add images")
        self.aug = BatchAugment(cfg.aug, cfg.image_size, cfg.crop_min_scale, cfg.mean, cfg.std)
        arr = _as_tensor(images.images)
        if device.type == "cuda" and arr.nbytes < torch.cuda.mem_get_info(device)[0] // 4:
            arr = arr.to(device)  # CIFAR-10: 150 MB, gathered on the GPU from then on
        self.images = arr
        self.sizes = torch.from_numpy(np.asarray(images.sizes)) if images.sizes is not None else None
        self.prefetch = device.type == "cuda" if prefetch is None else prefetch
        if aug_threads == -1:
            aug_threads = 1 if device.type == "cpu" and not self.prefetch else None
        self.aug_threads = aug_threads
        self.bad_images = set(images.bad)

    def steps(self) -> int:
        return self.n // self.global_batch

    def _heights_widths(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sizes is None:
            _, h, w, _ = self.images.shape
            return (torch.full((len(idx),), h, dtype=torch.int64),
                    torch.full((len(idx),), w, dtype=torch.int64))
        s = self.sizes.index_select(0, idx).to(torch.int64)
        return s[:, 0], s[:, 1]

    def make_batch(self, order: torch.Tensor, epoch: int, step: int) -> Batch:
        """Global step ``step`` of ``epoch`` (``order`` from :func:`epoch_order`)."""
        with torch_threads(self.aug_threads):
            return self._make_batch(order, epoch, step)

    def _make_batch(self, order: torch.Tensor, epoch: int, step: int) -> Batch:
        g = step_generator(self.cfg.seed, epoch, step)
        gidx = order[step * self.global_batch:(step + 1) * self.global_batch]
        h, w = self._heights_widths(gidx)
        p = self.aug.params(h, w, g)
        if self.world_size > 1:
            p = _rank_params(p, self.global_batch, self.rank, self.batch)
        idx = gidx[self.rank * self.batch:(self.rank + 1) * self.batch]
        imgs = self.images.index_select(0, to_device(idx, self.images.device))
        if not same_device(imgs.device, self.device):  # a large cache stays in host memory
            imgs = to_device(imgs, self.device)
        q, k = self.aug.two_views(imgs, p)
        return _finish(q, k, idx, self.cfg.channels_last_on(self.device.type))

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        return self.counted(self._batches(epoch, start_step), start_step * self.batch)

    def _batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        order, _ = epoch_order(self.n, self.cfg.seed, epoch)
        steps = range(start_step, self.steps())
        if not self.prefetch:
            for step in steps:
                yield self.make_batch(order, epoch, step)
            return
        if self.device.type == "cuda":
            yield from stream_prefetch((self.make_batch(order, epoch, s) for s in steps), self.device)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="moco-aug") as pool:
            pending: Future[Batch] | None = None
            for step in steps:
                cur = pending.result() if pending is not None else self.make_batch(order, epoch, step)
                pending = (pool.submit(self.make_batch, order, epoch, step + 1)
                           if step + 1 < self.steps() else None)
                yield cur
            if pending is not None:
                pending.cancel()


class _DecodeBatches(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Item: a list of ``(index, seed)`` -> (uint8 [B,Hmax,Wmax,3] zero-padded, sizes [B,2],
    indices [B]), each file decoded to the mixed-size layout (short side ``short_side``)."""

    def __init__(self, source: ImageSource, short_side: int, policy: str) -> None:
        self.source, self.short_side, self.policy = source, short_side, policy

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, i: int) -> tuple[np.ndarray, int]:
        assert self.source.files is not None
        n = len(self.source)
        for step in range(n):
            j = (i + step) % n
            try:
                return decode_resized(Path(self.source.files[j]), self.short_side), j
            except DataError:
                if self.policy != "skip":
                    raise
        raise DataError(f"none of the {n} images of {self.source.name} can be read")

    def __getitem__(self, items: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loaded = [self._load(i) for i, _ in items]
        hs = [a.shape[0] for a, _ in loaded]
        ws = [a.shape[1] for a, _ in loaded]
        out = torch.zeros((len(loaded), max(hs), max(ws), 3), dtype=torch.uint8)
        for b, (a, _) in enumerate(loaded):
            out[b, : a.shape[0], : a.shape[1]] = torch.from_numpy(a)
        sizes = torch.tensor(list(zip(hs, ws, strict=True)), dtype=torch.int64)
        replaced = torch.tensor([i if j != i else -1 for (i, _), (_, j) in zip(items, loaded, strict=True)])
        return out, sizes, replaced


def _first(items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """collate_fn: the dataset already returns the whole batch (picklable, unlike a lambda)."""
    return items[0]


class _StepSampler(EpochBatchSampler):
    """One item per step: the list itself (the dataset decodes the whole batch)."""

    def __iter__(self) -> Iterator[list[list[tuple[int, int]]]]:  # type: ignore[override]
        for items in super().__iter__():
            yield [items]


class DecodeTrainLoader(LoaderState):
    """Files decoded in DataLoader workers (uint8, short side ``short_side``) -> the same
    batched augmentation on ``device``, for datasets too large for the decoded cache."""

    def __init__(self, cfg: InputSettings, source: ImageSource, device: torch.device, workers: int,
                 rank: int = 0, world_size: int = 1, short_side: int | None = None) -> None:
        super().__init__()
        self.cfg, self.source, self.workers = cfg, source, workers
        self.device = normalize_device(device)
        self.rank, self.world_size = rank, world_size
        self.global_batch = cfg.batch_size * world_size
        self.aug = BatchAugment(cfg.aug, cfg.image_size, cfg.crop_min_scale, cfg.mean, cfg.std)
        self.dataset = _DecodeBatches(source, short_side or cache_short_side(cfg.image_size),
                                      cfg.on_bad_image)

    def _sampler(self, epoch: int, start_step: int) -> _StepSampler:
        return _StepSampler(len(self.source), self.cfg.batch_size, self.cfg.seed, epoch,
                            start_step, self.rank, self.world_size)

    def steps(self) -> int:
        return self._sampler(0, 0).steps()

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Each rank decodes its own slice; the parameters of the global batch are drawn from
        (seed, epoch, step) and sliced, so views match the in-memory loader's for the same
        decoded pixels. On CUDA the augmentation of batch t+1 overlaps step t
        (:func:`stream_prefetch`)."""
        steps = self._batches(epoch, start_step)
        if self.device.type == "cuda":
            steps = stream_prefetch(steps, self.device)
        return self.counted(steps, start_step * self.cfg.batch_size)

    def _batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        sampler = self._sampler(epoch, start_step)
        # The workers ignore SIGINT/SIGTERM sent to the whole process group (Ctrl-C, a
        # scheduler's preemption): the main process finishes the step, saves and stops.
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.workers,
                            collate_fn=_first, pin_memory=self.device.type == "cuda",
                            prefetch_factor=4 if self.workers else None,
                            worker_init_fn=ignore_stop_signals if self.workers else None)
        order, _ = epoch_order(len(self.source), self.cfg.seed, epoch)
        b = self.cfg.batch_size
        for step, (imgs, sizes, replaced) in enumerate(loader, start=start_step):
            self.bad_images.update(int(i) for i in replaced if i >= 0)
            gidx = order[step * self.global_batch:(step + 1) * self.global_batch]
            g = step_generator(self.cfg.seed, epoch, step)
            # Heights/widths of the whole global batch: other ranks' images are not decoded
            # here, so draw with each rank's own sizes for its slice and the others' slots
            # filled by this rank's first size (their parameters are discarded).
            hs = torch.full((self.global_batch,), int(sizes[0, 0]), dtype=torch.int64)
            ws = torch.full((self.global_batch,), int(sizes[0, 1]), dtype=torch.int64)
            lo = self.rank * b
            hs[lo:lo + b], ws[lo:lo + b] = sizes[:, 0], sizes[:, 1]
            p = self.aug.params(hs, ws, g)
            if self.world_size > 1:
                p = _rank_params(p, self.global_batch, self.rank, b)
            idx = gidx[lo:lo + b]
            with torch_threads(1 if self.device.type == "cpu" else None):
                q, k = self.aug.two_views(to_device(imgs, self.device), p)
                out = _finish(q, k, idx, self.cfg.channels_last_on(self.device.type))
            yield out


_DECODED: weakref.WeakKeyDictionary[ImageSource, dict[tuple[str, int], DecodedImages | None]] = (
    weakref.WeakKeyDictionary())


def decoded_or_none(cfg: InputSettings, source: ImageSource, workers: int) -> DecodedImages | None:
    """The source's decoded images (cache built on first use), or None when they do not fit
    in memory (or the cache folder cannot be written). Remembered per source object, so the
    per-epoch kNN evaluation does not re-check the files."""
    key = (cfg.cache_dir, cache_short_side(cfg.image_size))
    known = _DECODED.setdefault(source, {})
    if key not in known:
        from moco.data.input_plan import cache_declined  # shards; a size estimate from the index

        known[key] = None if cache_declined(cfg, source) else cached_images(source, cfg.cache_dir or None, short_side=key[1],
                                   workers=max(1, workers or (os.cpu_count() or 1)),
                                   on_bad_image=cfg.on_bad_image)
    return known[key]


def eval_batches_decoded(cfg: InputSettings, decoded: DecodedImages, device: torch.device,
                         batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Resize + center crop + normalize (as :func:`moco.data.augment.eval_transform`) of decoded
    images, in order, with their labels (-1 when unlabeled): [B,3,S,S] on ``device``."""
    from moco.data.batch_augment import normalize

    size = cfg.image_size
    resize = eval_resize_size(size)
    arr = _as_tensor(decoded.images)
    sizes = torch.from_numpy(np.asarray(decoded.sizes)) if decoded.sizes is not None else None
    labels = torch.tensor(decoded.labels if decoded.labels is not None else [-1] * len(decoded))
    for lo in range(0, len(decoded), batch_size):
        x = arr[lo:lo + batch_size].to(device, non_blocking=True)
        s = sizes[lo:lo + batch_size] if sizes is not None else None
        if s is not None:  # trim the padding this chunk does not use
            x = x[:, : int(s[:, 0].max()), : int(s[:, 1].max())]
        out = normalize(eval_resize(x, size, resize, s), cfg.mean, cfg.std)
        if cfg.channels_last_on(device.type):
            out = out.contiguous(memory_format=torch.channels_last)
        yield out, labels[lo:lo + batch_size]
