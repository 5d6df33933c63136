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

from moco.data.cache_dir import (
    BUILDING,
    check_outside,
    hold_lock,
    remove_abandoned_builds,
    remove_stale,
    resolve_cache_dir,
    touch_entry,
)
from moco.data.cache_entry import (
    CACHE_FORMAT,
    DecodedImages,
    decode_resized,
    fingerprint,
    open_entry,
    probe_size,
    resized_size,
)
from moco.data.source import DataError, ImageSource
from moco.utils.logs import Log
from moco.utils.memory import available_memory

_log = logging.getLogger(__name__)

MEMORY_FRACTION = 0.5  # of the memory available when the cache is built


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


def _entry_prefix(source: ImageSource) -> str:
    name = Path(source.name).name if source.name else "images"
    parent = Path(source.name).parent.name if source.name else ""
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{parent}_{name}".strip("_"))
    return f"{slug[:60]}-{hashlib.sha256(str(Path(source.name).resolve()).encode()).hexdigest()[:8]}"


def _parallel(fn: Callable[[int], None], n: int, workers: int) -> None:
    if workers <= 1:
        for i in range(n):
            fn(i)
        return
    with ThreadPoolExecutor(workers) as pool:  # PIL decodes with the GIL released
        for _ in pool.map(fn, range(n), chunksize=256):
            pass


@dataclass
class _Layout:
    """How a cache entry stores the images: ``shape`` (H, W) of the array, ``sizes`` [N,2]
    of each image's kept size (mixed sizes only), ``short_side`` the resize (None: native),
    ``entry`` the folder it goes to, ``unreadable`` ``{index: reason}`` of the files that
    cannot be read."""

    shape: tuple[int, int]
    sizes: np.ndarray | None
    short_side: int | None
    entry: Path
    unreadable: dict[int, str] = field(default_factory=dict)

    @property
    def uniform(self) -> bool:
        return self.sizes is None


def _probe_all(files: list[Path], workers: int) -> tuple[list[tuple[int, int]], dict[int, str]]:
    """Every file's (height, width) from its header ((0, 0) when unreadable) and
    ``{index: reason}`` of the unreadable ones."""
    shapes = [(0, 0)] * len(files)
    unreadable: dict[int, str] = {}

    def probe(i: int) -> None:
        try:
            shapes[i] = probe_size(files[i])
        except DataError as e:
            unreadable[i] = str(e)

    _parallel(probe, len(files), workers)
    return shapes, unreadable


def _layout(shapes: list[tuple[int, int]], unreadable: dict[int, str], short_side: int,
            native: Path, mixed: Path, name: str) -> _Layout:
    """Native size when every readable image has one size, else the mixed-size layout."""
    readable = [shapes[i] for i in range(len(shapes)) if i not in unreadable]
    if len(set(readable)) == 1:
        return _Layout(readable[0], None, None, native, unreadable)
    if not readable:
        raise DataError(f"none of the {len(shapes)} images of {name} can be read")
    kept = [resized_size(hh, ww, short_side)[2:] if (hh, ww) != (0, 0) else (1, 1)
            for hh, ww in shapes]
    shape = (max(k[0] for k in kept), max(k[1] for k in kept))
    return _Layout(shape, np.asarray(kept, dtype=np.int32), short_side, mixed, unreadable)


def _reuse_entry(candidates: tuple[Path, ...], budget: int) -> DecodedImages | None:
    """A readable entry among ``candidates`` that fits ``budget`` (marked as used)."""
    for candidate in candidates:
        found = open_entry(candidate) if candidate.is_dir() else None
        if found is not None and found.nbytes <= budget:
            touch_entry(candidate)
            return found
    return None


def _start_build(root: Path, prefix: str, nbytes: int, log: Log) -> tuple[Path, int] | None:
    """A hidden build folder in ``root`` and the descriptor holding its lock, or None (and
    why, logged) when the cache folder cannot take ``nbytes``."""
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
    return tmp, building


