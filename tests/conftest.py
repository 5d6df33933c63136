"""Shared fixtures: tiny datasets built in a temporary folder, so tests run anywhere (the
helpers the tests import are in ``helpers.py``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import make_image_folder

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`: one worker per core, one thread each
    os.environ["OMP_NUM_THREADS"] = "1"  # the subprocesses the tests start, too
    torch.set_num_threads(1)


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """2 classes x 16 images of 32x32 in train/ and test/."""
    return make_image_folder(tmp_path / "data")


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
