"""The file index of a split folder: its file list, labels and each image's original size,
listed and read once, then loaded in a fraction of a second by every later start and rank.

One file per folder, ``<cache>/index/<name>-<path hash>.npz`` (beside the decoded cache,
:func:`moco.data.cache_dir.resolve_cache_dir`), written atomically, holding:

* the files (paths relative to the folder, in :func:`moco.data.folders.image_folder`'s order), their
  labels and class names;
* each file's identity at indexing (byte size, mtime, inode, ctime:
  :func:`moco.data.cache_dir.file_identity`) and its header's (height, width, kind)
  (:func:`moco.data.decode.header_info`), once something asked for sizes;
* the modification time of every directory of the tree.

A later start checks only the directories' mtimes (adding, removing or renaming a file
changes its directory's): one ``stat`` per class folder instead of one per file, plus one per
file whose header could not be read (a file found unreadable and then replaced is read
again). A changed tree is listed again; the header of a file whose identity did not change
is reused (a file moved over another with the same size and mtime has another inode). A file
rewritten in place under the same name leaves its directory unchanged: the loaders check
each decoded image's size against the index and draw the crop for the real size
(:mod:`moco.data.crop_loader`), and ``rm -r <cache>/index`` forces a new index. A stored
index that cannot be read (cut, empty, another format) is built again.

Headers are read in parallel processes (forked, in chunks of files); small folders are read
in the calling process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from moco.data.cache_dir import STORE_ERRORS, file_identity
from moco.data.folders import image_folder
from moco.data.source import ImageSource
from moco.utils.atomic import atomic_write
from moco.utils.logs import Log, quiet

INDEX_FORMAT = 2
COLUMNS = 7  # height, width, kind, bytes, mtime_ns, inode, ctime_ns
PARALLEL_MIN = 4096  # fewer files: read their headers in this process
CHUNK = 2048
MTIME_SETTLE_NS = 2_000_000_000  # a directory changed this recently is checked again next time



def _headers(paths: list[str]) -> np.ndarray:
    """[n,7] int64 rows (height, width, kind, bytes, mtime_ns, inode, ctime_ns) of ``paths``."""
    from moco.data.decode import KIND_BAD, header_info

    out = np.zeros((len(paths), COLUMNS), dtype=np.int64)
    for k, p in enumerate(paths):
        try:
            out[k, 3:] = file_identity(os.stat(p))
        except OSError:
            out[k, 2] = KIND_BAD
            continue
        out[k, :3] = header_info(p)
    return out


def read_headers(paths: list[str], workers: int) -> np.ndarray:
    """:func:`_headers` of every path, across ``workers`` processes for large lists."""
    if workers <= 1 or len(paths) < PARALLEL_MIN:
        return _headers(paths)
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    # fork, as DataLoader workers: the children only parse headers (no threads, no CUDA),
    # and unlike spawn/forkserver they do not re-run the caller's __main__ module
    ctx = multiprocessing.get_context("fork" if "fork" in
                                      multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return np.concatenate(list(pool.map(_headers, chunks)))


@contextlib.contextmanager
def building(path: Path | None) -> Iterator[None]:
    """An exclusive lock on ``path``'s ``.lock`` file while the block builds it: of the
    processes starting together (torchrun's ranks on a machine), one builds, the others
    wait and read its result. No lock where none can be taken (no path, a read-only or
    lock-less folder)."""
    fd = None
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path.with_suffix(".lock"), os.O_CREAT | os.O_RDWR, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _dirs(folder: Path) -> list[tuple[str, int]]:
    """(path relative to ``folder``, mtime_ns) of the folder and every directory under it;
    a mtime too recent to be trusted (a change within the same tick would not show) is -1."""
    now = time.time_ns()
    out, seen = [], set()
    for dirpath, _, _ in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        m = st.st_mtime_ns
        out.append((os.path.relpath(dirpath, folder), m if now - m > MTIME_SETTLE_NS else -1))
    return out


def _unchanged(folder: Path, dirs: list[list[object]]) -> bool:
    for rel, mtime in dirs:
        try:
            if mtime == -1 or os.stat(folder / str(rel)).st_mtime_ns != mtime:
                return False
        except OSError:
            return False
    return True


def index_path(folder: Path, cache_dir: Path) -> Path:
    folder = folder.resolve()
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in
                   f"{folder.parent.name}_{folder.name}")[:60]
    return cache_dir / "index" / f"{slug}-{hashlib.sha256(str(folder).encode()).hexdigest()[:12]}.npz"


def _pack(strings: list[str]) -> np.ndarray:
    return np.frombuffer("\0".join(strings).encode("utf-8", "surrogateescape"), dtype=np.uint8)


def _unpack(arr: np.ndarray) -> list[str]:
    return arr.tobytes().decode("utf-8", "surrogateescape").split("\0") if arr.size else []


class FolderIndex:
    """A split folder's index (see the module doc). ``headers`` [N,7] int64 (height, width,
    kind, bytes, mtime_ns, inode, ctime_ns) or None until :meth:`sized`."""

    def __init__(self, folder: Path, rel: list[str], labels: np.ndarray | None,
                 classes: list[str], dirs: list[list[object]], headers: np.ndarray | None,
                 path: Path | None) -> None:
        self.folder, self.rel, self.labels, self.classes = folder, rel, labels, classes
        self.dirs, self.headers, self.path = dirs, headers, path
        self.notes: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.rel)

    def source(self) -> IndexedSource:
        files = [self.folder / r for r in self.rel]
        labels = self.labels.tolist() if self.labels is not None else None
        return IndexedSource(self, files, labels, None)

    def save(self) -> bool:
        """Write atomically to ``self.path``; False when not stored (no path, or the cache
        folder cannot be written: the index is then built again next time)."""
        if self.path is None:
            return False
        meta = {"format": INDEX_FORMAT, "folder": str(self.folder), "classes": self.classes,
                "labeled": self.labels is not None, "dirs": self.dirs, "notes": self.notes}
        arrays = {"files": _pack(self.rel), "meta": _pack([json.dumps(meta)]),
                  "labels": self.labels if self.labels is not None else np.zeros(0, np.int64),
                  "headers": (self.headers if self.headers is not None else
                              np.zeros((0, COLUMNS), np.int64))}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]
            return True
        except OSError:
            return False

    @staticmethod
    def load(path: Path, folder: Path) -> FolderIndex | None:
        """The stored index of ``folder`` if it is readable and its tree unchanged, else None."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(_unpack(z["meta"])[0])
                if meta.get("format") != INDEX_FORMAT or meta.get("folder") != str(folder):
                    return None
                rel = _unpack(z["files"])
                labels = z["labels"] if meta["labeled"] else None
                headers = z["headers"] if len(z["headers"]) == len(rel) and rel else None
            if not _unchanged(folder, meta["dirs"]):
                return None
            idx = FolderIndex(folder, rel, labels, meta["classes"], meta["dirs"], headers, path)
            idx.notes = meta.get("notes", {})
        except (*STORE_ERRORS, AttributeError, TypeError):
            return None  # cut, empty or not ours: listed again
        if headers is not None and _read_bad_again(idx):
            idx.save()
        return idx

    def sized(self, workers: int, log: Log = quiet) -> np.ndarray:
        """``headers``, reading the files' headers (once, stored) when missing."""
        if self.headers is None:
            with building(self.path):  # one process reads; the others take its result
                stored = FolderIndex.load(self.path, self.folder) if self.path else None
                if stored is not None and stored.headers is not None and stored.rel == self.rel:
                    self.headers = stored.headers
                    return self.headers
                t = time.perf_counter()
                paths = [str(self.folder / r) for r in self.rel]
                self.headers = read_headers(paths, workers)
                where = (f"later starts read them from {self.path}" if self.save() else
                         "not stored (no writable cache folder): read again next time")
                log(f"indexed the sizes of {len(paths)} images of {self.folder} in "
                    f"{time.perf_counter() - t:.1f} s ({workers} process(es)); {where}")
        return self.headers


