"""Tar shards in WebDataset's layout: a dataset as a folder of ``.tar`` files, each holding
samples as consecutive members ``KEY.jpg`` (or another image extension) and ``KEY.cls``
(the class index as decimal text; absent for unlabeled data). ``DATA`` may be such a folder
(training only), or hold ``train/`` and ``val/`` or ``test/`` folders of shards, as
``moco shard`` writes them (:mod:`moco.data.shard_writer`).

The stdlib ``tarfile`` reads them, not the ``webdataset`` package: exact resumption needs
this project's own sample order (:mod:`moco.data.shard_loader`), random access needs each
member's byte offset, and the GPU machines run without extra packages. The layout is
WebDataset's, so its tools read shards written here and the other way round.

The first start indexes the shards (one process per shard, in parallel): every sample's
shard, byte offset and size, label and image header (height, width, kind). The index is
stored beside the decoded cache, keyed by each shard's name, size and mtime, and read by
every later start and rank in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from moco.data.cache_dir import STORE_ERRORS, file_identity
from moco.data.folders import holds_images
from moco.data.index import building
from moco.data.source import IMAGE_EXTENSIONS, DataError, DatasetSplits, ImageSource, open_rgb
from moco.utils.atomic import atomic_write

_log = logging.getLogger(__name__)

SHARD_INDEX_FORMAT = 2
# After the end-of-archive blocks a tar is padded to whole records (tarfile's and GNU tar's
# default: 20 blocks); more zeros than that mean a zero-filled tail, not the archive's end.
END_SLACK = 2 * tarfile.BLOCKSIZE + tarfile.RECORDSIZE
SEQUENTIAL_BUFFER = 1 << 20
CLASSES_FILE = "classes.txt"  # one class name per line, line i = label i (written by moco shard)
_IMAGE_EXTS = {e.lstrip(".") for e in IMAGE_EXTENSIONS}
# columns of the per-sample table
SHARD, OFFSET, SIZE, LABEL, HEIGHT, WIDTH, KIND = range(7)


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the extension starts at the first dot of the member's basename."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


def shard_files(folder: Path) -> list[Path]:
    """The ``*.tar`` files directly in ``folder``, sorted; hidden files left out."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix == ".tar" and p.is_file()
                  and not p.name.startswith("."))


def shard_folder(folder: Path) -> list[Path]:
    """The shards of ``folder`` when it is a folder of shards; [] when it has none, or when
    it holds images too (an image folder with a stray ``.tar``: the tar files are ignored,
    with a notice, and the folder is read as images)."""
    tars = shard_files(folder)
    if tars and holds_images(folder):
        _log.warning(f"{folder} holds images and {len(tars)} .tar file(s) (e.g. "
                     f"{tars[0].name}): read as a folder of images, the .tar files ignored; "
                     "move them out to silence this, or the images out to read the shards")
        return []
    return tars


def index_shard(path: str) -> tuple[np.ndarray, list[str]]:
    """One shard's samples: int64 rows (0, offset, size, label or -1, height, width, kind)
    of each sample's image member, and the samples' member names, in member order."""
    from moco.data.decode import KIND_BAD, header_info

    rows: list[list[int]] = []
    names: list[str] = []
    labels: dict[str, int] = {}
    keys: dict[str, int] = {}
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = split_key(m.name)
                if ext == "cls":
                    f = tf.extractfile(m)
                    text = f.read().decode("utf-8", "replace").strip() if f else ""
                    labels[key] = int(text) if text.lstrip("-").isdigit() else -2
                elif ext in _IMAGE_EXTS and key not in keys:
                    raw.seek(m.offset_data)
                    head = raw.read(min(m.size, 4096))
                    h, w, kind = header_info(data=head)
                    if kind == KIND_BAD and m.size > 4096:  # the SOF after a large EXIF
                        raw.seek(m.offset_data)
                        h, w, kind = header_info(data=raw.read(m.size))
                    keys[key] = len(rows)
                    rows.append([0, m.offset_data, m.size, -1, h, w, kind])
                    names.append(m.name)
            _check_end(path, raw, tf.offset, len(rows))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read the tar shard {path}: {e}; uncompressed .tar files "
                        "(WebDataset layout, written by 'moco shard') are expected") from None
    for key, k in keys.items():
        if key in labels:
            if labels[key] < 0:
                raise DataError(f"{path}: {key}.cls does not hold a class index")
            rows[k][LABEL] = labels[key]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 7), names


