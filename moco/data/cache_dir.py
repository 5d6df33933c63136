"""The folder of the decoded-image cache and the folder index: where it is (``--cache-dir``,
``$MOCO_CACHE``, ``~/.cache/moco``; never inside the data folder), entries built in hidden
folders held by a lock while they are built, and the removal of stale or abandoned ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from moco.data.source import DataError
from moco.utils.logs import Log

_log = logging.getLogger(__name__)


STALE_DAYS = 7.0  # an entry of the same folder unused this long is removed
#: What reading a stored index or cache file raises when it is cut, empty or not ours: such a
#: file is built again, never trusted and never a traceback.
STORE_ERRORS = (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile)


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """(size, mtime_ns, inode, ctime_ns) of a file: what the caches key a file by. A file
    replaced under its name with the same size and mtime (``mv`` of another file, ``cp -f``
    or a restore that sets the mtime back) changes its inode or its ctime, which no user
    command can set back."""
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def default_cache_dir() -> Path:
    """``$MOCO_CACHE``, else ``~/.cache/moco``."""
    env = os.environ.get("MOCO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moco"


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """``cache_dir`` when given (``--cache-dir``), else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def check_outside(cache_dir: Path, data_root: Path) -> None:
    """Refuse a cache folder inside the data folder (the data stays untouched)."""
    c, d = cache_dir.expanduser().resolve(), data_root.resolve()
    if c == d or d in c.parents:
        raise DataError(f"the cache folder {c} is inside the data folder {d}; the data folder is "
                        "never written to: choose another --cache-dir (or $MOCO_CACHE)")


def touch_entry(entry: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache folder still works
        os.utime(entry / "meta.json")


def remove_stale(root: Path, prefix: str, keep: str) -> None:
    """Remove entries whose source folder is gone, and entries of the same folder (other file
    lists or contents) unused for ``STALE_DAYS``; recent ones stay (a run may use a subset
    and the full set in turn)."""
    now = time.time()
    for entry in root.iterdir():
        if entry.name.startswith(".") or entry.name.startswith(keep) or not entry.is_dir():
            continue
        try:
            src = json.loads((entry / "meta.json").read_text()).get("source", "")
        except (OSError, ValueError):
            continue
        if src and Path(src).is_absolute() and not Path(src).exists():
            shutil.rmtree(entry, ignore_errors=True)
    for stale in root.glob(f"{prefix}-*"):
        if stale.name.startswith(keep) or not stale.is_dir():
            continue
        try:
            age = now - (stale / "meta.json").stat().st_mtime
        except OSError:
            age = float("inf")
        if age > STALE_DAYS * 86400:
            shutil.rmtree(stale, ignore_errors=True)


BUILDING = ".building"  # suffix of the hidden folder an entry is built in


def hold_lock(folder: Path) -> int:
    """An open descriptor of ``folder`` holding an exclusive ``flock`` on it: the mark of a
    build in progress (the kernel drops it when the process dies, SIGKILL included)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return -1
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def remove_abandoned_builds(root: Path, log: Log = _log.info) -> list[Path]:
    """Remove the hidden build folders (``.<entry>-XXXX.building``) that a build stopped by a
    signal or a crash left in ``root``; a build still running (its process holds the
    folder's lock) is left alone."""
    removed = []
    for p in root.glob(f".*{BUILDING}"):
        if not p.is_dir() or p.is_symlink():
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a build in progress
        finally:
            os.close(fd)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if removed:
        log(f"removed {len(removed)} unfinished decoded-cache build(s) left in {root} by a "
            "stopped run")
    return removed


@dataclass
class CacheEntry:
    """One thing the cache folder holds: a decoded-image cache (``images``), a folder or shard
    index (``index``) or a build that a stopped run left (``unfinished``)."""

    path: Path
    kind: str
    source: str  # the folder it was made from ('' when not recorded)
    nbytes: int
    last_used: float  # seconds since the epoch


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def cache_entries(root: Path) -> list[CacheEntry]:
    """What the cache folder ``root`` holds, least recently used first (a decoded cache is
    marked used at each run; an index when it is written)."""
    out: list[CacheEntry] = []
    if not root.is_dir():
        return out
    for p in root.iterdir():
        try:
            if p.name.endswith(BUILDING) and p.is_dir():
                out.append(CacheEntry(p, "unfinished", "", _size(p), p.stat().st_mtime))
            elif p.name == "index" and p.is_dir():
                out += [CacheEntry(f, "index", "", f.stat().st_size, f.stat().st_mtime)
                        for f in p.glob("*.npz")]
            elif p.is_dir() and not p.name.startswith(".") and (p / "meta.json").is_file():
                meta = json.loads((p / "meta.json").read_text())
                out.append(CacheEntry(p, "images", str(meta.get("source", "")), _size(p),
                                      (p / "meta.json").stat().st_mtime))
        except (OSError, ValueError):
            continue  # removed meanwhile, or not ours
    return sorted(out, key=lambda e: e.last_used)


def remove_cache_entry(entry: CacheEntry) -> bool:
    """Remove ``entry`` (an index with its lock file); False when it is a build still running
    (its process holds the folder's lock) or could not be removed. A run reading a decoded
    cache keeps its memory-mapped copy; the next run rebuilds it."""
    if entry.kind == "unfinished":
        return entry.path in remove_abandoned_builds(entry.path.parent, log=lambda _m: None)
    try:
        if entry.path.is_dir():
            shutil.rmtree(entry.path)
        else:
            entry.path.unlink(missing_ok=True)
            _remove_free_lock(entry.path.with_suffix(".lock"))
    except OSError:
        return False
    return True


def _remove_free_lock(lock: Path) -> None:
    """Remove an index's lock file unless a process holds it (one is building the index)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.unlink(missing_ok=True)
    except OSError:
        pass  # held: an index is being built
    finally:
        os.close(fd)
