"""One entry of the decoded-image cache (:mod:`moco.data.cache`): the images it holds
(:class:`DecodedImages`), the key of its files (:func:`fingerprint`), how one file is
decoded into it (:func:`decode_resized`), and reading a finished entry back
(:func:`open_entry`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from moco.data.cache_dir import STORE_ERRORS, file_identity
from moco.data.source import DataError, open_rgb

CACHE_FORMAT = 1
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


def fingerprint(files: list[Path]) -> str:
    """sha256 of the format version and every file's path and identity (size, mtime, inode,
    ctime: :func:`moco.data.cache_dir.file_identity`), so a file replaced under its name with
    the same size and mtime gets a new entry."""
    h = hashlib.sha256(f"moco-cache-{CACHE_FORMAT}\n".encode())
    for f in files:
        size, mtime, ino, ctime = file_identity(os.stat(f))
        h.update(f"{f}\0{size}\0{mtime}\0{ino}\0{ctime}\n".encode())
    return h.hexdigest()


def probe_size(path: Path) -> tuple[int, int]:
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


def open_entry(entry: Path) -> DecodedImages | None:
    """The finished entry in ``entry``, or None when any of its files is missing, cut,
    empty or of another format (the caller builds it again)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
            return None
        images = np.load(entry / "images.npy", mmap_mode="r")
        labels_arr = np.load(entry / "labels.npy")
        mixed = meta.get("short_side") is not None  # the mixed-size layout keeps sizes.npy
        sizes = np.load(entry / "sizes.npy") if mixed else None
    except STORE_ERRORS:
        return None
    n = meta.get("count")
    if len(images) != n or images.ndim != 4 or images.shape[3] != 3 or len(labels_arr) != n:
        return None
    if sizes is not None and sizes.shape != (n, 2):
        return None
    labels = None if meta.get("unlabeled") else [int(x) for x in labels_arr]
    return DecodedImages(images, labels, sizes, entry, [int(i) for i in meta.get("bad", [])])
