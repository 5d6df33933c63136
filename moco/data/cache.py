"""Decoded-image cache: decode a folder of images once, keep it as a memory-mapped uint8 array.

Layout of one cache entry, a folder ``<cache>/<name>-<path hash>-<fingerprint>/``:

* ``images.npy``: uint8 [N,H,W,3] (``np.load(mmap_mode="r")``: pages are shared by every
  process and dropped by the OS under memory pressure);
* ``labels.npy``: int64 [N] (-1 when unlabeled);
* ``sizes.npy`` (mixed sizes only): int32 [N,2], each image's (height, width) in the array;
  the image sits in the top-left corner, the rest is zero padding that no crop ever reads;
* ``meta.json``: the source folder, count, layout and format version.

Which pixels are stored:

* when all images share one size (CIFAR's 32x32), the images at their native size: the
  augmentation sees exactly what PIL decodes;
* otherwise each image whose short side is over ``short_side`` resized (PIL bilinear,
  antialiased, as ``T.Resize``) so its short side is ``short_side`` (the loader uses
  ``max(image_size * 256 / 224, image_size)``, i.e. 256 px for 224 px crops, the eval
  resize), smaller ones kept, the long side cut to at most 2x ``short_side`` (center); crops
  are then drawn from these images instead of the full-resolution files: the same relative
  boxes, from fewer source pixels.

The cache lives outside the data folder (default ``$MOCO_CACHE``, else ``~/.cache/moco``;
``--cache-dir`` overrides) and never inside it. An entry is keyed by a fingerprint of the
file list with each file's size and modification time, so a changed source gets a new entry
(entries of the same folder unused for a week are removed); it is built in a temporary folder and renamed
into place, so an interrupted build leaves nothing a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from moco.data.cache_dir import (
    BUILDING,
    check_outside,
    hold_lock,
    remove_abandoned_builds,
    remove_stale,
    resolve_cache_dir,
    touch_entry,
)
from moco.data.source import DataError, ImageSource, open_rgb
from moco.utils.logs import Log
from moco.utils.memory import available_memory

_log = logging.getLogger(__name__)

CACHE_FORMAT = 1
MEMORY_FRACTION = 0.5  # of the memory available when the cache is built
MAX_ASPECT = 2.0


@dataclass
class DecodedImages:
    """N decoded images: ``images`` uint8 [N,H,W,3] (memory-mapped for a cache entry),
    ``labels`` (or None), ``sizes`` int32 [N,2] of each image's valid (h, w) when they differ
    (None when every image fills the array), ``path`` the cache entry (None: in memory)."""

    images: np.ndarray
    labels: list[int] | None
    sizes: np.ndarray | None = None
    path: Path | None = None
    bad: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes)


def memory_budget() -> int:
    """The most bytes a cache may take: ``$MOCO_CACHE_MAX_GB`` GiB when set, else half of the
    memory available."""
    env = os.environ.get("MOCO_CACHE_MAX_GB")
    if env:
        return int(float(env) * (1 << 30))
    return int(available_memory() * MEMORY_FRACTION)


def source_root(source: ImageSource) -> Path:
    """The data folder of a file source: the parent of the split folder holding its files
    (``DATA`` for ``DATA/train/<class>/x.jpg``)."""
    assert source.files is not None
    common = Path(os.path.commonpath([str(Path(f).resolve().parent) for f in source.files]))
    split = Path(source.name).resolve() if source.name else common
    if common == split or split in common.parents:
        return split.parent
    return common.parent


def fingerprint(files: list[Path]) -> str:
    """sha256 of the format version and every file's path, size and mtime (ns)."""
    h = hashlib.sha256(f"moco-cache-{CACHE_FORMAT}\n".encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _entry_prefix(source: ImageSource) -> str:
    name = Path(source.name).name if source.name else "images"
    parent = Path(source.name).parent.name if source.name else ""
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{parent}_{name}".strip("_"))
    return f"{slug[:60]}-{hashlib.sha256(str(Path(source.name).resolve()).encode()).hexdigest()[:8]}"


def _probe(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header; any failure (not an image, a decompression
    bomb, an unreadable file) is a :class:`DataError`, so it follows --on-bad-image."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            return h, w
    except MemoryError:
        raise
    except Exception as e:  # OSError, DecompressionBombError, SyntaxError, struct.error, ...
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def resized_size(h: int, w: int, short_side: int) -> tuple[int, int, int, int]:
    """(resized h, resized w, kept h, kept w) for the mixed-size layout: a short side over
    ``short_side`` is brought down to it (long side as ``T.Resize``: int(short_side * long /
    short)); smaller images keep their size; then the long side is center-cut to at most
    ``MAX_ASPECT`` x ``short_side``."""
    if min(h, w) <= short_side:
        rh, rw = h, w
    elif h <= w:
        rh, rw = short_side, int(short_side * w / h)
    else:
        rh, rw = int(short_side * h / w), short_side
    cap = int(MAX_ASPECT * short_side)
    return rh, rw, min(rh, cap), min(rw, cap)


def decode_resized(path: Path, short_side: int | None) -> np.ndarray:
    """One file as uint8 [h,w,3]: native size (``short_side`` None) or the mixed-size
    layout's (see :func:`resized_size`)."""
    img = open_rgb(path)
    if short_side is not None:
        rh, rw, kh, kw = resized_size(img.height, img.width, short_side)
        if (rh, rw) != (img.height, img.width):
            img = img.resize((rw, rh), Image.Resampling.BILINEAR)
        if (kh, kw) != (rh, rw):
            top, left = (rh - kh) // 2, (rw - kw) // 2
            img = img.crop((left, top, left + kw, top + kh))
    return np.asarray(img, dtype=np.uint8)


def _open_entry(entry: Path) -> DecodedImages | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("format") != CACHE_FORMAT:
            return None
        images = np.load(entry / "images.npy", mmap_mode="r")
        labels_arr = np.load(entry / "labels.npy")
        sizes = np.load(entry / "sizes.npy") if (entry / "sizes.npy").exists() else None
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    if len(images) != meta.get("count") or images.ndim != 4 or images.shape[3] != 3:
        return None
    labels = None if meta.get("unlabeled") else [int(x) for x in labels_arr]
    return DecodedImages(images, labels, sizes, entry, [int(i) for i in meta.get("bad", [])])


def _parallel(fn: Callable[[int], None], n: int, workers: int) -> None:
    if workers <= 1:
        for i in range(n):
            fn(i)
        return
    with ThreadPoolExecutor(workers) as pool:  # PIL decodes with the GIL released
        for _ in pool.map(fn, range(n), chunksize=256):
            pass


def cached_images(source: ImageSource, cache_dir: str | Path | None = None, *,
                  short_side: int = 256, budget: int | None = None, workers: int | None = None,
                  data_root: Path | None = None, on_bad_image: str = "stop",
                  log: Log = _log.info) -> DecodedImages | None:
    """The decoded images of ``source``, from the cache (built on first use), or None when
    they do not fit ``budget`` bytes (default :func:`memory_budget`) or the cache folder
    cannot be written (the caller then decodes on the fly).

    An in-memory source (CIFAR python batches) is returned as is. ``short_side``: the
    mixed-size layout's short side (see the module doc). ``data_root``: the data folder the
    cache must stay out of (default: :func:`source_root`). ``on_bad_image``: an unreadable
    file stops the build (``stop``) or is replaced by the next readable image (``skip``; the
    replaced indices are kept in ``bad``).
    """
    if source.array is not None:
        return DecodedImages(np.asarray(source.array), source.labels)
    assert source.files is not None
    files = [Path(f) for f in source.files]
    root = resolve_cache_dir(cache_dir)
    check_outside(root, data_root or source_root(source))
    prefix = _entry_prefix(source)
    key = f"{prefix}-{fingerprint(files)[:20]}"
    native, mixed = root / key, root / f"{key}-s{short_side}"
    budget = memory_budget() if budget is None else budget
    for candidate in (native, mixed):
        found = _open_entry(candidate) if candidate.is_dir() else None
        if found is not None and found.nbytes <= budget:
            touch_entry(candidate)
            return found
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)

    shapes = [(0, 0)] * len(files)

    unreadable: dict[int, str] = {}

    def probe(i: int) -> None:
        try:
            shapes[i] = _probe(files[i])
        except DataError as e:
            unreadable[i] = str(e)

    _parallel(probe, len(files), workers)
    readable = [shapes[i] for i in range(len(files)) if i not in unreadable]
    uniform = len(set(readable)) == 1
    if uniform:
        h, w = readable[0]
        sizes = None
        layout_short: int | None = None
        entry = native
    else:
        if not readable:
            raise DataError(f"none of the {len(files)} images of {source.name} can be read")
        kept = [resized_size(hh, ww, short_side)[2:] if (hh, ww) != (0, 0) else (1, 1)
                for hh, ww in shapes]
        h, w = max(k[0] for k in kept), max(k[1] for k in kept)
        sizes = np.asarray(kept, dtype=np.int32)
        layout_short = short_side
        entry = mixed
    nbytes = len(files) * h * w * 3
    if nbytes > budget:
        log(f"decoded cache of {source.name or 'the images'} would take {nbytes / 2**30:.1f} GiB, "
            f"over the budget of {budget / 2**30:.1f} GiB: decoding on the fly instead")
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(root).free < nbytes * 1.05 + (64 << 20):
            log(f"not enough disk space in {root} for a {nbytes / 2**30:.1f} GiB decoded cache: "
                "decoding on the fly instead")
            return None
        remove_abandoned_builds(root, log)
        tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}-", suffix=BUILDING, dir=root))
        building = hold_lock(tmp)  # released when this process ends, however it ends
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # readable like any folder, not mkdtemp's 0700
    except OSError as e:
        log(f"cannot write the decoded cache in {root} ({e.strerror}): decoding on the fly; "
            "set --cache-dir or $MOCO_CACHE to a writable folder")
        return None
    try:
        log(f"decoding {len(files)} images of {source.name} once into {entry} "
            f"({nbytes / 2**20:.0f} MiB)")
        arr = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                        shape=(len(files), h, w, 3))

        def decode(i: int) -> None:
            if i in unreadable:
                return
            try:
                im = decode_resized(files[i], layout_short)
            except DataError as e:
                unreadable[i] = str(e)
                return
            if uniform and im.shape[:2] != (h, w):
                unreadable[i] = f"cannot read image {files[i]}: size changed while caching"
                return
            arr[i, : im.shape[0], : im.shape[1]] = im

        _parallel(decode, len(files), workers)
        bad = sorted(unreadable)
        if bad and on_bad_image != "skip":
            raise DataError(f"{unreadable[bad[0]]} ({len(bad)} unreadable file(s) in all); remove "
                            "or replace it, or pass --on-bad-image skip")
        if len(bad) == len(files):
            raise DataError(f"none of the {len(files)} images of {source.name} can be read")
        for i in bad:  # the next readable image in index order, as the PIL path's skip
            j = next((i + d) % len(files) for d in range(1, len(files))
                     if (i + d) % len(files) not in unreadable)
            arr[i] = arr[j]
            if sizes is not None:
                sizes[i] = sizes[j]
        arr.flush()
        labels = np.asarray(source.labels if source.labels is not None else [-1] * len(files),
                            dtype=np.int64)
        np.save(tmp / "labels.npy", labels)
        if sizes is not None:
            np.save(tmp / "sizes.npy", sizes)
        (tmp / "meta.json").write_text(json.dumps({
            "format": CACHE_FORMAT, "source": str(Path(source.name).resolve()), "count": len(files),
            "shape": [len(files), h, w, 3], "short_side": layout_short,
            "unlabeled": source.labels is None, "bad": bad}))
        if entry.exists() and _open_entry(entry) is None:
            shutil.rmtree(entry, ignore_errors=True)  # unreadable leftover (older format)
        try:
            os.replace(tmp, entry)  # atomic: another process may have won the race
        except OSError:
            if _open_entry(entry) is None:
                raise
        remove_stale(root, prefix, key)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if building >= 0:
            os.close(building)
    result = _open_entry(entry)
    if result is None:
        raise DataError(f"the decoded cache {entry} could not be read back; delete it and retry")
    return result
