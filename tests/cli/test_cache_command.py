"""``moco cache list|clean`` on a cache folder filled by the library itself (a folder index and
a decoded-image cache) plus a build that a stopped run left and one still running."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pytest
from helpers import make_image_folder, run_cli

from moco.data.cache import cached_images
from moco.data.cache_dir import BUILDING, cache_entries
from moco.data.index import listed_folder

DAY = 86400.0


def filled_cache(tmp_path: Path) -> Path:
    """An index and a decoded cache of a tiny folder, an abandoned build, all in one folder."""
    cache = tmp_path / "cache"
    data = make_image_folder(tmp_path / "data", per_class=3, size=8, splits=("train",))
    source = listed_folder(data / "train", cache_dir=cache)
    assert cached_images(source, cache, log=lambda _m: None) is not None
    (cache / f".abandoned-x{BUILDING}").mkdir()
    (cache / f".abandoned-x{BUILDING}" / "images.npy").write_bytes(b"x" * 100)
    return cache


def test_list_shows_every_entry_with_its_size(tmp_path: Path) -> None:
    cache = filled_cache(tmp_path)
    kinds = sorted(e.kind for e in cache_entries(cache))
    assert kinds == ["images", "index", "unfinished"]
    rc, out, err = run_cli(["cache", "list", "--cache-dir", str(cache)])
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("3 entries, ") and str(cache) in lines[-1]
    assert any("decoded images" in line and str(tmp_path / "data" / "train") in line
               for line in lines)
    total = sum(e.nbytes for e in cache_entries(cache))
    assert total > 8 * 8 * 3 * 6  # the decoded pixels at least


def test_clean_removes_what_is_old_or_everything(tmp_path: Path) -> None:
    cache = filled_cache(tmp_path)
    entries = {e.kind: e for e in cache_entries(cache)}
    old = time.time() - 30 * DAY
    meta = entries["images"].path / "meta.json"
    os.utime(meta, (old, old))
    rc, out, _ = run_cli(["cache", "clean", "--cache-dir", str(cache), "--older-than", "10",
                          "--dry-run"])
    assert rc == 0 and out.startswith("would remove 1 of 1 entries")
    assert meta.exists()
    rc, out, _ = run_cli(["cache", "clean", "--cache-dir", str(cache), "--older-than", "10"])
    assert rc == 0 and out.startswith("removed 1 of 1 entries")
    assert sorted(e.kind for e in cache_entries(cache)) == ["index", "unfinished"]
    rc, out, _ = run_cli(["cache", "clean", "--cache-dir", str(cache)])
    assert rc == 0 and out.startswith("removed 2 of 2 entries")
    assert cache_entries(cache) == [] and not list((cache / "index").iterdir())


def test_clean_leaves_a_build_in_progress(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    building = cache / f".entry-abcd{BUILDING}"
    building.mkdir(parents=True)
    fd = os.open(building, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running build holds it
    try:
        rc, out, _ = run_cli(["cache", "clean", "--cache-dir", str(cache)])
        assert rc == 0 and out.startswith("removed 0 of 1 entries") and building.is_dir()
    finally:
        os.close(fd)
    run_cli(["cache", "clean", "--cache-dir", str(cache)])
    assert not building.exists()


def test_the_default_folder_is_moco_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOCO_CACHE", str(tmp_path / "c"))
    rc, out, _ = run_cli(["cache", "list"])
    assert rc == 0 and out.strip() == f"0 entries, 0 B in {tmp_path / 'c'}"
    rc, _, err = run_cli(["cache", "purge"])
    assert rc == 2 and "expected ACTION to be one of list, clean, got purge" in err
