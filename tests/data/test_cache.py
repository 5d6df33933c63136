"""The decoded-image cache (moco.data.cache): content, reuse, rebuild on change, location."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import make_image_folder
from PIL import Image

from moco.data import cache as C
from moco.data import cache_dir as CD
from moco.data.source import DataError, ImageSource, open_rgb
from moco.data.splits import find_dataset


def _train(root: Path) -> ImageSource:
    return find_dataset(root).train


def test_builds_native_size_and_matches_pil(tiny_data: Path, tmp_path: Path) -> None:
    src = _train(tiny_data)
    d = C.cached_images(src, tmp_path / "cache", log=lambda _m: None)
    assert d is not None and d.path is not None and d.sizes is None
    assert d.images.shape == (32, 32, 32, 3) and d.images.dtype == np.uint8
    assert isinstance(d.images, np.memmap)
    assert d.labels == src.labels
    assert src.files is not None
    for i in (0, 17, 31):
        assert np.array_equal(d.images[i], np.asarray(open_rgb(src.files[i])))
    assert d.path.parent == tmp_path / "cache"
    assert not [p for p in d.path.parent.iterdir() if p.name.startswith(".")]  # no temporaries


def test_reused_then_rebuilt_when_a_file_changes(tiny_data: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    src = _train(tiny_data)
    first = C.cached_images(src, tmp_path / "c", log=lambda _m: None)
    assert first is not None and first.path is not None
    calls = []
    real = C.decode_resized
    monkeypatch.setattr(C, "decode_resized", lambda *a: calls.append(1) or real(*a))
    again = C.cached_images(_train(tiny_data), tmp_path / "c", log=lambda _m: None)
    assert again is not None and again.path == first.path and not calls  # reused, nothing decoded
    assert src.files is not None
    target = src.files[3]
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(target)
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rebuilt = C.cached_images(_train(tiny_data), tmp_path / "c", log=lambda _m: None)
    assert rebuilt is not None and rebuilt.path != first.path and len(calls) == 32
    assert (rebuilt.images[3] == 7).all()


def test_never_inside_the_data_folder(tiny_data: Path) -> None:
    src = _train(tiny_data)
    for inside in (tiny_data / "cache", tiny_data / "train" / "x", tiny_data):
        with pytest.raises(DataError, match="inside the data folder"):
            C.cached_images(src, inside, log=lambda _m: None)
    before = sorted(p for p in tiny_data.rglob("*"))
    d = C.cached_images(src, None, log=lambda _m: None)  # $MOCO_CACHE (conftest: a tmp folder)
    assert d is not None and d.path is not None
    assert d.path.parent == Path(os.environ["MOCO_CACHE"])
    assert sorted(p for p in tiny_data.rglob("*")) == before


def test_default_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOCO_CACHE", str(tmp_path / "x"))
    assert CD.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("MOCO_CACHE")
    assert CD.default_cache_dir() == Path.home() / ".cache" / "moco"
    assert CD.resolve_cache_dir("/some/where") == Path("/some/where")


def test_mixed_sizes_short_side_layout(tmp_path: Path) -> None:
    root = tmp_path / "data" / "train"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shapes = [(40, 60), (100, 50), (20, 30), (30, 200)]
    for k, (h, w) in enumerate(shapes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{k}.png")
    src = find_dataset(tmp_path / "data").train
    d = C.cached_images(src, tmp_path / "c", short_side=32, log=lambda _m: None)
    assert d is not None and d.sizes is not None and d.labels is None
    # short side > 32 -> 32 (long side as T.Resize), smaller kept, long side cut to 64
    assert d.sizes.tolist() == [[32, 48], [64, 32], [20, 30], [30, 64]]
    assert d.images.shape == (4, 64, 64, 3)
    assert src.files is not None
    img = open_rgb(src.files[0]).resize((48, 32), Image.Resampling.BILINEAR)
    assert np.array_equal(d.images[0, :32, :48], np.asarray(img))
    assert (d.images[0, 32:] == 0).all() and (d.images[0, :, 48:] == 0).all()
    assert np.array_equal(d.images[2, :20, :30], np.asarray(open_rgb(src.files[2])))


def test_over_budget_declines(tiny_data: Path, tmp_path: Path) -> None:
    msgs: list[str] = []
    assert C.cached_images(_train(tiny_data), tmp_path / "c", budget=1000, log=msgs.append) is None
    assert "over the budget" in msgs[0] and not (tmp_path / "c").exists()


def test_in_memory_source_passes_through(tmp_path: Path) -> None:
    arr = np.zeros((5, 8, 8, 3), np.uint8)
    d = C.cached_images(ImageSource(array=arr, labels=[0] * 5), tmp_path / "c")
    assert d is not None and d.images is arr and d.path is None and not (tmp_path / "c").exists()


def test_unwritable_cache_folder_declines(tiny_data: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    msgs: list[str] = []
    assert C.cached_images(_train(tiny_data), blocker / "sub", log=msgs.append) is None
    assert "cannot write" in msgs[0]


def test_bad_image_stop_or_skip(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", classes=1, per_class=4, splits=("train",))
    bad = root / "train" / "class_0" / "001.png"
    bad.write_bytes(b"not an image")
    src = find_dataset(root).train
    with pytest.raises(DataError, match="001.png"):
        C.cached_images(src, tmp_path / "c", log=lambda _m: None)
    assert not any((tmp_path / "c").iterdir())  # nothing half-built is left
    d = C.cached_images(src, tmp_path / "c", on_bad_image="skip", log=lambda _m: None)
    assert d is not None and d.bad == [1]
    assert np.array_equal(d.images[1], d.images[2])  # replaced by the next readable image
    assert C.cached_images(src, tmp_path / "c", on_bad_image="skip").bad == [1]  # type: ignore[union-attr]


def test_entries_of_vanished_folders_are_removed(tmp_path: Path) -> None:
    import shutil

    a = make_image_folder(tmp_path / "a", classes=1, per_class=2, splits=("train",))
    b = make_image_folder(tmp_path / "b", classes=1, per_class=2, splits=("train",))
    first = C.cached_images(find_dataset(a).train, tmp_path / "c", log=lambda _m: None)
    assert first is not None and first.path is not None and first.path.exists()
    shutil.rmtree(a)
    C.cached_images(find_dataset(b).train, tmp_path / "c", log=lambda _m: None)
    assert not first.path.exists() and len(list((tmp_path / "c").iterdir())) == 1
