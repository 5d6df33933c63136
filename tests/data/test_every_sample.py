"""No sample silently left out: tar shards give every sample each epoch whatever the shard,
reader and batch counts (the remainder under one global batch rotates); a cut or zero-filled
shard and a label outside classes.txt are refused by every reader; a .tar inside an image
folder neither turns it into shards nor hides its images."""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import TINY_FLAGS, make_image_folder, run_cli

from moco.data.input_settings import InputSettings
from moco.data.shard_loader import ShardTrainLoader
from moco.data.shard_writer import parse_size, write_shards
from moco.data.shards import ShardSource, shard_source
from moco.data.source import DataError
from moco.data.splits import find_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def _shards(tmp_path: Path, per_class: int, size: str = "1MB") -> Path:
    data = make_image_folder(tmp_path / "data", per_class=per_class, size=16)
    write_shards(data, tmp_path / "shards", parse_size(size), progress=False)
    return tmp_path / "shards"


def _epoch(src: ShardSource, batch: int, workers: int, epoch: int, world: int = 1) -> list[int]:
    got: list[int] = []
    for rank in range(world):
        loader = ShardTrainLoader(InputSettings(batch_size=batch, image_size=16, aug="v2",
                                                channels_last=False, shuffle_buffer=4),
                                  src, CPU, workers, rank, world)
        got += torch.cat([b.index for b in loader.batches(epoch)]).tolist()
        assert loader.samples_read == loader.steps() * batch
    return got


# ----- every sample, each epoch ----------------------------------------------------------------
@pytest.mark.parametrize("batch,workers,world", [(4, 2, 1), (3, 3, 1), (2, 2, 2)])
def test_one_shard_with_several_readers_reads_all_but_a_rotating_remainder(
        tmp_path: Path, batch: int, workers: int, world: int) -> None:
    src = find_dataset(_shards(tmp_path, per_class=11)).train  # 22 samples, one shard
    assert isinstance(src, ShardSource) and len(src.index.shards) == 1
    per_epoch = 22 // (batch * world) * batch * world
    read_over_epochs: set[int] = set()
    left_out = []
    for epoch in range(4):
        got = _epoch(src, batch, workers, epoch, world)
        assert len(got) == len(set(got)) == per_epoch, (epoch, len(got))
        read_over_epochs |= set(got)
        left_out.append(frozenset(range(22)) - set(got))
    assert read_over_epochs == set(range(22))
    assert len(set(left_out)) > 1  # not the same tail every epoch


def test_many_shards_and_readers_read_every_sample_but_under_one_global_batch(
        tmp_path: Path) -> None:
    src = find_dataset(_shards(tmp_path, per_class=15, size="6KB")).train  # 30 samples
    assert isinstance(src, ShardSource) and len(src.index.shards) >= 4
    got = _epoch(src, 2, 2, 0, world=2)
    assert len(got) == len(set(got)) == 28


# ----- damaged shards and labels ---------------------------------------------------------------
def _every_reader_refuses(out: Path, match: str) -> None:
    with pytest.raises(DataError, match=match):
        find_dataset(out)  # pretrain, knn, lincls
    with pytest.raises(DataError, match=match):
        shard_source(out / "train")  # embed
    rc, _, err = run_cli(["pretrain", str(out), *TINY_FLAGS, "-b", "2", "--knn-every", "0",
                          "--output", str(out.parent / "run")])
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_shard_cut_at_a_sample_boundary_is_refused(tmp_path: Path) -> None:
    out = _shards(tmp_path, per_class=4)
    shard = out / "train" / "shard-000000.tar"
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    cut = members[4].offset  # the header of the third sample: two whole samples remain
    shard.write_bytes(shard.read_bytes()[:cut])
    with tarfile.open(shard) as tf:
        assert len(tf.getmembers()) == 4  # what a plain tar reader silently sees
    _every_reader_refuses(out, "without the end-of-archive")


@pytest.mark.parametrize("how", ["whole", "tail"])
def test_a_zero_filled_shard_is_refused(tmp_path: Path, how: str) -> None:
    out = _shards(tmp_path, per_class=4)
    shard = out / "train" / "shard-000000.tar"
    raw = shard.read_bytes()
    with tarfile.open(shard) as tf:
        keep = tf.getmembers()[4].offset if how == "tail" else 0
    shard.write_bytes(raw[:keep] + bytes(len(raw) - keep))
    _every_reader_refuses(out, "zero-filled")


def test_a_label_outside_classes_txt_is_refused(tmp_path: Path) -> None:
    out = _shards(tmp_path, per_class=4)
    (out / "train" / "classes.txt").write_text("only\n")  # labels 0 and 1, one class name
    _every_reader_refuses(out, "class index 1.*classes.txt")


# ----- a stray .tar in an image folder ---------------------------------------------------------
@pytest.mark.parametrize("where", ["train", "root"])
def test_a_tar_in_an_image_folder_neither_turns_it_into_shards_nor_hides_its_images(
        tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture) -> None:
    data = make_image_folder(tmp_path / "data", per_class=4, size=16)
    folder = data / "train"
    root = data if where == "train" else folder
    with tarfile.open(folder / "backup.tar", "w") as tf:
        tf.add(folder / "class_0" / "000.png", "000.png")
    with caplog.at_level(logging.INFO):
        splits = find_dataset(root)
    assert not isinstance(splits.train, ShardSource)
    assert len(splits.train) == 8 and splits.train.labeled
    assert "backup.tar" in caplog.text and "ignored" in caplog.text