def folder_index(folder: Path, cache_dir: Path | None, on_bad_image: str = "stop",
                 log: Log = quiet) -> FolderIndex:
    """The index of ``folder`` (ImageFolder or flat), loaded when stored and unchanged, else
    listed (:func:`moco.data.folders.image_folder`, which applies ``on_bad_image`` to unreadable
    folders) and stored, reusing the headers of files whose byte size and mtime did not
    change. Not stored when ``cache_dir`` is None or a folder could not be listed."""
    folder = folder.resolve()
    path = index_path(folder, cache_dir) if cache_dir is not None else None
    if path is not None and path.is_file():
        found = FolderIndex.load(path, folder)
        if found is not None:
            return found
    with building(path):  # one process (rank) lists; the others then load its index
        found = FolderIndex.load(path, folder) if path is not None and path.is_file() else None
        return found or _list(folder, path, on_bad_image)


def _list(folder: Path, path: Path | None, on_bad_image: str) -> FolderIndex:
    old = _stale(path) if path is not None and path.is_file() else None
    dirs = _dirs(folder)  # before the listing: a change during it shows next time
    src = image_folder(folder, on_bad_image)
    assert src.files is not None
    if getattr(src, "unreadable_folders", None):
        path = None  # listed again next time: the folder may have become readable
    rel = [os.path.relpath(f, folder) for f in src.files]
    labels = np.asarray(src.labels, dtype=np.int64) if src.labels is not None else None
    idx = FolderIndex(folder, rel, labels, src.classes, [list(d) for d in dirs], None, path)
    if old is not None:
        idx.headers = _reuse(idx, *old)
    idx.save()
    return idx


