"""Caches are never trusted blindly: a cut or empty index or cache file is built again (no
BadZipFile or EOFError traceback); a file replaced with mv or cp -f under the same size and
mtime is seen by the decoded cache's and the shards' keys and by a relisted index; a file
found unreadable and then replaced is read again."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_image_folder
from PIL import Image

from moco.data import cache as C
from moco.data.decode import KIND_BAD
from moco.data.index import index_path, listed_folder
from moco.data.input_plan import original_crops_loader
from moco.data.input_settings import InputSettings
from moco.data.shard_writer import parse_size, write_shards
from moco.data.splits import find_dataset

QUIET = {"log": lambda _m: None}


def _ppm(path: Path, h: int, w: int, value: int) -> None:
    """A binary PPM: its byte size depends only on h x w (and the digits of both)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def _folder(root: Path) -> Path:
    for k in range(6):
        _ppm(root / "train" / f"c{k % 2}" / f"{k}.ppm", 32, 32, 20 * k)
    return root


def _age(root: Path) -> None:
    t = time.time() - 60
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, (t, t))


def _replace(target: Path, new: Path, how: str) -> None:
    """Put ``new``'s bytes under ``target``'s name with ``target``'s size and mtime kept:
    ``mv`` (another inode) or ``cp -f`` (the same inode, rewritten)."""
    st = os.stat(target)
    assert os.path.getsize(new) == st.st_size
    if how == "mv":
        os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(new, target)
    else:
        data = new.read_bytes()
        with open(target, "r+b") as f:
            f.write(data)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(target)
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


# ----- cut and empty stored files --------------------------------------------------------------
@pytest.mark.parametrize("how", ["cut", "empty"])
def test_a_cut_or_empty_folder_index_is_built_again(tmp_path: Path, how: str) -> None:
    root = _folder(tmp_path / "d")
    cache = tmp_path / "cache"
    first = listed_folder(root / "train", cache_dir=cache)
    first.headers(1)
    path = index_path((root / "train").resolve(), cache.resolve())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if how == "cut" else b"")
    _age(root)
    again = listed_folder(root / "train", cache_dir=cache)
    assert again.files == first.files
    assert np.array_equal(again.headers(1)[:, :3], first.headers(1)[:, :3])
    assert np.load(path)["files"].size  # stored whole again