def _check_end(path: str, raw: object, end: int, samples: int) -> None:
    """Refuse a shard whose members stop before its end: no end-of-archive blocks after the
    last member (cut at a sample boundary), or zeros (or other bytes) where members belong."""
    f = raw  # the open shard, positioned anywhere
    size = os.fstat(f.fileno()).st_size  # type: ignore[attr-defined]
    again = "copy or write it again ('moco shard')"
    if samples == 0 and size and end == 0:
        raise DataError(f"the tar shard {path} holds no sample: its first block is zeros "
                        f"(zero-filled, {size} bytes); {again}")
    if size - end < 2 * tarfile.BLOCKSIZE:
        raise DataError(f"the tar shard {path} ends without the end-of-archive blocks after "
                        f"its {samples} sample(s): it was cut (an interrupted copy?); {again}")
    f.seek(end)  # type: ignore[attr-defined]
    tail = f.read(END_SLACK + 1)  # type: ignore[attr-defined]
    if len(tail) > END_SLACK or tail.count(0) != len(tail):
        what = "zero-filled" if tail.count(0) == len(tail) else "followed by unread bytes"
        raise DataError(f"the tar shard {path} stops after {samples} sample(s) and is "
                        f"{what} from byte {end} to its end ({size} bytes): members were lost "
                        f"there; {again}")


def _fingerprint(shards: list[Path]) -> str:
    h = hashlib.sha256(f"moco-shards-{SHARD_INDEX_FORMAT}\n".encode())
    for p in shards:
        size, mtime, ino, ctime = file_identity(p.stat())
        h.update(f"{p.name}\0{size}\0{mtime}\0{ino}\0{ctime}\n".encode())
    return h.hexdigest()


class ShardIndex:
    """The samples of a folder of shards: ``table`` int64 [N,7] (shard, offset, size, label,
    height, width, kind), ``names`` their image members, ``shards`` the tar files."""

    def __init__(self, folder: Path, shards: list[Path], table: np.ndarray, names: list[str],
                 fingerprint: str) -> None:
        self.folder, self.shards, self.table, self.names = folder, shards, table, names
        self.fingerprint = fingerprint

    @property
    def labeled(self) -> bool:
        return bool(len(self.table)) and bool((self.table[:, LABEL] >= 0).all())

    def classes(self) -> list[str]:
        """The names in ``classes.txt``, else ``0 .. max label``; a label outside the names
        is refused, naming its sample."""
        f = self.folder / CLASSES_FILE
        top = int(self.table[:, LABEL].max()) + 1 if len(self.table) else 0
        if not f.is_file():
            return [str(c) for c in range(top)]
        names = f.read_text().splitlines()
        if top > len(names):
            k = int(np.flatnonzero(self.table[:, LABEL] >= len(names))[0])
            shard = self.shards[int(self.table[k, SHARD])].name
            raise DataError(f"sample {shard}:{self.names[k]} of {self.folder} holds class index "
                            f"{int(self.table[k, LABEL])}, but {f.name} names {len(names)} "
                            f"class(es) (indices 0..{len(names) - 1}): fix {f} or write the "
                            "shards again ('moco shard')")
        return names


