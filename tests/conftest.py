"""Shared fixtures: tiny datasets built in a temporary folder, so tests run anywhere."""

from __future__ import annotations

import contextlib
import errno
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from moco.cli import main


def make_image_folder(root: Path, classes: int = 2, per_class: int = 16, size: int = 32,
                      splits: tuple[str, ...] = ("train", "test"), seed: int = 0) -> Path:
    """DATA/{train,test}/class_i/NNN.png with class-dependent colours plus noise."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, size=3)
            for i in range(per_class):
                noise = rng.integers(-40, 40, size=(size, size, 3))
                arr = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """2 classes x 16 images of 32x32 in train/ and test/."""
    return make_image_folder(tmp_path / "data")


# Settings for a tiny, fast pretraining run on ``tiny_data``.
TINY_FLAGS = ["-a", "resnet18", "--image-size", "32", "-b", "8", "--moco-k", "32",
              "--bn-splits", "2", "--epochs", "2", "--workers", "0", "--no-progress",
              "--knn-k", "5", "--channels-last", "false"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoded-image caches (moco.data.cache) go to a per-test folder, never to ~/.cache."""
    monkeypatch.setenv("MOCO_CACHE", str(tmp_path_factory.mktemp("moco-cache")))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: bit-exact comparisons hold for a fixed count, and tiny runs are
    fastest that way on shared CPUs. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fill_disk_after(f: Any, nbytes: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make the writes of the open file ``f`` fail with ENOSPC once ``nbytes`` are written, as
    on a disk that fills up mid-write; returns ``f``."""
    left = {"n": nbytes}
    real_write = f.write

    def write(b: Any) -> int:
        if len(b) > left["n"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        left["n"] -= len(b)
        return int(real_write(b))

    monkeypatch.setattr(f, "write", write, raising=False)
    return f


def full_disk_for_exports(monkeypatch: pytest.MonkeyPatch, after_bytes: int) -> None:
    """A full disk for the files that the exports and embeddings write: the one atomic write's
    files (``moco.engine.atomic``) fail after ``after_bytes`` (``fill_disk_after``), and
    ``safetensors.torch.save_file``, which writes from Rust, fails as it does on a full disk
    (measured on a 1 MB tmpfs: SafetensorError, no file left)."""
    import safetensors.torch
    from safetensors import SafetensorError

    import moco.engine.atomic as atomic_mod

    real_fdopen = os.fdopen
    monkeypatch.setattr(atomic_mod.os, "fdopen", lambda *a, **k: fill_disk_after(
        real_fdopen(*a, **k), after_bytes, monkeypatch))

    def save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"")
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``moco ARGV`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()