@pytest.mark.parametrize("how", ["cut", "empty"])
def test_a_cut_or_empty_shard_index_is_built_again(tmp_path: Path, how: str) -> None:
    data = make_image_folder(tmp_path / "data", per_class=4, size=16)
    write_shards(data, tmp_path / "shards", parse_size("1MB"), progress=False)
    first = find_dataset(tmp_path / "shards").train
    stored = sorted((Path(os.environ["MOCO_CACHE"]) / "index").glob("shards-*train*.npz"))
    assert stored
    for p in stored:
        raw = p.read_bytes()
        p.write_bytes(raw[: len(raw) // 2] if how == "cut" else b"")
    again = find_dataset(tmp_path / "shards").train
    assert len(again) == len(first) and again.labels == first.labels


@pytest.mark.parametrize("part,how", [("images.npy", "cut"), ("labels.npy", "empty"),
                                      ("meta.json", "empty"), ("sizes.npy", "absent")])
def test_a_cut_or_empty_decoded_cache_file_is_built_again(tmp_path: Path, part: str,
                                                          how: str) -> None:
    root = _folder(tmp_path / "d")
    _ppm(root / "train" / "c0" / "wide.ppm", 20, 40, 99)  # mixed sizes: sizes.npy is kept
    src = find_dataset(root).train
    first = C.cached_images(src, tmp_path / "c", short_side=32, **QUIET)
    assert first is not None and first.path is not None and first.sizes is not None
    want, f = np.array(first.images), first.path / part
    del first  # its memory map would fault on the cut file
    if how == "absent":
        f.unlink()
    else:
        raw = f.read_bytes()
        f.write_bytes(raw[: len(raw) // 2] if how == "cut" else b"")
    again = C.cached_images(find_dataset(root).train, tmp_path / "c", short_side=32, **QUIET)
    assert again is not None and again.sizes is not None
    assert np.array_equal(np.asarray(again.images), want)


# ----- files replaced under the same size and mtime --------------------------------------------
@pytest.mark.parametrize("how", ["mv", "cp -f"])
def test_the_decoded_cache_sees_a_file_replaced_with_the_same_size_and_mtime(
        tmp_path: Path, how: str) -> None:
    root = _folder(tmp_path / "d")
    target = root / "train" / "c1" / "3.ppm"
    src = find_dataset(root).train
    k = (src.files or []).index(target)
    first = C.cached_images(src, tmp_path / "c", **QUIET)
    assert first is not None and int(first.images[k].max()) == 60
    _ppm(tmp_path / "new.ppm", 32, 32, 200)
    _replace(target, tmp_path / "new.ppm", how)
    again = C.cached_images(find_dataset(root).train, tmp_path / "c", **QUIET)
    assert again is not None and (np.asarray(again.images[k]) == 200).all()


def test_a_relisted_index_reads_a_file_moved_over_another_with_its_size_and_mtime(
        tmp_path: Path) -> None:
    root = _folder(tmp_path / "d")
    cache = tmp_path / "cache"
    listed_folder(root / "train", cache_dir=cache).headers(1)
    _ppm(tmp_path / "tall.ppm", 64, 16, 5)  # the bytes of a 32 x 32 PPM, another shape
    _replace(root / "train" / "c1" / "3.ppm", tmp_path / "tall.ppm", "mv")
    src = listed_folder(root / "train", cache_dir=cache)
    k = [f.name for f in src.files or []].index("3.ppm")
    assert tuple(src.headers(1)[k, :2]) == (64, 16)


def test_the_shard_index_sees_a_shard_replaced_with_the_same_size_and_mtime(
        tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=4, size=16)
    write_shards(data, tmp_path / "a", parse_size("1MB"), seed=0, progress=False)
    write_shards(data, tmp_path / "b", parse_size("1MB"), seed=1, progress=False)
    first = find_dataset(tmp_path / "a").train
    order_a = [first.sample_name(i).rsplit(":", 1)[1] for i in range(len(first))]  # type: ignore[attr-defined]
    shard = tmp_path / "a" / "train" / "shard-000000.tar"
    _replace(shard, tmp_path / "b" / "train" / "shard-000000.tar", "mv")
    again = find_dataset(tmp_path / "a").train
    order_b = [again.sample_name(i).rsplit(":", 1)[1] for i in range(len(again))]  # type: ignore[attr-defined]
    assert sorted(order_b) == sorted(order_a) and order_b != order_a


# ----- unreadable, then replaced ---------------------------------------------------------------
@pytest.mark.parametrize("how", ["mv", "cp -f"])
def test_a_file_found_unreadable_then_replaced_is_read_again(tmp_path: Path, how: str) -> None:
    root = _folder(tmp_path / "d")
    target = root / "train" / "c1" / "3.ppm"
    good = tmp_path / "good.ppm"
    shutil.copy(target, good)
    target.write_bytes(bytes(os.path.getsize(good)))  # zeros: no image header
    _age(root)  # an index a later start trusts without listing again
    cache = tmp_path / "cache"
    src = listed_folder(root / "train", cache_dir=cache, on_bad_image="skip")
    k = [f.name for f in src.files or []].index("3.ppm")
    assert src.headers(1)[k, 2] == KIND_BAD
    _replace(target, good, how)  # cp -f: the folder is unchanged, the index not listed again
    again = listed_folder(root / "train", cache_dir=cache)
    assert again.headers(1)[k, 2] != KIND_BAD and tuple(again.headers(1)[k, :2]) == (32, 32)
    cfg = InputSettings(batch_size=2, image_size=24, crops="original", channels_last=False)
    assert original_crops_loader(cfg, again, torch.device("cpu"), 0) is not None  # not refused
