"""Datasets: ImageFolder trees, unlabeled image folders and torchvision's CIFAR python folders.

``DATA`` holds ``train/`` and ``val/`` or ``test/`` (the original's layout). ``train/`` may be
labeled (one sub-folder per class) or a flat folder of images (then kNN is skipped).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CIFAR_FOLDERS = {"cifar-10-batches-py": "cifar10", "cifar-100-python": "cifar100"}


class DataError(ValueError):
    """A problem with the user's data, with a message that says how to fix it."""


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
    """Open an image file fully (truncated files raise here, not later) as RGB."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


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


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def image_folder(folder: Path) -> ImageSource:
    """ImageFolder layout (labeled) or a flat folder of images (unlabeled)."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    flat = _images_in(folder, recursive=False)
    if class_dirs and not flat:
        files: list[Path] = []
        labels: list[int] = []
        for label, d in enumerate(class_dirs):
            found = _images_in(d, recursive=True)
            files += found
            labels += [label] * len(found)
        if files:
            return ImageSource(files=files, labels=labels, classes=[d.name for d in class_dirs],
                               name=str(folder))
    if flat:
        return ImageSource(files=flat, name=str(folder))
    raise DataError(
        f"no images found in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}); expected "
        "one sub-folder of images per class, or the images themselves"
    )


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


def find_dataset(root: str | Path) -> DatasetSplits:
    """Resolve ``DATA`` to its train and val/test splits, with errors that say what to fix."""
    if not str(root):
        raise DataError("no data folder given: pass DATA, or set $MOCO_DATA")
    r = Path(root)
    if not r.exists():
        raise DataError(f"data folder {r} does not exist")
    for folder in [r] + [r / n for n in CIFAR_FOLDERS]:
        if folder.name in CIFAR_FOLDERS and folder.is_dir():
            return DatasetSplits(cifar_python(folder, True), cifar_python(folder, False))
    if not (r / "train").is_dir():
        raise DataError(
            f"{r} has no train/ folder: expected DATA/train/ (ImageFolder layout or a flat folder "
            "of images) and optionally DATA/val/ or DATA/test/, or a torchvision CIFAR python folder"
        )
    train = image_folder(r / "train")
    test = None
    for name in ("val", "test"):
        if (r / name).is_dir():
            test = image_folder(r / name)
            break
    return DatasetSplits(train, test)


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


class TwoViewDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Item ``(index, seed)`` -> (query view, key view), both [3, S, S] float."""

    def __init__(self, source: ImageSource, two_views: object) -> None:
        self.source = source
        self.two_views = two_views

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = item
        return self.two_views(self.source.load(index), seed)  # type: ignore[operator,no-any-return]


class EvalDataset(Dataset[tuple[torch.Tensor, int]]):
    """Item i -> (image [3, S, S], label or -1)."""

    def __init__(self, source: ImageSource, transform: object) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        label = self.source.labels[i] if self.source.labels is not None else -1
        return self.transform(self.source.load(i)), label  # type: ignore[operator]


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
