"""Datasets: ImageFolder trees, unlabeled image folders and torchvision's CIFAR python folders.

``DATA`` holds ``train/`` and ``val/`` or ``test/`` (the original's layout). ``train/`` may be
labeled (one sub-folder per class) or a flat folder of images (then kNN is skipped).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from moco.errors import ConfigError, MocoError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CIFAR_FOLDERS = {"cifar-10-batches-py": "cifar10", "cifar-100-python": "cifar100"}


BAD_IMAGE_HINT = ("remove or replace the file, or pass --on-bad-image skip to replace each "
                  "unreadable image by the next readable one (they are counted and reported)")


class DataError(MocoError, ValueError):
    """A problem with the user's data, with a message that says how to fix it.

    Raised in a DataLoader worker, it reaches the main process re-created by torch with the
    worker's whole traceback as its message; ``str()`` gives back the original message only.
    """

    def __str__(self) -> str:
        msg = super().__str__()
        if "Original Traceback" in msg and "DataError: " in msg:
            return msg.rsplit("DataError: ", 1)[1].strip()
        return msg


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


_log = logging.getLogger(__name__)


def is_image_name(name: str) -> bool:
    """An image file name: a known extension, not hidden (``.*``, e.g. macOS ``._x.jpg``)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def images_under(folder: Path, unreadable: list[tuple[Path, str]]) -> list[Path]:
    """Image files at any depth below ``folder``, sorted; hidden files and folders left out,
    symbolic links to folders not followed. A folder that cannot be listed is appended to
    ``unreadable`` as (folder, reason) instead of being skipped silently."""
    found: list[Path] = []

    def failed(e: OSError) -> None:
        unreadable.append((Path(e.filename or folder), e.strerror or str(e)))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=failed):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if is_image_name(f)
                  and os.path.isfile(os.path.join(dirpath, f))]
    return sorted(found)


def image_folder(folder: Path, on_bad_image: str = "stop") -> ImageSource:
    """ImageFolder layout (labeled: one sub-folder of images per class) or a flat folder of
    images (unlabeled).

    A folder that cannot be listed stops with a :class:`DataError` naming it; with
    ``on_bad_image="skip"`` it is left out with a counted warning (its class, if it is one,
    keeps its label). Images lying beside class folders that hold images are refused: which
    of the two was meant cannot be told.
    """
    check_policy(on_bad_image)
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"cannot list the folder {folder}: {e.strerror or e}; fix its "
                        "permissions") from None
    class_dirs = [Path(e.path) for e in entries if not e.name.startswith(".") and _is_dir(e)]
    flat = [Path(e.path) for e in entries if is_image_name(e.name) and _is_file(e)]
    unreadable: list[tuple[Path, str]] = []
    per_class = [images_under(d, unreadable) for d in class_dirs]
    if unreadable:
        where, why = unreadable[0]
        if on_bad_image != "skip":
            raise DataError(
                f"cannot list the folder {where}: {why} ({len(unreadable)} unreadable folder(s) "
                f"in {folder}); fix its permissions, remove it, or pass --on-bad-image skip to "
                "leave it out (counted)")
        _log.warning(f"--on-bad-image skip: left out {len(unreadable)} unreadable folder(s) of "
                     f"{folder}, e.g. {where} ({why})")
    labeled = [d for d, found in zip(class_dirs, per_class, strict=True) if found]
    if flat and labeled:
        raise DataError(
            f"{folder} mixes {len(flat)} image file(s) (e.g. {flat[0].name}) with {len(labeled)} "
            f"class folder(s) of images (e.g. {labeled[0].name}/): expected either one sub-folder "
            "per class or only images; move the loose images into class folders (or elsewhere)")
    if labeled:
        files: list[Path] = []
        labels: list[int] = []
        for label, found in enumerate(per_class):
            files += found
            labels += [label] * len(found)
        src = ImageSource(files=files, labels=labels, classes=[d.name for d in class_dirs],
                          name=str(folder))
        src.unreadable_folders = [str(p) for p, _ in unreadable]
        return src
    if flat:
        return ImageSource(files=flat, name=str(folder))
    raise DataError(
        f"no images found in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}); expected "
        "one sub-folder of images per class, or the images themselves"
    )