def _decode_into(arr: np.ndarray, files: list[Path], layout: _Layout, workers: int) -> None:
    """Decode every readable file into its row of ``arr``; a file that fails now (or changed
    size since probed, in the native layout) joins ``layout.unreadable``."""
    h, w = layout.shape
    unreadable = layout.unreadable

    def decode(i: int) -> None:
        if i in unreadable:
            return
        try:
            im = decode_resized(files[i], layout.short_side)
        except DataError as e:
            unreadable[i] = str(e)
            return
        if layout.uniform and im.shape[:2] != (h, w):
            unreadable[i] = f"cannot read image {files[i]}: size changed while caching"
            return
        arr[i, : im.shape[0], : im.shape[1]] = im

    _parallel(decode, len(files), workers)


def _replace_unreadable(arr: np.ndarray, layout: _Layout, on_bad_image: str,
                        name: str) -> list[int]:
    """Apply the policy to the unreadable rows: stop, or copy the next readable image in
    index order into each (as the PIL path's skip). Returns their indices."""
    n, unreadable = len(arr), layout.unreadable
    bad = sorted(unreadable)
    if bad and on_bad_image != "skip":
        raise DataError(f"{unreadable[bad[0]]} ({len(bad)} unreadable file(s) in all); remove "
                        "or replace it, or pass --on-bad-image skip")
    if len(bad) == n:
        raise DataError(f"none of the {n} images of {name} can be read")
    for i in bad:
        j = next((i + d) % n for d in range(1, n) if (i + d) % n not in unreadable)
        arr[i] = arr[j]
        if layout.sizes is not None:
            layout.sizes[i] = layout.sizes[j]
    return bad


def _write_entry(tmp: Path, source: ImageSource, layout: _Layout, bad: list[int]) -> None:
    """Labels, sizes and ``meta.json`` beside the images in the build folder."""
    n = len(source)
    labels = np.asarray(source.labels if source.labels is not None else [-1] * n, dtype=np.int64)
    np.save(tmp / "labels.npy", labels)
    if layout.sizes is not None:
        np.save(tmp / "sizes.npy", layout.sizes)
    (tmp / "meta.json").write_text(json.dumps({
        "format": CACHE_FORMAT, "source": str(Path(source.name).resolve()), "count": n,
        "shape": [n, *layout.shape, 3], "short_side": layout.short_side,
        "unlabeled": source.labels is None, "bad": bad}))


def publish(tmp: Path, entry: Path) -> None:
    """Move the finished build into place (atomic: another process may have won the race)."""
    if entry.exists() and open_entry(entry) is None:
        shutil.rmtree(entry, ignore_errors=True)  # unreadable leftover (older format, cut)
    try:
        os.replace(tmp, entry)
    except OSError:
        if open_entry(entry) is None:
            raise


def _build(source: ImageSource, files: list[Path], layout: _Layout, tmp: Path, workers: int,
           on_bad_image: str) -> None:
    """Decode the images into the build folder ``tmp`` and move it to ``layout.entry``."""
    arr = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                    shape=(len(files), *layout.shape, 3))
    _decode_into(arr, files, layout, workers)
    bad = _replace_unreadable(arr, layout, on_bad_image, source.name)
    arr.flush()
    _write_entry(tmp, source, layout, bad)
    publish(tmp, layout.entry)


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
    found = _reuse_entry((native, mixed), budget)
    if found is not None:
        return found
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    shapes, unreadable = _probe_all(files, workers)
    layout = _layout(shapes, unreadable, short_side, native, mixed, source.name)
    nbytes = len(files) * layout.shape[0] * layout.shape[1] * 3
    if nbytes > budget:
        log(f"decoded cache of {source.name or 'the images'} would take {nbytes / 2**30:.1f} GiB, "
            f"over the budget of {budget / 2**30:.1f} GiB: decoding on the fly instead")
        return None
    started = _start_build(root, prefix, nbytes, log)
    if started is None:
        return None
    tmp, building = started
    log(f"decoding {len(files)} images of {source.name} once into {layout.entry} "
        f"({nbytes / 2**20:.0f} MiB)")
    try:
        _build(source, files, layout, tmp, workers, on_bad_image)
        remove_stale(root, prefix, key)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if building >= 0:
            os.close(building)
    result = open_entry(layout.entry)
    if result is None:
        raise DataError(f"the decoded cache {layout.entry} could not be read back; delete it "
                        "and retry")
    return result
