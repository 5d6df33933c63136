"""``moco shard DATA OUT``: an ImageFolder tree written as tar shards in WebDataset's layout
(:mod:`moco.data.shards`), one folder of shards per split (``OUT/train/``, ``OUT/val/`` or
``OUT/test/``, as in DATA).

Each sample is two members, ``KEY.<ext>`` (the file's bytes, unchanged: nothing is decoded,
so a broken file stays broken and the readers' ``--on-bad-image`` policy judges it as it
would in the folder) and ``KEY.cls`` (the class index) for a labeled split; KEY is the
file's path in the split folder without its extension (dots made ``_``: WebDataset splits
a key from its extension at the first dot; ``a.png`` beside ``a.jpg`` becomes ``a_png``).
The class names go to ``classes.txt``.

Samples are written in a shuffled order (a permutation drawn from ``seed``): a shard then
holds a mix of classes, as a shuffle buffer needs (in ImageFolder order a 1 GB shard of
ImageNet holds ~7 classes). The output is deterministic: the same DATA and seed give the
same bytes (member mtimes, owners and modes are fixed). A shard is closed before it would
pass ``shard_size`` (a sample larger than that gets a shard of its own).

What is already in OUT is never damaged:

* an OUT that holds another dataset (image files, class folders) is refused;
* one process writes an OUT at a time (its lock, :class:`moco.utils.runlock.RunLock`): a
  second one refuses, naming the first;
* every split is written into a hidden ``.<split>.partial`` folder first; only when all are
  complete do they replace the old shards, in one step during which SIGTERM, SIGINT and
  SIGHUP wait: a stopped run leaves the old shards or the complete new ones, never a mix or
  an empty split (the partial folders are removed by the next run);
* ``--overwrite`` replaces the shards of every split of OUT: an old split the new data lacks
  (``val/`` while the new data has ``test/``) loses its shards, so no reader takes it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from moco.core.seeding import stream_generator
from moco.data.folders import holds_images, image_folder
from moco.data.shards import CLASSES_FILE, shard_files
from moco.data.source import DataError, ImageSource, check_data_folder, is_image_name
from moco.utils.atomic import atomic_path, atomic_write_text, fsync_dir
from moco.utils.runlock import RunLock

SPLITS = ("train", "val", "test")
_TRASH = ".replaced"  # the old shards, between the swap and their removal

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'100KB', '64MB', '1GB' (powers of 1000), '512MiB' (of 1024) or a byte count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise DataError(f"cannot read the size {text!r}: expected a number with KB, MB, GB or "
                        "TB (or KiB, MiB, GiB), e.g. 1GB")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size < 1:
        raise DataError(f"the size {text!r} must be at least one byte")
    return size


def human_size(n: int) -> str:
    """``512 B``, ``4.2 kB``, ``3.1 MB``, ``7.0 GB`` (powers of 1000, as --shard-size)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@dataclass
class SplitWritten:
    """One split written: its name, sample count, shard files and image bytes."""

    split: str
    samples: int
    shards: list[Path]
    bytes: int

    def describe(self, out: Path) -> str:
        """``train: 16 images, 4.2 kB in 1 shard(s) in OUT/train``."""
        return (f"{self.split}: {self.samples} images, {human_size(self.bytes)} in "
                f"{len(self.shards)} shard(s) in {out / self.split}")


def sample_key(rel: str) -> str:
    """A file's key: its path in the split without the extension, dots made '_'."""
    stem = rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel
    return stem.replace(os.sep, "/").replace(".", "_")


