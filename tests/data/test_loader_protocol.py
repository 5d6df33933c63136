"""The training loader protocol (moco.data.batches.TrainLoader): every loader carries
bad_images, the count of samples read this epoch, state_dict and load_state_dict, so that the
training loop reads them without probing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import cfg_for, loader_for, make_image_folder

from moco.data.batches import LoaderState, TrainLoader
from moco.data.cache import DecodedImages
from moco.data.pil_loader import PILTrainLoader
from moco.data.shard_loader import ShardTrainLoader
from moco.data.shard_writer import parse_size, write_shards
from moco.data.splits import find_dataset
from moco.data.tensor_loader import DecodeTrainLoader, TensorTrainLoader

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
MEMBERS = ("bad_images", "samples_read", "steps", "batches", "state_dict", "load_state_dict")


def _loaders(tmp_path: Path) -> dict[str, Any]:
    data = make_image_folder(tmp_path / "data", per_class=10, size=24)
    src = find_dataset(data).train
    write_shards(data, tmp_path / "shards", parse_size("1MB"), progress=False)
    shards = find_dataset(tmp_path / "shards").train
    cfg = cfg_for(batch_size=4, image_size=16)
    arr = np.random.default_rng(0).integers(0, 256, (20, 24, 24, 3), dtype=np.uint8)
    return {
        "pil": PILTrainLoader(cfg, src, CPU, 0),
        "tensor": TensorTrainLoader(cfg, DecodedImages(arr, [0] * 20), CPU),
        "decode": DecodeTrainLoader(cfg, src, CPU, 0),
        "crops": loader_for(data / "train", cfg),
        "shards": ShardTrainLoader(cfg, shards, CPU, 0),  # type: ignore[arg-type]
    }


def test_every_loader_has_the_members_and_counts_what_it_reads(tmp_path: Path) -> None:
    for name, loader in _loaders(tmp_path).items():
        assert isinstance(loader, LoaderState), name
        typed: TrainLoader = loader
        assert all(hasattr(typed, m) for m in MEMBERS), name
        assert isinstance(loader.bad_images, set) and loader.samples_read == 0, name
        assert isinstance(loader.state_dict(), dict), name
        steps = loader.steps()
        it = loader.batches(0)
        next(it)
        assert loader.samples_read == 4, name
        list(it)
        assert loader.samples_read == steps * 4 == 20, name
        resumed = list(loader.batches(1, start_step=2))
        assert len(resumed) == steps - 2 and loader.samples_read == 20, name  # steps before: read
        loader.load_state_dict(loader.state_dict(), 0)


def test_defaults_take_nothing() -> None:
    s = LoaderState()
    assert (s.bad_images, s.samples_read, s.state_dict()) == (set(), 0, {})
    s.load_state_dict({"kind": "other"}, 3)
    assert s.state_dict() == {}