def _stale(path: Path) -> tuple[list[str], np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            rel, headers = _unpack(z["files"]), z["headers"]
            ok = len(headers) == len(rel) and rel and headers.shape[1:] == (COLUMNS,)
            return (rel, headers) if ok else None
    except STORE_ERRORS:
        return None


def _read_bad_again(idx: FolderIndex) -> bool:
    """Read again the headers of the files found unreadable whose identity changed since
    (replaced, or made readable); True when a row changed."""
    from moco.data.decode import KIND_BAD

    assert idx.headers is not None
    bad = np.flatnonzero(idx.headers[:, 2] == KIND_BAD)
    again = []
    for k in bad.tolist():
        try:
            now = file_identity(os.stat(idx.folder / idx.rel[k]))
        except OSError:
            continue
        if tuple(int(v) for v in idx.headers[k, 3:]) != now:
            again.append(k)
    if again:
        idx.headers = idx.headers.copy()
        idx.headers[again] = read_headers([str(idx.folder / idx.rel[k]) for k in again], 1)
    return bool(again)


def _reuse(idx: FolderIndex, old_rel: list[str], old: np.ndarray) -> np.ndarray | None:
    """Headers for the new file list: a file's old row when its identity (size, mtime,
    inode, ctime) is the same (one stat per file), else read again."""
    where = {r: k for k, r in enumerate(old_rel)}
    out = np.zeros((len(idx.rel), COLUMNS), dtype=np.int64)
    again = []
    for k, r in enumerate(idx.rel):
        j = where.get(r)
        try:
            now = file_identity(os.stat(idx.folder / r))
        except OSError:
            again.append(k)
            continue
        if j is not None and tuple(int(v) for v in old[j, 3:]) == now:
            out[k] = old[j]
        else:
            again.append(k)
    if again:
        out[again] = read_headers([str(idx.folder / idx.rel[k]) for k in again], os.cpu_count() or 1)
    return out


class IndexedSource(ImageSource):
    """An :class:`ImageSource` listed from a :class:`FolderIndex` (``rows``: the index rows of
    a subset, None for all), whose images' original sizes come from the index."""

    def __init__(self, index: FolderIndex, files: list[Path], labels: list[int] | None,
                 rows: np.ndarray | None) -> None:
        super().__init__(files=files, labels=labels, classes=index.classes, name=str(index.folder))
        self.index, self.rows = index, rows

    def headers(self, workers: int, log: Log = quiet) -> np.ndarray:
        """[N,7] int64 (height, width, kind, bytes, mtime_ns, inode, ctime_ns) of this
        source's images."""
        h = self.index.sized(workers, log)
        return h if self.rows is None else h[self.rows]

    def subset(self, indices: list[int]) -> IndexedSource:
        assert self.files is not None
        rows = np.asarray(indices, dtype=np.int64)
        return IndexedSource(self.index, [self.files[i] for i in indices],
                             [self.labels[i] for i in indices] if self.labels is not None else None,
                             rows if self.rows is None else self.rows[rows])


def listed_folder(folder: Path, on_bad_image: str = "stop", cache_dir: str | Path | None = None,
                  data_root: Path | None = None, log: Log = quiet) -> IndexedSource:
    """``image_folder(folder)`` through its index in the cache folder (``cache_dir``, default
    ``$MOCO_CACHE`` or ``~/.cache/moco``); never stored inside ``data_root`` (default: the
    folder's parent), where it is listed afresh each time."""
    from moco.data.cache_dir import resolve_cache_dir

    root = resolve_cache_dir(cache_dir).resolve()
    data = (data_root or folder.parent).resolve()
    inside = root == data or data in root.parents
    return folder_index(folder, None if inside else root, on_bad_image, log).source()
