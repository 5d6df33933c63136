"""``DATA`` -> its splits: ``train/`` and ``val/`` or ``test/`` (the original's layout),
whatever holds them (an image folder, its index, tar shards, CIFAR python batches), and the
pair of labeled splits the kNN evaluation needs. A folder of images without ``train/`` is a
training set on its own (pretraining and embedding; no kNN evaluation).
"""

from __future__ import annotations

import logging
from pathlib import Path

from moco.data.folders import CIFAR_FOLDERS, cifar_python
from moco.data.source import (
    DataError,
    DatasetSplits,
    ImageSource,
    check_data_folder,
    class_mismatch,
)

_log = logging.getLogger(__name__)


def find_dataset(root: str | Path, on_bad_image: str = "stop",
                 cache_dir: str | Path | None = None) -> DatasetSplits:
    """Resolve ``DATA`` to its train and val/test splits, with errors that say what to fix
    (``on_bad_image``: what a folder that cannot be listed does, see :func:`image_folder`).
    Folders are listed through their index in the cache folder (``cache_dir``, default
    ``$MOCO_CACHE``; :mod:`moco.data.index`); ``DATA`` may also be tar shards (:mod:`moco.data.shards`),
    or a folder of images without ``train/`` (flat or one sub-folder per class): the training
    set, without a val/test split."""
    if not str(root):
        raise DataError("no data folder given: pass DATA, or set $MOCO_DATA")
    r = Path(root)
    check_data_folder(r)
    for folder in [r] + [r / n for n in CIFAR_FOLDERS]:
        if folder.name in CIFAR_FOLDERS and folder.is_dir():
            return DatasetSplits(cifar_python(folder, True), cifar_python(folder, False))
    from moco.data.index import listed_folder
    from moco.data.shards import find_shards

    shards = find_shards(r, cache_dir)
    if shards is not None:
        return shards
    if not (r / "train").is_dir():
        return DatasetSplits(_bare_folder(r, on_bad_image, cache_dir), None)
    train: ImageSource = listed_folder(r / "train", on_bad_image, cache_dir, r)
    test = None
    for name in ("val", "test"):
        if (r / name).is_dir():
            test = listed_folder(r / name, on_bad_image, cache_dir, r)
            break
    return DatasetSplits(train, test)


def _bare_folder(r: Path, on_bad_image: str, cache_dir: str | Path | None) -> ImageSource:
    """A folder without train/: its images (flat, or one sub-folder per class) are the
    training set, with no val/test split; one holding val/ or test/ but no train/, or no
    images at all, is refused."""
    from moco.data.index import listed_folder

    expected = ("expected DATA/train/ (ImageFolder layout or a flat folder of images) and "
                "optionally DATA/val/ or DATA/test/, a folder of images to pretrain on, or a "
                "torchvision CIFAR python folder")
    held = [n for n in ("val", "test") if (r / n).is_dir()]
    if held:
        raise DataError(f"{r} has {held[0]}/ but no train/ folder: {expected}")
    try:
        train = listed_folder(r, on_bad_image, cache_dir, r)
    except DataError as e:
        if "no images found" not in str(e):
            raise
        raise DataError(f"{r} has no train/ folder and no images: {expected}") from None
    _log.info(f"{r} has no train/ folder: its {len(train)} images are the training set, "
              "without a val/ or test/ split")
    return train


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
            raise DataError(f"the training images ({train.name}) are unlabeled: kNN needs "
                            f"{data}/train with one sub-folder of images per class")
        return None
    if test is None or not test.labeled:
        if required:
            raise DataError(f"{data} has no labeled val/ or test/ split for the kNN queries")
        return None
    if train.classes != test.classes:
        raise DataError(f"{class_mismatch(train, test)}{hint}")
    return train, test
