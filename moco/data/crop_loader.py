"""Original-size crops (``--crops original``, the default for images larger than the cache
keeps): every step's crop boxes are drawn on each file's ORIGINAL size, as the original
recipe's ``RandomResizedCrop`` on the decoded image (MoCo v1 §4.1, v2 §3), and only what
the crops need is decoded (:mod:`moco.data.decode`).

Per step, a DataLoader worker

1. draws the global batch's parameters from (seed, epoch, step) (:func:`step_generator`,
   the same draws as the in-memory loader) with each image's original (height, width) from
   the index (:mod:`moco.data.index`, :mod:`moco.data.shards`), and keeps this rank's rows;
2. reads the files' bytes, and either decodes + crops them on the CPU (``--decode cpu``:
   uint8 [2B,3,S,S] views, a reduced-size JPEG decode when every crop allows it) or hands
   the bytes over in one uint8 tensor, in shared memory (``--decode gpu``: the main process
   decodes the batch on the device in one call, :func:`moco.data.decode.decode_on_device`,
   a file nvJPEG refuses alone on the CPU, and crops there in one call per image size,
   :func:`moco.data.decode.crop_on_device`).

The main process finishes the views on the training device: flip, colour jitter, grayscale,
blur and normalisation of :mod:`moco.data.batch_augment`, batched.

Unreadable files follow ``--on-bad-image``: ``stop`` raises a :class:`DataError` naming the
file; ``skip`` replaces image i by the next readable one (i+1, i+2, ... wrapping), whose
crops are drawn for its own size from (seed, epoch, step, position) (:func:`position_generator`),
as are the crops of an image whose decoded size differs from the index (changed in place).
Randomness is therefore a function of (seed, epoch, step, position) only: a resumed run gets
bit-identical batches on the CPU, whatever the worker count.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from moco.core.device import normalize_device
from moco.core.device import packed_to_device as plan_to_device
from moco.core.seeding import keyed_generator
from moco.data.aug_params import AugParams, Recipe, sample_crops
from moco.data.batch_augment import BatchAugment, apply_colour, colour_plan
from moco.data.batches import Batch, LoaderState, step_generator, stream_prefetch, torch_threads
from moco.data.datasets import EpochBatchSampler
from moco.data.decode import crop_on_device, decode_on_device, decode_views
from moco.data.input_settings import InputSettings
from moco.data.source import BAD_IMAGE_HINT, DataError, ignore_stop_signals


class SampleReader(Protocol):
    """Random access to the encoded bytes of N samples."""

    def read(self, i: int) -> bytes: ...

    def name(self, i: int) -> str: ...


class FileReader:
    """Samples that are files: ``read`` returns the whole file."""

    def __init__(self, files: Sequence[object]) -> None:
        self.files = [str(f) for f in files]

    def read(self, i: int) -> bytes:
        try:
            with open(self.files[i], "rb") as f:
                return f.read()
        except OSError as e:
            raise DataError(f"cannot read image {self.files[i]}: {e.strerror or e}") from None

    def name(self, i: int) -> str:
        return self.files[i]


def position_generator(seed: int, epoch: int, step: int, position: int) -> torch.Generator:
    """The generator of one position's redrawn crops (a replaced or resized image)."""
    return keyed_generator("moco-crop", seed, epoch, step, position)


