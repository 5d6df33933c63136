"""What every image source is: :class:`ImageSource` (files or in-memory images, labeled or
not), the splits of a dataset, :class:`DataError`, and how an unreadable image is handled
(``--on-bad-image stop|skip``).

``DATA`` holds ``train/`` and ``val/`` or ``test/`` (the original's layout). ``train/`` may be
labeled (one sub-folder per class) or a flat folder of images (then kNN is skipped). The
readers are in :mod:`moco.data.folders` (folders, CIFAR batches), :mod:`moco.data.index` and
:mod:`moco.data.shards`; :func:`moco.data.splits.find_dataset` picks one.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from moco.core.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BAD_IMAGE_HINT = ("remove or replace the file, or pass --on-bad-image skip to replace each "
                  "unreadable image by the next readable one (they are counted and reported)")



def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16/32-bit grayscale is rescaled from its full range, so a
    16-bit PNG is not clipped to white; alpha is dropped; palette and CMYK are converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def open_rgb(path: str | Path) -> Image.Image:
    """Open an image file fully (truncated files raise here, not later) as RGB.

    Any failure to decode (not an image, truncated, corrupt, a decompression bomb, an
    unreadable file) raises :class:`DataError` naming the file and the reason.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    except MemoryError:
        raise
    except Exception as e:  # OSError (truncated), SyntaxError, struct.error, ... from decoders
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


class ImageSource:
    """N images with optional labels: files on disk or an in-memory uint8 array [N,H,W,3]."""

    def __init__(
        self,
        files: list[Path] | None = None,
        array: np.ndarray | None = None,
        labels: list[int] | None = None,
        classes: list[str] | None = None,
        name: str = "",
    ) -> None:
        if (files is None) == (array is None):
            raise ValueError("give either files or array")
        self.files = files
        self.array = array
        self.labels = labels
        self.classes = classes or []
        self.name = name
        self.unreadable_folders: list[str] = []  # left out under --on-bad-image skip

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.array)  # type: ignore[arg-type]

    @property
    def labeled(self) -> bool:
        return self.labels is not None

    def load(self, i: int) -> Image.Image:
        if self.array is not None:
            return Image.fromarray(self.array[i])
        assert self.files is not None
        return open_rgb(self.files[i])

    def subset(self, indices: list[int]) -> ImageSource:
        return ImageSource(
            files=[self.files[i] for i in indices] if self.files is not None else None,
            array=self.array[indices] if self.array is not None else None,
            labels=[self.labels[i] for i in indices] if self.labels is not None else None,
            classes=self.classes, name=self.name,
        )




def check_data_folder(path: Path, what: str = "data folder") -> None:
    """Refuse a ``DATA`` that is not an existing folder, naming why: missing, a file, a
    symbolic link that leads back to itself (a loop) or to nothing."""
    if path.is_dir():
        return
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise DataError(f"{what} {path} is a symbolic link loop (it leads back to "
                                f"itself: {path} -> {os.readlink(path)}); point it at the "
                                "folder of images") from None
        raise DataError(f"{what} {path} is a symbolic link to {os.readlink(path)}, which does "
                        "not exist; point it at the folder of images")
    if not path.exists():
        raise DataError(f"{what} {path} does not exist")
    raise DataError(f"{what} {path} is a file, not a folder: pass the folder that holds "
                    "train/ (and val/ or test/)")


def is_image_name(name: str) -> bool:
    """An image file name: a known extension, not hidden (``.*``, e.g. macOS ``._x.jpg``)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


@dataclass
class DatasetSplits:
    train: ImageSource
    test: ImageSource | None


def class_mismatch(train: ImageSource, test: ImageSource) -> str:
    """'the classes of A and B differ: ...' naming the first differences."""
    a, b = train.classes, test.classes
    only_a = [c for c in a if c not in set(b)]
    only_b = [c for c in b if c not in set(a)]
    parts = []
    if only_a:
        parts.append(f"{len(only_a)} only in {train.name} (e.g. {only_a[0]!r})")
    if only_b:
        parts.append(f"{len(only_b)} only in {test.name} (e.g. {only_b[0]!r})")
    what = "; ".join(parts) or "the same names in another order"
    return (f"the classes of {train.name} and {test.name} differ ({len(a)} vs {len(b)} class "
            f"folders; {what}): the labels would not compare the same classes; give both "
            "splits the same class folders")


# ----- unreadable images: one policy for every pipeline ----------------------------------------
# ``stop`` (the default): the first unreadable file stops the run with a DataError naming it.
# ``skip``: an unreadable image i is replaced by the next readable one (i+1, i+2, ..., wrapping
# around), the same every epoch and for any worker count, and i is counted. Pipelines call
# :func:`load_checked` per sample, or :func:`scan_images` once (e.g. while building a cache).


def check_policy(policy: str) -> None:
    if policy not in ("stop", "skip"):
        raise ConfigError(f"expected --on-bad-image to be stop or skip, got {policy!r}")


def load_checked(source: ImageSource, index: int, policy: str = "stop") -> tuple[Image.Image, int]:
    """Image ``index`` of ``source`` as RGB, and the index actually loaded.

    If the file cannot be read: ``policy="stop"`` raises :class:`DataError` (file, reason, fix);
    ``policy="skip"`` returns the next readable image in index order (wrapping around), so the
    caller sees ``loaded != index`` and can count ``index`` as bad. Raises :class:`DataError`
    if no image of ``source`` can be read.
    """
    check_policy(policy)
    try:
        return source.load(index), index
    except DataError as e:
        if policy == "stop":
            raise DataError(f"{e}; {BAD_IMAGE_HINT}") from None
    n = len(source)
    for step in range(1, n):
        j = (index + step) % n
        try:
            return source.load(j), j
        except DataError:
            continue
    raise DataError(f"none of the {n} images of {source.name or 'the dataset'} can be read")


@dataclass
class ScanResult:
    """What :func:`scan_images` found: readable indices and ``{index: reason}`` of the others."""

    good: list[int] = field(default_factory=list)
    bad: dict[int, str] = field(default_factory=dict)

    @property
    def bad_count(self) -> int:
        return len(self.bad)


def scan_images(source: ImageSource, policy: str = "stop",
                indices: list[int] | None = None) -> ScanResult:
    """Decode every image of ``source`` (or ``indices``) once: which ones can be read.

    ``policy="stop"`` raises :class:`DataError` at the first unreadable file, like training
    would; ``"skip"`` returns them all in ``ScanResult.bad``. Costs one full decode pass.
    """
    check_policy(policy)
    result = ScanResult()
    for i in range(len(source)) if indices is None else indices:
        try:
            source.load(i)
            result.good.append(i)
        except DataError as e:
            if policy == "stop":
                raise DataError(f"{e}; {BAD_IMAGE_HINT}") from None
            result.bad[i] = str(e)
    if not result.good and len(source):
        raise DataError(f"none of the {len(source)} images of {source.name or 'the dataset'} "
                        "can be read")
    return result


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT/SIGTERM sent to the whole process
    group (Ctrl-C, a scheduler's preemption), so the main process can finish the step, save
    and stop cleanly; the DataLoader shuts the workers down afterwards."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


