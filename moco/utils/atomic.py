"""The one atomic write behind every file moco writes: checkpoints, exports, ``config.yaml``,
``metrics.jsonl``, JSON results, embeddings, plots, linear-classification files, tar shards
and the folder index.

The guarantee, the same for every writer: the content goes to a temporary file with a unique
name (``.<name>.XXXXXXXX.tmp``) in the destination's folder, is flushed to the disk (fsync),
renamed over the destination (``os.replace``), and the folder is fsynced so that the rename
itself survives a power cut. A kill, a crash or a full disk at any point leaves the previous
file (or none) under the final name, never a half-written one; the temporary file is removed
on error. A failed write is an ``OSError`` that keeps its ``errno`` (``ENOSPC`` for a full
disk) and names the destination file, not the temporary one.

Two forms: :func:`atomic_file` hands the block an open binary file; :func:`atomic_path` a
temporary path, for writers that take a file name (safetensors, matplotlib, tarfile).
:func:`atomic_write` and :func:`atomic_write_text` are the one-call versions.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _named(e: OSError, path: Path, tmp: Path | None) -> OSError:
    """``e`` naming ``path`` (the file the user asked for) instead of the temporary file."""
    if e.filename is not None and str(e.filename) == str(path):
        return e
    if e.errno is None:  # a library's own error turned into an OSError: keep its text
        return e if str(path) in str(e) else OSError(f"cannot write {path}: {e}")
    if tmp is not None and e.filename is not None and str(e.filename) != str(tmp):
        return e  # about another file (e.g. an input the writer read)
    return OSError(e.errno, e.strerror or str(e), str(path))


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every OS or file system allows
    opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[tuple[int, Path]]:
    """(open descriptor, name) of a new temporary file beside ``path``; when the block ends
    without error the file gets a normal file's mode (not mkstemp's 0600) and is renamed over
    ``path``, and the folder is fsynced. The block must have fsynced the file."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise _named(e, path, None) from None
    tmp = Path(name)
    try:
        yield fd, tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            named = _named(e, path, tmp)
            if named is not e:
                raise named from e
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """An open binary file whose content replaces ``path`` atomically when the block ends
    (see the module docstring); nothing changes under ``path`` if the block raises."""
    with _replacing(Path(path)) as (fd, _tmp), os.fdopen(fd, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file name beside ``path`` for a writer that takes a name; what the block
    writes there replaces ``path`` atomically when it ends (fsynced first)."""
    with _replacing(Path(path)) as (fd, tmp):
        os.close(fd)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` into a temporary file that then replaces ``path`` atomically."""
    with atomic_file(path) as f:
        write(f)


def atomic_write_text(path: str | Path, text: str) -> None:
    """``path`` holds ``text`` (UTF-8), written atomically."""
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def remove_stale_temporaries(folder: str | Path, name_glob: str = "*") -> list[Path]:
    """Delete the temporary files that a write killed mid-way left in ``folder``
    (``.<name>.XXXXXXXX.tmp``), for final names matching ``name_glob``; never a file under a
    final name. Call it only while nothing writes into ``folder``."""
    removed = []
    for p in Path(folder).glob(f".{name_glob}.*{TMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
