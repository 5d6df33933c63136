"""CIFAR-10 for users who have none: the official python-version archive, downloaded once into
the user cache folder and unpacked in place (the folder layout torchvision's ``CIFAR10`` reads,
which every ``moco`` command reads as DATA).

The archive is Krizhevsky's ``cifar-10-python.tar.gz`` (163 MB), its published md5 checked
before it is used (:func:`moco.utils.download.download`: streamed, resumable, atomic). It is
unpacked into a hidden folder beside the target, checked (the seven files of the python
version, each a readable batch), then renamed into place: an interrupted or damaged unpacking
never leaves a folder that looks complete. Members are extracted with tarfile's ``data``
filter (no absolute paths, no links out of the folder, no devices).
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from moco.core.errors import DataError
from moco.data.folders import cifar_python
from moco.utils.download import download, user_cache_dir

_log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # published with the archive (and torchvision)
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta")
#: Where a mirror of the archive can be named (a URL of the file itself, or a local copy).
URL_ENV = "MOCO_CIFAR10_URL"


def _complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in CIFAR10_FILES)


def _unpack(archive: Path, target: Path) -> None:
    """Extract ``archive``'s ``cifar-10-batches-py/`` into ``target`` (atomically: a hidden
    temporary folder beside it, checked, then renamed)."""
    tmp = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=target.parent))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"cannot unpack {archive}: {e}; delete it and run again to download "
                            "it anew") from None
        unpacked = tmp / CIFAR10_FOLDER
        if not _complete(unpacked):
            raise DataError(f"{archive} does not hold the CIFAR-10 python version "
                            f"({CIFAR10_FOLDER}/ with {', '.join(CIFAR10_FILES)}); delete it "
                            "and run again, or pass a local copy")
        cifar_python(unpacked, train=False)  # a readable batch, or a DataError naming it
        if target.exists():  # another process finished first
            return
        os.replace(unpacked, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_cifar10(root: str | Path | None = None, *, url: str | None = None,
                  progress: bool | None = None) -> Path:
    """The CIFAR-10 python folder under ``root`` (default: the user cache folder's
    ``datasets/``), downloaded and unpacked on first use; returns it, e.g.
    ``~/.cache/moco/datasets/cifar-10-batches-py``.

    ``url`` (else ``$MOCO_CIFAR10_URL``, else the official archive, under ``$MOCO_MIRROR`` when
    set): where the archive comes from; a path to a local copy of the archive works too. The
    md5 is checked whatever the source. Offline, a
    :class:`~moco.core.errors.DownloadError` names the URL and how to pass a local copy.
    """
    base = Path(root) if root is not None else user_cache_dir("datasets")
    target = base / CIFAR10_FOLDER
    if _complete(target):
        return target
    base.mkdir(parents=True, exist_ok=True)
    source = url or os.environ.get(URL_ENV) or CIFAR10_URL
    if "://" not in source:  # a local copy of the archive
        source = Path(source).expanduser().resolve().as_uri()
    hint = (f"download {CIFAR10_URL} elsewhere and pass it with {URL_ENV}=/path/to/"
            "cifar-10-python.tar.gz, or pass --data FOLDER (an ImageFolder or a CIFAR python "
            "folder)")
    mirror = None if source == CIFAR10_URL else ""  # $MOCO_MIRROR applies to the official URL
    archive = download(source, base / "cifar-10-python.tar.gz", md5=CIFAR10_MD5, mirror=mirror,
                       progress=progress, hint=hint)
    _log.info("unpacking %s into %s", archive, target)
    _unpack(archive, target)
    return target
