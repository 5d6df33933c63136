"""Which input path a run takes, and why (logged once at the start of training).

* **decoded cache** (:mod:`moco.data.cache`, :class:`moco.data.tensor_loader.TensorTrainLoader`): the
  images decoded once, crops drawn from the stored pixels. Exact when the cache keeps every
  image whole: ``--crops auto`` takes it when no image is larger than the cache's short side
  (CIFAR's 32 px, STL's 96 px at their training size), and for in-memory arrays.
  ``--crops short-side`` forces it for any dataset (each image resized to short side 256
  and its long side cut to 512 for 224 px crops: faster, but fewer source pixels per crop).
* **original-size crops** (:mod:`moco.data.crop_loader`): ``--crops auto`` for any dataset with
  an image larger than the cache keeps, ``--crops original`` always; tar shards
  (:mod:`moco.data.shard_loader`) always. The crop boxes are drawn on each file's original size
  (from the index), as the original recipe's ``RandomResizedCrop`` on the decoded image.
  ``--decode cpu``: decoded in the DataLoader workers; ``--decode gpu``: bytes read in the
  workers, the batch decoded on the training GPU in one call (``--decode auto``: gpu when
  training on CUDA).

The sizes come from the index (:mod:`moco.data.index`), so the choice, and the decoded cache's
size estimate (:func:`cache_declined`), cost no file reads after the first start.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

import numpy as np
import torch

from moco.data.batches import TrainLoader
from moco.data.decode import KIND_BAD
from moco.data.input_settings import InputSettings
from moco.data.recipes import resized_short_side
from moco.data.source import BAD_IMAGE_HINT, DataError, ImageSource
from moco.utils.logs import Log

_log = logging.getLogger(__name__)


def source_headers(source: ImageSource, workers: int) -> np.ndarray:
    """[N,3+] int64 (height, width, kind, ...) of a file source's images: from its index
    when it has one (:class:`moco.data.index.IndexedSource`), else read now (not stored)."""
    from moco.data.index import IndexedSource, read_headers

    if isinstance(source, IndexedSource):
        return source.headers(max(1, workers), _log.debug)
    assert source.files is not None
    return read_headers([str(f) for f in source.files], max(1, workers))


def kept_whole(heights: np.ndarray, widths: np.ndarray, short_side: int) -> np.ndarray:
    """Which images the cache's mixed-size layout keeps at their original size."""
    return (np.minimum(heights, widths) <= short_side) & (np.maximum(heights, widths)
                                                          <= 2 * short_side)


def cache_bytes(heights: np.ndarray, widths: np.ndarray, short_side: int) -> int:
    """The bytes :func:`moco.data.cache.cached_images` would store for images of these sizes: the
    native size when they all share one, else the mixed-size layout's padded array."""
    from moco.data.cache import resized_size

    pairs = np.unique(np.stack([heights, widths], axis=1), axis=0)
    if len(pairs) == 1:
        return int(len(heights) * pairs[0, 0] * pairs[0, 1] * 3)
    kept = np.asarray([resized_size(int(h), int(w), short_side)[2:] for h, w in pairs])
    return int(len(heights) * int(kept[:, 0].max()) * int(kept[:, 1].max()) * 3)


def cache_declined(cfg: InputSettings, source: ImageSource, log: Log = _log.info) -> bool:
    """Whether the decoded cache is known not to fit (tar shards never use it): from the
    index's sizes, so no start probes every file again to learn it. The verdict is noted in
    the index."""
    from moco.data.cache import memory_budget
    from moco.data.index import IndexedSource
    from moco.data.shards import ShardSource

    if isinstance(source, ShardSource):
        return True
    if not isinstance(source, IndexedSource):
        return False
    h = source.headers(max(1, cfg.workers if cfg.workers > 0 else 1), log)
    ok = h[:, 2] != KIND_BAD
    if not ok.any():
        return False
    need = cache_bytes(h[ok, 0], h[ok, 1], cache_short_side(cfg.image_size))
    budget = memory_budget()
    key = f"cache_bytes_s{cache_short_side(cfg.image_size)}"
    if source.index.notes.get(key) != need:
        source.index.notes[key] = need
        source.index.save()
    if need > budget:
        log(f"the decoded cache of {source.name} would take {need / 2**30:.1f} GiB (from the "
            f"index's image sizes), over the budget of {budget / 2**30:.1f} GiB: not built")
        return True
    return False