def _is_dir(e: os.DirEntry[str]) -> bool:
    try:
        return e.is_dir()
    except OSError:
        return False


def _is_file(e: os.DirEntry[str]) -> bool:
    try:
        return e.is_file()
    except OSError:
        return False


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: a CIFAR batch cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name}: not a plain CIFAR batch file")


def _cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    try:
        d = _SafeUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path} is not a readable CIFAR python batch: {e}") from None
    data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = d.get("labels", d.get("fine_labels"))
    return np.ascontiguousarray(data), [int(x) for x in labels]


def cifar_python(folder: Path, train: bool) -> ImageSource:
    """torchvision's ``cifar-10-batches-py`` or ``cifar-100-python`` folder."""
    if folder.name == "cifar-10-batches-py":
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    else:
        names = ["train" if train else "test"]
    arrays, labels = [], []
    for n in names:
        a, lab = _cifar_batch(folder / n)
        arrays.append(a)
        labels += lab
    n_classes = 10 if folder.name == "cifar-10-batches-py" else 100
    return ImageSource(array=np.concatenate(arrays), labels=labels,
                       classes=[str(i) for i in range(n_classes)], name=str(folder))


@dataclass
class DatasetSplits:
    train: ImageSource
    test: ImageSource | None


def find_dataset(root: str | Path, on_bad_image: str = "stop",
                 cache_dir: str | Path | None = None) -> DatasetSplits:
    """Resolve ``DATA`` to its train and val/test splits, with errors that say what to fix
    (``on_bad_image``: what a folder that cannot be listed does, see :func:`image_folder`).
    Folders are listed through their index in the cache folder (``cache_dir``, default
    ``$MOCO_CACHE``; :mod:`moco.index`); ``DATA`` may also be tar shards (:mod:`moco.shards`)."""
    if not str(root):
        raise DataError("no data folder given: pass DATA, or set $MOCO_DATA")
    r = Path(root)
    if not r.exists():
        raise DataError(f"data folder {r} does not exist")
    if not r.is_dir():
        raise DataError(f"data folder {r} is a file, not a folder: pass the folder that holds "
                        "train/ (and val/ or test/)")
    for folder in [r] + [r / n for n in CIFAR_FOLDERS]:
        if folder.name in CIFAR_FOLDERS and folder.is_dir():
            return DatasetSplits(cifar_python(folder, True), cifar_python(folder, False))
    from moco.index import listed_folder
    from moco.shards import find_shards

    shards = find_shards(r, cache_dir)
    if shards is not None:
        return shards
    if not (r / "train").is_dir():
        raise DataError(
            f"{r} has no train/ folder: expected DATA/train/ (ImageFolder layout or a flat folder "
            "of images) and optionally DATA/val/ or DATA/test/, or a torchvision CIFAR python folder"
        )
    train: ImageSource = listed_folder(r / "train", on_bad_image, cache_dir, r)
    test = None
    for name in ("val", "test"):
        if (r / name).is_dir():
            test = listed_folder(r / name, on_bad_image, cache_dir, r)
            break
    return DatasetSplits(train, test)


def knn_splits(splits: DatasetSplits, data: str | Path, *, required: bool,
               hint: str = "") -> tuple[ImageSource, ImageSource] | None:
    """The (bank, queries) of a kNN evaluation: the labeled train split and the labeled
    val/test split, the one check shared by ``moco knn`` and the training monitor.

    Without a labeled pair: a :class:`DataError` when ``required``, else None (the monitor
    skips kNN). Labeled splits whose class folders differ are always a DataError naming the
    differences (labels are class indices: they would compare different classes); ``hint``
    is appended to its fix.
    """
    train, test = splits.train, splits.test
    if not train.labeled:
        if required:
            raise DataError(f"{data}/train is unlabeled: kNN needs one sub-folder per class")
        return None
    if test is None or not test.labeled:
        if required:
            raise DataError(f"{data} has no labeled val/ or test/ split for the kNN queries")
        return None
    if train.classes != test.classes:
        raise DataError(f"{class_mismatch(train, test)}{hint}")
    return train, test


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


def class_balanced_subset(labels: list[int], n: int, seed: int) -> list[int]:
    """``n`` indices with (as nearly as possible) equal counts per class, drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
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
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
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