def shard_index(folder: Path, cache_dir: Path | None, workers: int = 0,
                shards: list[Path] | None = None) -> ShardIndex:
    """The index of the shards in ``folder`` (or of ``shards``, files in it): read from the
    cache when the shards are the same (names, sizes, mtimes), else built (one process per
    shard) and stored."""
    folder = folder.resolve()
    shards = shard_files(folder) if shards is None else [p.resolve() for p in shards]
    if not shards:
        raise DataError(f"no .tar shards in {folder}")
    fp = _fingerprint(shards)
    path = None
    if cache_dir is not None:
        slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in
                       f"{folder.parent.name}_{folder.name}")[:60]
        path = cache_dir / "index" / f"shards-{slug}-{fp[:16]}.npz"
        found = _load(path, folder, shards, fp)
        if found is not None:
            return found
    with building(path):  # one process (rank) indexes; the others then read its index
        found = _load(path, folder, shards, fp) if path is not None else None
        return found or _build(folder, shards, fp, path, workers)


def _build(folder: Path, shards: list[Path], fp: str, path: Path | None,
           workers: int) -> ShardIndex:
    workers = workers or min(len(shards), os.cpu_count() or 1)
    if workers > 1 and len(shards) > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in
                                          multiprocessing.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(min(workers, len(shards)), mp_context=ctx) as pool:
            parts = list(pool.map(index_shard, [str(p) for p in shards]))
    else:
        parts = [index_shard(str(p)) for p in shards]
    tables = []
    names: list[str] = []
    for s, (t, n) in enumerate(parts):
        t[:, SHARD] = s
        tables.append(t)
        names += n
    table = np.concatenate(tables) if tables else np.zeros((0, 7), np.int64)
    if not len(table):
        raise DataError(f"the shards in {folder} hold no images (expected members KEY.jpg "
                        "and KEY.cls, WebDataset's layout)")
    has = table[:, LABEL] >= 0
    if has.any() and not has.all():
        raise DataError(f"{int((~has).sum())} samples of the shards in {folder} have no "
                        ".cls member while the others have one: label all samples or none")
    idx = ShardIndex(folder, shards, table, names, fp)
    if path is not None:
        _save(path, idx)
    return idx


def _load(path: Path, folder: Path, shards: list[Path], fp: str) -> ShardIndex | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            if meta.get("fingerprint") != fp or meta.get("folder") != str(folder):
                return None
            names = z["names"].tobytes().decode("utf-8", "surrogateescape").split("\0")
            return ShardIndex(folder, shards, z["table"], names, fp)
    except STORE_ERRORS:
        return None  # unreadable (cut, empty, another format): built again


def _save(path: Path, idx: ShardIndex) -> None:
    meta = json.dumps({"format": SHARD_INDEX_FORMAT, "folder": str(idx.folder),
                       "fingerprint": idx.fingerprint})
    names = np.frombuffer("\0".join(idx.names).encode("utf-8", "surrogateescape"), np.uint8)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.savez(f, table=idx.table, names=names,
                                              meta=np.frombuffer(meta.encode(), np.uint8)))
    except OSError:
        pass  # a read-only cache folder: indexed again next time


