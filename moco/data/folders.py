"""Image sources read from disk: ImageFolder trees or flat folders of images, and
torchvision's CIFAR python batches (read without executing anything).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from pathlib import Path

import numpy as np

from moco.data.source import IMAGE_EXTENSIONS, DataError, ImageSource, check_policy, is_image_name

CIFAR_FOLDERS = {"cifar-10-batches-py": "cifar10", "cifar-100-python": "cifar100"}

_log = logging.getLogger(__name__)


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


def holds_images(folder: Path) -> bool:
    """Whether an image file lies anywhere below ``folder`` (hidden files and folders left
    out, as :func:`images_under`); stops at the first one found."""
    for _, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if any(is_image_name(f) for f in filenames):
            return True
    return False


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