def decode_device(cfg: InputSettings, device: torch.device) -> torch.device | None:
    """Where the batch's JPEGs are decoded: None (CPU workers) or the training device."""
    if cfg.decode == "cpu" or (cfg.decode == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise DataError(f"--decode gpu decodes on the training GPU, but this run trains on "
                        f"{device}; use --decode auto or cpu")
    if not _device_decodes(device):
        _log.warning(f"torchvision cannot decode JPEGs on {device} (no nvJPEG in this build): "
                "decoding in the CPU workers instead")
        return None
    return device


def _device_decodes(device: torch.device) -> bool:
    from PIL import Image

    from moco.data.decode import KIND_JPEG, decode_on_device

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, "JPEG")
    out = decode_on_device([buf.getvalue()], [KIND_JPEG], ["probe"], device, cpu_fallback=False)
    return isinstance(out[0], torch.Tensor) and out[0].device.type == device.type


def original_crops_loader(cfg: InputSettings, source: ImageSource, device: torch.device,
                          workers: int, rank: int = 0, world_size: int = 1,
                          log: Log = _log.debug) -> TrainLoader | None:
    """The training loader of original-size crops when this run takes that path (see the
    module doc), else None (the decoded-cache path). Logs the choice and its reason on
    rank 0. Under ``--on-bad-image stop`` a file without a readable header stops here,
    before training."""
    from moco.data.crop_loader import CropTrainLoader, FileReader, Meta
    from moco.data.shard_loader import ShardTrainLoader
    from moco.data.shards import ShardSource

    say = log if rank == 0 else (lambda _m: None)
    if isinstance(source, ShardSource):
        dev = decode_device(cfg, device)
        _check_headers(cfg, source.table[:, 6], source.sample_name)
        say(f"input: tar shards of {source.name} ({len(source)} samples in "
            f"{len(source.index.shards)} shards), read sequentially by {max(1, workers)} "
            f"reader(s) per process, shuffle buffer {cfg.shuffle_buffer}; crops drawn on each "
            f"image's original size, {_decoding(dev, workers)}")
        return ShardTrainLoader(cfg, source, device, workers, rank, world_size, dev)
    if source.files is None or cfg.crops == "short-side":
        if source.files is not None:
            say("input: decoded cache (--crops short-side): crops drawn from images resized "
                f"to short side {cache_short_side(cfg.image_size)}")
        return None
    h = source_headers(source, workers)
    ok = h[:, 2] != KIND_BAD
    if not ok.any():
        raise DataError(f"none of the {len(h)} images of {source.name} can be read (first: "
                        f"{source.files[0]}): no image header")
    whole = kept_whole(h[ok, 0], h[ok, 1], cache_short_side(cfg.image_size))
    if cfg.crops == "auto" and whole.all():
        say(f"input: decoded cache: every image is at most {int(h[ok, 0].max())}x"
            f"{int(h[ok, 1].max())} px, which the cache keeps whole (short side <= "
            f"{cache_short_side(cfg.image_size)}), so its crops are the original recipe's")
        return None
    _check_headers(cfg, h[:, 2], lambda i: str(source.files[i]))  # type: ignore[index]
    dev = decode_device(cfg, device)
    why = ("--crops original" if cfg.crops == "original" else
           f"{int((~whole).sum())} of {len(whole)} images are larger than the decoded cache "
           f"keeps them: short side {cache_short_side(cfg.image_size)}, long side "
           f"{2 * cache_short_side(cfg.image_size)}")
    say(f"input: original-size crops ({why}): crop boxes drawn on each file's full size, "
        f"{_decoding(dev, workers)}")
    meta = Meta(h[:, 0], h[:, 1], h[:, 2])
    return CropTrainLoader(cfg, FileReader(source.files), meta, device, workers, rank,
                           world_size, dev)


def _decoding(dev: torch.device | None, workers: int) -> str:
    if dev is not None:
        return (f"each batch's JPEGs decoded on {dev} in one call (nvJPEG; other files on "
                f"the CPU), bytes read by {workers} worker(s)")
    return (f"decoded per step by {workers or 'the main'} {'worker(s)' if workers else 'process'} "
            "on the CPU (decode_jpeg; JPEGs whose crops allow it at 1/2-1/8 size via PIL's "
            "draft)")


def _check_headers(cfg: InputSettings, kinds: np.ndarray, name: Callable[[int], str]) -> None:
    bad = np.flatnonzero(kinds == KIND_BAD)
    if len(bad) == len(kinds):
        raise DataError(f"none of the {len(kinds)} images can be read (first: {name(0)})")
    if len(bad) and cfg.on_bad_image != "skip":
        raise DataError(f"cannot read image {name(int(bad[0]))}: not an image file (no image "
                        f"header; {len(bad)} such file(s) in all); {BAD_IMAGE_HINT}")


def cache_short_side(image_size: int) -> int:
    """Short side of the mixed-size layout: the eval resize (256 for 224 px crops), at least
    the crop size."""
    return max(image_size, resized_short_side(image_size))