class ShardSource(ImageSource):
    """The samples of a folder of shards as an :class:`ImageSource` (random access by byte
    offset: evaluation, kNN, ``--loader pil``); training streams them (:mod:`moco.data.shard_loader`).
    ``rows``: the index rows of this source (a subset), in order."""

    def __init__(self, index: ShardIndex, rows: np.ndarray | None = None) -> None:
        # files/array stay None: the samples are members of tar files (see read / name)
        self.files, self.array = None, None
        self.index = index
        self.rows = np.arange(len(index.table)) if rows is None else rows
        self.table = index.table[self.rows]
        self.labels = self.table[:, LABEL].tolist() if index.labeled else None
        self.classes = index.classes()
        self.name = str(index.folder)
        self._files: dict[int, object] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, object]:  # open files stay in their process
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, -1
        return state

    def read(self, i: int, sequential: bool = False) -> bytes:
        """The encoded bytes of sample i. ``sequential``: through a 1 MiB read buffer with the
        kernel told to read ahead (a reader going through a shard in order; the read
        throughput of both ways is in docs/benchmarks.md, "Tar shards")."""
        if self._pid != os.getpid():  # a forked worker opens its own files
            self._files, self._pid = {}, os.getpid()
        s, off, size = (int(v) for v in self.table[i, :3])
        key = 2 * s + sequential
        f = self._files.get(key)
        try:
            if f is None:
                f = self._files[key] = open(self.index.shards[s], "rb",  # noqa: SIM115
                                            buffering=SEQUENTIAL_BUFFER if sequential else -1)
                if sequential and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            f.seek(off)  # type: ignore[attr-defined]
            data = f.read(size)  # type: ignore[attr-defined]
        except OSError as e:
            raise DataError(f"cannot read image {self.sample_name(i)}: {e.strerror or e}") from None
        if len(data) != size:
            raise DataError(f"cannot read image {self.sample_name(i)}: the shard is truncated")
        return bytes(data)

    def sample_name(self, i: int) -> str:
        return f"{self.index.shards[int(self.table[i, SHARD])]}:{self.index.names[int(self.rows[i])]}"

    def short_name(self, i: int) -> str:
        """``shard-000000.tar:KEY.jpg``: the sample's name within its folder of shards."""
        return f"{self.index.shards[int(self.table[i, SHARD])].name}:{self.index.names[int(self.rows[i])]}"

    def load(self, i: int) -> Image.Image:
        import io

        try:
            return open_rgb(io.BytesIO(self.read(i)))  # type: ignore[arg-type]
        except DataError as e:
            msg = str(e).split(">: ", 1)[-1]
            raise DataError(f"cannot read image {self.sample_name(i)}: {msg}") from None

    def subset(self, indices: list[int]) -> ShardSource:
        return ShardSource(self.index, self.rows[np.asarray(indices, dtype=np.int64)])


class ShardReader:
    """A :class:`moco.data.crop_loader.SampleReader` over a :class:`ShardSource`."""

    def __init__(self, source: ShardSource) -> None:
        self.source = source

    def read(self, i: int) -> bytes:
        return self.source.read(i)

    def name(self, i: int) -> str:
        return self.source.sample_name(i)


def find_shards(root: Path, cache_dir: str | Path | None = None) -> DatasetSplits | None:
    """``root`` as tar shards: a folder of ``.tar`` files (training split only), or
    ``train/`` (and ``val/`` or ``test/``) folders of them; None when it holds no shards.
    The index goes to ``cache_dir`` (default ``$MOCO_CACHE``), never inside ``root``."""
    from moco.data.cache_dir import resolve_cache_dir

    here, train_shards = shard_folder(root), shard_folder(root / "train")
    if not here and not train_shards:
        return None
    c, d = resolve_cache_dir(cache_dir).resolve(), root.resolve()
    cache_dir = None if c == d or d in c.parents else c
    if here:
        return DatasetSplits(ShardSource(shard_index(root, cache_dir, shards=here)), None)
    train = ShardSource(shard_index(root / "train", cache_dir, shards=train_shards))
    test = None
    for name in ("val", "test"):
        if shard_folder(root / name):
            test = ShardSource(shard_index(root / name, cache_dir))
            break
    return DatasetSplits(train, test)


def shard_source(path: Path, cache_dir: str | Path | None = None) -> ShardSource | None:
    """Every sample of a ``.tar`` shard, or of the shards directly in a folder; None when
    ``path`` is neither (``moco embed`` reads images or shards)."""
    from moco.data.cache_dir import resolve_cache_dir

    if path.is_file() and path.suffix == ".tar":
        folder, files = path.parent, [path]
    elif shard_folder(path):
        folder, files = path, shard_folder(path)
    else:
        return None
    c, d = resolve_cache_dir(cache_dir).resolve(), folder.resolve()
    return ShardSource(shard_index(folder, None if c == d or d in c.parents else c, shards=files))
