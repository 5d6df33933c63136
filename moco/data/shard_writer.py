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
pass ``shard_size`` (a sample larger than that gets a shard of its own). A split is written
into a hidden folder and moved into place when complete: an interrupted run leaves no split
that looks whole.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from moco.core.seeding import stream_generator
from moco.data.folders import image_folder
from moco.data.shards import CLASSES_FILE, shard_files
from moco.data.source import DataError, ImageSource
from moco.utils.atomic import atomic_path, atomic_write_text, fsync_dir

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


@dataclass
class SplitWritten:
    split: str
    samples: int
    shards: list[Path]
    bytes: int


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
    """Write the images of one split folder as shards in ``final_out``: into a hidden
    ``.<split>.partial`` folder beside it, moved into place once complete, so an interrupted
    run never leaves a split that looks whole (its partial folder is removed next time). Each
    shard goes through the one atomic write (:mod:`moco.utils.atomic`): a failure (a full
    disk, a signal) leaves no partial shard behind."""
    src = image_folder(folder)
    assert src.files is not None
    n = len(src.files)
    keys = unique_keys([os.path.relpath(f, folder) for f in src.files])  # in listing order
    order = torch.randperm(n, generator=stream_generator(seed)).tolist()
    out = final_out.parent / f".{final_out.name}.partial"
    shutil.rmtree(out, ignore_errors=True)  # left by an interrupted run
    out.mkdir(parents=True)
    shards: list[Path] = []
    total = 0
    samples = _samples(src, keys, order)
    nxt = next(samples, None)
    with tqdm(total=n, desc=f"shard {folder.name}", unit="img", disable=not progress,
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
    if not final_out.exists():
        os.replace(out, final_out)  # atomic: the split appears whole
    else:  # --overwrite into an existing folder: its old shards were removed before
        for p in sorted(out.iterdir()):
            os.replace(p, final_out / p.name)
        out.rmdir()
    fsync_dir(final_out.parent)
    return SplitWritten(folder.name, n, [final_out / p.name for p in shards], total)


def write_shards(data: Path, out: Path, shard_size: int, seed: int = 0, overwrite: bool = False,
                 progress: bool = True) -> list[SplitWritten]:
    """Every split folder of ``data`` (``train``, ``val``, ``test``) as shards in
    ``out/<split>/``; refuses to write into the data folder or over shards already there
    (``overwrite`` removes them first)."""
    splits = [n for n in ("train", "val", "test") if (data / n).is_dir()]
    if not data.is_dir():
        raise DataError(f"data folder {data} does not exist")
    if not splits:
        raise DataError(f"{data} has no train/, val/ or test/ folder: 'moco shard' writes "
                        "ImageFolder splits (DATA/train/<class>/<image>) as shards")
    d, o = data.resolve(), out.resolve()
    if o == d or d in o.parents:
        raise DataError(f"the output folder {o} is inside the data folder {d}; the data folder "
                        "is never written to: choose another OUT")
    for name in splits:
        old = shard_files(out / name)
        if old and not overwrite:
            raise DataError(f"{out / name} already holds {len(old)} shard(s); pass --overwrite "
                            "to replace them, or choose another OUT")
        for p in old:
            p.unlink()
    return [write_split(data / n, out / n, shard_size, seed, progress) for n in splits]
