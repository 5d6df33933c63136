"""moco.data.index: the file list, labels and sizes of a split folder, listed once and reloaded
without reading any file; changes of the tree are seen."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import moco.data.index as index_mod
import moco.data.splits
from moco.data.cache import cached_images
from moco.data.decode import KIND_BAD, KIND_JPEG, KIND_OTHER
from moco.data.folders import image_folder
from moco.data.index import IndexedSource, folder_index, listed_folder, read_headers
from moco.data.input_plan import cache_bytes
from moco.data.splits import find_dataset


def tree(root: Path) -> Path:
    """train/: 3 classes of JPEGs and PNGs of several sizes, a nested folder, hidden files
    and a non-image file; an old mtime on every directory (so the index trusts it)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["b_cls", "a_cls", "c_cls"]):
        d = root / "train" / name
        (d / "nested").mkdir(parents=True)
        for i in range(4):
            h, w = 20 + 7 * i + c, 30 + 5 * i
            ext = ".jpg" if i % 2 == 0 else ".png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}{ext}")
        Image.new("RGB", (9, 11)).save(d / "nested" / "deep.JPG")
        (d / "._hidden.jpg").write_bytes(b"\x00\x05")
        (d / "notes.txt").write_text("x")
    (root / "train" / "a_cls" / "broken.jpg").write_text("not an image")
    age(root)
    return root


def age(root: Path, seconds: float = 60) -> None:
    t = time.time() - seconds
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, (t, t))


def test_listing_equals_image_folder_and_sizes_equal_pil(tmp_path: Path) -> None:
    root = tree(tmp_path / "d")
    ref = image_folder(root / "train")
    src = listed_folder(root / "train", cache_dir=tmp_path / "cache")
    assert isinstance(src, IndexedSource)
    assert src.files == ref.files and src.labels == ref.labels and src.classes == ref.classes
    h = src.headers(1)
    for k, f in enumerate(ref.files or []):
        if f.name == "broken.jpg":
            assert h[k, 2] == KIND_BAD
            continue
        with Image.open(f) as img:
            assert (h[k, 0], h[k, 1]) == (img.height, img.width)
            assert h[k, 2] == (KIND_JPEG if img.format == "JPEG" else KIND_OTHER)


def test_a_later_start_reads_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tree(tmp_path / "d")
    first = listed_folder(root / "train", cache_dir=tmp_path / "cache")
    first.headers(1)

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("the folder was listed or a file was read")

    monkeypatch.setattr(index_mod, "image_folder", boom)
    monkeypatch.setattr(index_mod, "_headers", boom)
    again = listed_folder(root / "train", cache_dir=tmp_path / "cache")
    assert again.files == first.files
    assert np.array_equal(again.headers(1), first.headers(1))


@pytest.mark.parametrize("change", ["add", "remove", "rename", "new class", "nested"])
def test_a_changed_tree_is_listed_again(tmp_path: Path, change: str) -> None:
    root = tree(tmp_path / "d")
    cache = tmp_path / "cache"
    before = listed_folder(root / "train", cache_dir=cache)
    before.headers(1)
    d = root / "train" / "a_cls"
    if change == "add":
        Image.new("RGB", (5, 6)).save(d / "9.jpg")
    elif change == "remove":
        (d / "0.jpg").unlink()
    elif change == "rename":
        (d / "0.jpg").rename(d / "7.jpg")
    elif change == "new class":
        (root / "train" / "d_cls").mkdir()
        Image.new("RGB", (5, 6)).save(root / "train" / "d_cls" / "0.jpg")
    else:
        Image.new("RGB", (5, 6)).save(d / "nested" / "more.png")
    after = listed_folder(root / "train", cache_dir=cache)
    ref = image_folder(root / "train")
    assert after.files == ref.files and after.labels == ref.labels and after.files != before.files
    h = after.headers(1)
    for k, f in enumerate(ref.files or []):
        if f.name != "broken.jpg":
            with Image.open(f) as img:
                assert (h[k, 0], h[k, 1]) == (img.height, img.width), f