@dataclass
class Work:
    """A worker's step: ``views`` uint8 [2B,3,S,S] (q rows, then k rows; empty when the
    device decodes), ``blob`` uint8 [n] the B files' encoded bytes one after another (device
    decoding only, else empty) with ``offsets`` int64 [B+1] (file k is
    ``blob[offsets[k]:offsets[k+1]]``), ``crops`` [2B,4], ``params`` the other per-view
    parameters, ``indices`` [B] the dataset indices, ``loaded`` [B] the indices actually read
    (differ where an image was replaced), ``where`` (epoch, step).

    The bytes travel as one tensor: a DataLoader worker hands it to the main process in
    shared memory, where bytes objects would be pickled through the worker's pipe."""

    views: torch.Tensor
    blob: torch.Tensor
    offsets: torch.Tensor
    crops: torch.Tensor
    params: dict[str, torch.Tensor]
    indices: torch.Tensor
    loaded: torch.Tensor
    where: tuple[int, int]

    def files(self) -> list[torch.Tensor]:
        """Each file's bytes, uint8 [n_k] views of ``blob`` (no copy)."""
        o = self.offsets.tolist()
        return [self.blob[o[k]:o[k + 1]] for k in range(len(o) - 1)]

    def pin_memory(self) -> Work:
        """What the DataLoader's pinning thread calls: the tensors copied to the device pinned,
        the bytes left where they are (nvJPEG and the CPU decoders read them on the host)."""
        return replace(self, views=self.views.pin_memory(), crops=self.crops.pin_memory(),
                       params={k: v.pin_memory() for k, v in self.params.items()},
                       indices=self.indices.pin_memory(), loaded=self.loaded.pin_memory())