def unique_keys(rels: list[str]) -> list[str]:
    """:func:`sample_key` of each file, made unique (``a.jpg`` and ``a.png`` would be one
    sample to a WebDataset reader): a later clash gets its extension appended, then a count."""
    seen: set[str] = set()
    out = []
    for rel in rels:
        key = sample_key(rel)
        if key in seen:
            key = f"{key}_{Path(rel).suffix.lstrip('.').lower()}"
            base, n = key, 1
            while key in seen:
                key, n = f"{base}_{n}", n + 1
        seen.add(key)
        out.append(key)
    return out


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def _padded(nbytes: int) -> int:
    """A tar file's size once closed: tarfile pads it to whole records of 10 KiB."""
    return -(-nbytes // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _samples(src: ImageSource, keys: list[str],
             order: list[int]) -> Iterator[tuple[list[tuple[tarfile.TarInfo, io.BytesIO]], int, int]]:
    """(tar members, bytes they take in the archive, image bytes) of each sample, in ``order``."""
    assert src.files is not None
    for k in order:
        path = Path(src.files[k])
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
        members = [_member(f"{keys[k]}.{path.suffix.lstrip('.').lower()}", data)]
        if src.labels is not None:
            members.append(_member(f"{keys[k]}.cls", str(src.labels[k]).encode()))
        need = sum(512 + -(-len(d.getvalue()) // 512) * 512 + 1024 for _, d in members)
        yield members, need, len(data)


def write_split(folder: Path, final_out: Path, shard_size: int, seed: int,
                progress: bool) -> SplitWritten:
    """Write the images of one split folder as shards into the hidden partial folder of
    ``final_out`` (``.<split>.partial`` beside it; :func:`write_shards` moves it into place).
    Each shard goes through the one atomic write (:mod:`moco.utils.atomic`): a failure (a
    full disk, a signal) leaves no partial shard behind."""
    src = image_folder(folder)
    assert src.files is not None
    n = len(src.files)
    keys = unique_keys([os.path.relpath(f, folder) for f in src.files])  # in listing order
    order = torch.randperm(n, generator=stream_generator(seed)).tolist()
    out = _partial(final_out)
    shutil.rmtree(out, ignore_errors=True)  # left by an interrupted run
    out.mkdir(parents=True)
    shards: list[Path] = []
    total = 0
    samples = _samples(src, keys, order)
    nxt = next(samples, None)
    with tqdm(total=n, desc=f"shard {final_out.name}", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        while nxt is not None:
            shard = out / f"shard-{len(shards):06d}.tar"
            with atomic_path(shard) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
                size = 1024  # the end-of-archive blocks
                while nxt is not None:
                    members, need, nbytes = nxt
                    if size > 1024 and _padded(size + need) > shard_size:
                        break  # the shard holds a sample and this one would overflow it
                    for info, data_io in members:
                        tf.addfile(info, data_io)
                    size += need
                    total += nbytes
                    bar.update(1)
                    nxt = next(samples, None)
            shards.append(shard)
    if src.labels is not None:
        atomic_write_text(out / CLASSES_FILE, "".join(f"{c}\n" for c in src.classes))
    return SplitWritten(final_out.name, n, [final_out / p.name for p in shards], total)


def _partial(split: Path) -> Path:
    return split.parent / f".{split.name}.partial"


def _ours(split: Path) -> list[Path]:
    """What a split folder holds of a shard writer's: its shards and ``classes.txt``."""
    extra = [split / CLASSES_FILE] if (split / CLASSES_FILE).is_file() else []
    return shard_files(split) + extra


def input_splits(data: Path) -> list[tuple[str, Path]]:
    """(split name, folder) of what ``moco shard`` writes: DATA's ``train/``, ``val/`` and
    ``test/``, or DATA itself as ``train`` when it is a folder of images without them (flat
    or one sub-folder per class), as pretraining reads it."""
    check_data_folder(data)
    splits = [(n, data / n) for n in SPLITS if (data / n).is_dir()]
    if splits and splits[0][0] != "train":
        raise DataError(f"{data} has {splits[0][0]}/ but no train/ folder: expected "
                        "DATA/train/ (and optionally val/ or test/), or a folder of images")
    if splits:
        return splits
    if not holds_images(data):
        raise DataError(f"{data} has no train/, val/ or test/ folder and no images: 'moco "
                        "shard' writes ImageFolder splits (DATA/train/<class>/<image>) or a "
                        "folder of images as shards")
    return [("train", data)]


def check_out(data: Path, out: Path) -> None:
    """Refuse an OUT inside DATA, or one that holds another dataset (image files, or
    folders of images beside or inside its split folders)."""
    d, o = data.resolve(), out.resolve()
    if o == d or d in o.parents:
        raise DataError(f"the output folder {o} is inside the data folder {d}; the data folder "
                        "is never written to: choose another OUT")
    if not out.is_dir():
        return
    for entry in sorted(out.iterdir()):
        if entry.name.startswith("."):
            continue
        inside = sorted(entry.iterdir()) if entry.name in SPLITS and entry.is_dir() else []
        found = [e for e in inside if not e.name.startswith(".") and
                 (e.is_dir() or is_image_name(e.name))]
        if found or is_image_name(entry.name) or (entry.name not in SPLITS and entry.is_dir()
                                                  and holds_images(entry)):
            what = found[0] if found else entry
            raise DataError(f"{out} holds another dataset ({what} holds images or is one): "
                            "shards are never written beside or into it; choose an empty or "
                            "new OUT")


def _check_old(out: Path, overwrite: bool) -> None:
    for name in SPLITS:
        old = shard_files(out / name)
        if old and not overwrite:
            raise DataError(f"{out / name} already holds {len(old)} shard(s); pass --overwrite "
                            "to replace them (every split of OUT), or choose another OUT")


@contextlib.contextmanager
def _signals_wait() -> Iterator[None]:
    """SIGTERM, SIGINT and SIGHUP wait until the block ends, then act as they would have."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    old = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for n in got[:1]:
            os.kill(os.getpid(), n)


def _move(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _swap_in(out: Path, written: list[str]) -> None:
    """Replace the shards of every split of ``out`` by the partial folders of ``written``:
    the old ones go to a hidden trash folder, the new ones into place (signals wait)."""
    trash = out / _TRASH
    shutil.rmtree(trash, ignore_errors=True)
    with _signals_wait():
        for name in SPLITS:
            old = _ours(out / name)
            if old:
                (trash / name).mkdir(parents=True, exist_ok=True)
            for p in old:
                _move(p, trash / name / p.name)
        for name in written:
            part, final = _partial(out / name), out / name
            if not final.exists():
                _move(part, final)
                continue
            for p in sorted(part.iterdir()):
                _move(p, final / p.name)
            part.rmdir()
        for name in SPLITS:
            if name not in written and (out / name).is_dir() and not any((out / name).iterdir()):
                (out / name).rmdir()
        fsync_dir(out)
    shutil.rmtree(trash, ignore_errors=True)


def write_shards(data: Path, out: Path, shard_size: int, seed: int = 0, overwrite: bool = False,
                 progress: bool = True) -> list[SplitWritten]:
    """Every split of ``data`` (:func:`input_splits`) as shards in ``out/<split>/``; refuses
    to write into the data folder, into another dataset, over shards already there (unless
    ``overwrite``) or while another process writes ``out`` (see the module doc)."""
    splits = input_splits(data)
    check_out(data, out)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, what="shard output folder"):
        _check_old(out, overwrite)
        shutil.rmtree(out / _TRASH, ignore_errors=True)  # left by a stopped run
        try:
            done = [write_split(folder, out / name, shard_size, seed, progress)
                    for name, folder in splits]
        except BaseException:
            for name, _ in splits:  # a failed write leaves nothing behind
                shutil.rmtree(_partial(out / name), ignore_errors=True)
            raise
        _swap_in(out, [name for name, _ in splits])
    return done