def test_unchanged_files_keep_their_headers_changed_ones_are_read(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = tree(tmp_path / "d")
    cache = tmp_path / "cache"
    listed_folder(root / "train", cache_dir=cache).headers(1)
    d = root / "train" / "b_cls"
    Image.new("RGB", (77, 66)).save(d / "2.jpg")  # rewritten in place: new size, mtime
    Image.new("RGB", (5, 6)).save(d / "9.jpg")  # and the folder changes
    read: list[str] = []
    real = index_mod._headers
    monkeypatch.setattr(index_mod, "_headers", lambda paths: read.extend(paths) or real(paths))
    src = listed_folder(root / "train", cache_dir=cache)
    assert sorted(Path(p).name for p in read) == ["2.jpg", "9.jpg"]
    assert src.files is not None
    h = src.headers(1)
    assert tuple(h[src.files.index(d / "2.jpg"), :2]) == (66, 77)


def test_a_recently_changed_folder_is_checked_again(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory modified within the mtime granularity is not trusted next time."""
    root = tree(tmp_path / "d")
    age(root, 0)
    listed_folder(root / "train", cache_dir=tmp_path / "cache")
    calls = []
    real = index_mod.image_folder
    monkeypatch.setattr(index_mod, "image_folder", lambda *a: calls.append(a) or real(*a))
    listed_folder(root / "train", cache_dir=tmp_path / "cache")
    assert calls


def test_never_stored_inside_the_data_folder(tmp_path: Path) -> None:
    root = tree(tmp_path / "d")
    listed_folder(root / "train", cache_dir=root / "cache")
    assert not (root / "cache").exists()


def test_subset_keeps_the_rows(tmp_path: Path) -> None:
    root = tree(tmp_path / "d")
    src = listed_folder(root / "train", cache_dir=tmp_path / "cache")
    sub = src.subset([5, 1, 7])
    assert isinstance(sub, IndexedSource) and sub.files is not None and src.files is not None
    assert sub.files == [src.files[i] for i in (5, 1, 7)]
    assert np.array_equal(sub.headers(1), src.headers(1)[[5, 1, 7]])
    assert np.array_equal(sub.subset([2, 0]).headers(1), src.headers(1)[[7, 5]])


def test_find_dataset_uses_the_index(tmp_path: Path) -> None:
    root = tree(tmp_path / "d")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (root / "val" / "a_cls").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "val" / "a_cls" / "0.png")
    splits = find_dataset(root, cache_dir=tmp_path / "cache")
    assert isinstance(splits.train, IndexedSource) and isinstance(splits.test, IndexedSource)
    assert list((tmp_path / "cache" / "index").glob("*.npz"))
    assert moco.data.splits.find_dataset is find_dataset


def test_parallel_header_reads_equal_serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tree(tmp_path / "d")
    paths = [str(p) for p in image_folder(root / "train").files or []] * 20
    monkeypatch.setattr(index_mod, "PARALLEL_MIN", 10)
    monkeypatch.setattr(index_mod, "CHUNK", 37)
    assert np.array_equal(read_headers(paths, 2), read_headers(paths, 1))


@pytest.mark.parametrize("uniform", [True, False])
def test_cache_estimate_equals_the_cache(tmp_path: Path, uniform: bool) -> None:
    """The size estimate from the index is the size cached_images stores."""
    rng = np.random.default_rng(1)
    d = tmp_path / "data" / "imgs"
    d.mkdir(parents=True)
    for i in range(6):
        h, w = (40, 40) if uniform else (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    src = folder_index(d, tmp_path / "cache").source()
    h = src.headers(1)
    got = cached_images(src, tmp_path / "cache", short_side=37)
    assert got is not None
    assert cache_bytes(h[:, 0], h[:, 1], 37) == got.nbytes


def _start(root: Path, cache: Path, log: Path) -> None:
    real = index_mod._headers

    def counted(paths: list[str]) -> np.ndarray:
        with open(log, "a") as f:
            f.write(f"{len(paths)}\n")
        return real(paths)

    index_mod._headers = counted  # type: ignore[assignment]  # in this child process only
    listed_folder(root / "train", cache_dir=cache).headers(1)


def test_processes_starting_together_read_the_headers_once(tmp_path: Path) -> None:
    """torchrun's ranks start together: one builds the index, the others read it."""
    import multiprocessing as mp

    root = tree(tmp_path / "d")
    log = tmp_path / "reads.txt"
    procs = [mp.get_context("fork").Process(target=_start, args=(root, tmp_path / "cache", log))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert log.read_text().split() == [str(len(image_folder(root / "train").files or []))]


def test_an_unwritable_cache_folder_still_lists_and_says_so(tmp_path: Path) -> None:
    root = tree(tmp_path / "d")
    (tmp_path / "not-a-folder").write_text("x")  # the cache path cannot be created
    said: list[str] = []
    src = listed_folder(root / "train", cache_dir=tmp_path / "not-a-folder")
    assert src.files == image_folder(root / "train").files
    src.index.sized(1, said.append)
    assert "not stored" in said[0] and src.index.headers is not None