def pack_bytes(blobs: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """``blobs`` one after another in a uint8 [n] tensor, and the int64 [B+1] offsets."""
    offsets = torch.zeros(len(blobs) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([len(b) for b in blobs], dtype=torch.int64).cumsum(0)
    blob = torch.empty(int(offsets[-1]), dtype=torch.uint8)
    arr = blob.numpy()
    for o, data in zip(offsets.tolist(), blobs, strict=False):
        arr[o:o + len(data)] = np.frombuffer(data, dtype=np.uint8)
    return blob, offsets


class Meta(NamedTuple):
    """Per-sample original sizes and kinds: int64 arrays [N] (from an index)."""

    heights: np.ndarray
    widths: np.ndarray
    kinds: np.ndarray


class CropWork:
    """The worker side (picklable): parameters, bytes, CPU decoding and crops of one step."""

    def __init__(self, cfg: InputSettings, reader: SampleReader, meta: Meta, rank: int,
                 world_size: int, on_device: bool) -> None:
        self.reader, self.meta, self.rank, self.on_device = reader, meta, rank, on_device
        self.seed, self.policy, self.size = cfg.seed, cfg.on_bad_image, cfg.image_size
        self.batch, self.global_batch = cfg.batch_size, cfg.batch_size * world_size
        self.aug = BatchAugment(cfg.aug, cfg.image_size, cfg.crop_min_scale, cfg.mean, cfg.std)
        self.n = len(meta.heights)
        # CPU decoding: a reduced-size JPEG decode when the crops allow it; PIL instead of
        # decode_jpeg only for the benchmark's comparisons
        self.reduce, self.pil = True, False

    def params(self, epoch: int, step: int, idx: Sequence[int]) -> AugParams:
        """This rank's 2B rows of the global step's parameters (rows are drawn independently,
        so the other ranks' sizes, left at 1 here, do not change them)."""
        g = step_generator(self.seed, epoch, step)
        hs = torch.ones(self.global_batch, dtype=torch.int64)
        ws = torch.ones(self.global_batch, dtype=torch.int64)
        lo, b = self.rank * self.batch, self.batch
        # an unreadable header's (0, 0) as 1 x 1: its crops are drawn again for its replacement
        hs[lo:lo + b] = torch.as_tensor(self.meta.heights[list(idx)], dtype=torch.int64).clamp(min=1)
        ws[lo:lo + b] = torch.as_tensor(self.meta.widths[list(idx)], dtype=torch.int64).clamp(min=1)
        p = self.aug.params(hs, ws, g)
        sel = torch.cat([torch.arange(lo, lo + b), torch.arange(self.global_batch + lo,
                                                                self.global_batch + lo + b)])
        return p.select(sel)

    def redraw(self, epoch: int, step: int, b: int, h: int, w: int) -> torch.Tensor:
        """Both views' crops [2,4] of position b drawn for an h x w image."""
        g = position_generator(self.seed, epoch, step, self.rank * self.batch + b)
        r = self.aug.recipe
        return sample_crops(torch.tensor([h, h]), torch.tensor([w, w]), r.scale, r.ratio, g)

    def candidates(self, i: int) -> Iterator[int]:
        """i, then (``skip``) the next indices in order, wrapping around."""
        yield i
        if self.policy == "skip":
            for d in range(1, self.n):
                yield (i + d) % self.n

    def load(self, i: int, crops: torch.Tensor, epoch: int, step: int,
             b: int) -> tuple[torch.Tensor | bytes, torch.Tensor, int]:
        """(views [2,3,S,S] or the bytes, the crops used, the index loaded) for index i."""
        first: DataError | None = None
        for j in self.candidates(i):
            h, w = int(self.meta.heights[j]), int(self.meta.widths[j])
            c = crops if j == i else self.redraw(epoch, step, b, h, w)
            try:
                data = self.reader.read(j)
                if self.on_device:
                    return data, c, j
                kind, name = int(self.meta.kinds[j]), self.reader.name(j)
                views, full = decode_views(data, c, self.size, kind, name, self.reduce, self.pil)
                if full != (h, w):  # changed since indexed: crops for its real size
                    c = self.redraw(epoch, step, b, *full)
                    views, _ = decode_views(data, c, self.size, kind, name, self.reduce, self.pil)
                return views, c, j
            except DataError as e:
                if self.policy != "skip":
                    raise DataError(f"{e}; {BAD_IMAGE_HINT}") from None
                first = first or e
        raise DataError(f"none of the {self.n} images can be read (first error: {first})")

    def __call__(self, epoch: int, step: int, idx: Sequence[int]) -> Work:
        p = self.params(epoch, step, idx)
        b = len(idx)
        crops = p.crop.clone()
        views = (torch.empty(0, dtype=torch.uint8) if self.on_device else
                 torch.empty((2 * b, 3, self.size, self.size), dtype=torch.uint8))
        blobs: list[bytes] = []
        loaded = torch.empty(b, dtype=torch.int64)
        for k, i in enumerate(idx):
            out, c, j = self.load(int(i), crops[[k, b + k]], epoch, step, k)
            crops[k], crops[b + k] = c[0], c[1]
            loaded[k] = j
            if isinstance(out, bytes):
                blobs.append(out)
            else:
                views[k], views[b + k] = out[0], out[1]
        params = {f.name: getattr(p, f.name) for f in fields(p) if f.name != "crop"}
        blob, offsets = pack_bytes(blobs)
        return Work(views, blob, offsets, crops, params, torch.as_tensor(list(idx)), loaded,
                    (epoch, step))


def finish_views(x: torch.Tensor, p: AugParams, recipe: Recipe, mean: Sequence[float],
                 std: Sequence[float]) -> torch.Tensor:
    """Cropped views float [V,3,S,S] in [0, 1] -> flip, the recipe's colour steps in its
    order, normalisation: what :func:`moco.data.batch_augment.apply_params` does after its crop."""
    plan = plan_to_device({"flip": p.flip, **colour_plan(p, recipe, mean, std)}, x.device)
    x = torch.where(plan["flip"].view(-1, 1, 1, 1), x.flip(3), x)
    return apply_colour(x, plan, recipe)


class _FolderSteps(Dataset[Work]):
    """Item: (epoch, step, this rank's indices) -> :class:`Work`."""

    def __init__(self, work: CropWork) -> None:
        self.work = work

    def __len__(self) -> int:
        return self.work.n

    def __getitem__(self, item: tuple[int, int, list[int]]) -> Work:
        return self.work(*item)


class _StepItems(EpochBatchSampler):
    """One item per step, (epoch, step, indices), in :func:`moco.data.datasets.epoch_order`'s order."""

    def __iter__(self) -> Iterator[list[tuple[int, int, list[int]]]]:  # type: ignore[override]
        for step, items in enumerate(super().__iter__(), start=self.start_step):
            yield [(self.epoch, step, [i for i, _ in items])]


def _first(items: list[Work]) -> Work:
    return items[0]


class CropTrainLoader(LoaderState):
    """Original-size crops of an indexed folder (or any :class:`SampleReader` with sizes),
    in the folder loaders' sample order (:func:`moco.data.datasets.epoch_order`)."""

    def __init__(self, cfg: InputSettings, reader: SampleReader, meta: Meta, device: torch.device,
                 workers: int, rank: int = 0, world_size: int = 1,
                 decode_device: torch.device | None = None) -> None:
        super().__init__()
        self.cfg, self.device, self.workers = cfg, normalize_device(device), workers
        self.rank, self.world_size = rank, world_size
        self.decode_device = decode_device
        self.work = CropWork(cfg, reader, meta, rank, world_size, decode_device is not None)
        self.recipe = self.work.aug.recipe

    def _sampler(self, epoch: int, start_step: int) -> _StepItems:
        return _StepItems(self.work.n, self.cfg.batch_size, self.cfg.seed, epoch, start_step,
                          self.rank, self.world_size)

    def steps(self) -> int:
        return self._sampler(0, 0).steps()

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The epoch's batches from ``start_step`` on; on CUDA batch t+1's copies, decoding
        and augmentation are queued on a side stream while step t runs (:func:`stream_prefetch`)."""
        steps = self._batches(epoch, start_step)
        steps = stream_prefetch(steps, self.device) if self.device.type == "cuda" else steps
        return self.counted(steps, start_step * self.cfg.batch_size)

    def _batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        loader = DataLoader(_FolderSteps(self.work), batch_sampler=self._sampler(epoch, start_step),
                            num_workers=self.workers, collate_fn=_first,
                            pin_memory=self.device.type == "cuda",
                            prefetch_factor=2 if self.workers else None,
                            worker_init_fn=ignore_stop_signals if self.workers else None)
        for work in loader:
            yield self.finish(work)

    def finish(self, work: Work) -> Batch:
        """A worker's step -> the two augmented views on the training device."""
        self.bad_images.update(int(i) for i, j in zip(work.indices, work.loaded, strict=True)
                               if int(i) != int(j))
        p = AugParams(crop=work.crops, **work.params)
        b = len(work.indices)
        with torch_threads(1 if self.device.type == "cpu" else None):
            if self.decode_device is not None:
                x = self._device_views(work)
            else:
                x = work.views.to(self.device, non_blocking=True).to(torch.float32).mul_(1 / 255)
            x = finish_views(x, p, self.recipe, self.cfg.mean, self.cfg.std)
        q, k = x[:b], x[b:]
        if self.cfg.channels_last_on(self.device.type):
            q = q.contiguous(memory_format=torch.channels_last)
            k = k.contiguous(memory_format=torch.channels_last)
        return Batch(q, k, work.indices)

    def _device_views(self, work: Work) -> torch.Tensor:
        """Decode the step's bytes on ``decode_device`` and crop there; a file the device
        and the CPU both fail to decode follows the policy (its replacement is read here)."""
        assert self.decode_device is not None
        w, b = self.work, len(work.indices)
        loaded = work.loaded.tolist()
        kinds = [int(w.meta.kinds[j]) for j in loaded]
        names = [w.reader.name(j) for j in loaded]
        images = decode_on_device(work.files(), kinds, names, self.decode_device)
        crops = work.crops.clone()
        for k, img in enumerate(images):
            j = loaded[k]
            while isinstance(img, DataError):
                if w.policy != "skip":
                    raise DataError(f"{img}; {BAD_IMAGE_HINT}")
                j = (j + 1) % w.n
                if j == int(work.indices[k]):
                    raise DataError(f"none of the {w.n} images can be read")
                img = decode_on_device([w.reader.read(j)], [int(w.meta.kinds[j])],
                                       [w.reader.name(j)], self.decode_device)[0]
            images[k] = img
            size = (int(img.shape[1]), int(img.shape[2]))
            if j != loaded[k] or size != (int(w.meta.heights[j]), int(w.meta.widths[j])):
                c = w.redraw(*work.where, k, *size)  # as the CPU path: for its real size
                crops[k], crops[b + k] = c[0], c[1]
            if j != int(work.indices[k]):
                self.bad_images.add(int(work.indices[k]))
        src = list(range(b)) * 2
        return crop_on_device(images, crops, src, self.cfg.image_size)  # type: ignore[arg-type]
