"""Tar shards (moco.data.shards, moco.data.shard_loader, moco.data.shard_writer): writing, reading, every
sample exactly once per epoch across 2 ranks x 2 workers, exact resume, bad files as in a
folder, and every command reading them."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    TINY_FLAGS,
    _mode_image,
    _real_step,
    assert_same_final_state,
    final_state,
    make_cfg,
    make_image_folder,
    run_cli,
    sigterm_after,
    train,
    write_broken,
)
from PIL import Image

import moco.engine.loop as train_mod
from moco.data.input_settings import InputSettings
from moco.data.shard_loader import ShardTrainLoader, buffer_shuffle
from moco.data.shard_writer import parse_size, sample_key, unique_keys, write_shards
from moco.data.shards import ShardSource, split_key
from moco.data.source import DataError, open_rgb
from moco.data.splits import find_dataset
from moco.engine.config import MocoConfig

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def shards_of(tmp_path: Path, per_class: int = 8, size: str = "25KB", **kw: int) -> tuple[Path, Path]:
    data = make_image_folder(tmp_path / "data", per_class=per_class, **kw)  # type: ignore[arg-type]
    out = tmp_path / "shards"
    write_shards(data, out, parse_size(size), progress=False)
    return data, out


def test_sizes_are_parsed() -> None:
    assert parse_size("100KB") == 100_000 and parse_size("64MB") == 64_000_000
    assert parse_size("1GB") == 10**9 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5gb") == 1_500_000_000 and parse_size("4096") == 4096
    for bad in ("", "1XB", "GB", "-1GB", "0KB"):
        with pytest.raises(DataError, match="size"):
            parse_size(bad)


def test_keys_follow_webdataset() -> None:
    assert split_key("a/b/n01_1.jpg") == ("a/b/n01_1", "jpg")
    assert split_key("x.seg.png") == ("x", "seg.png") and split_key("y.CLS") == ("y", "cls")
    assert sample_key("c/img.v2.JPEG") == "c/img_v2"
    assert unique_keys(["c/a.jpg", "c/a.png", "c/a_png.jpg", "c/a.PNG"]) == [
        "c/a", "c/a_png", "c/a_png_jpg", "c/a_png_1"]


def test_written_layout_is_deterministic_and_sized(tmp_path: Path) -> None:
    data, out = shards_of(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
    shards = sorted((out / "train").glob("*.tar"))
    assert len(shards) > 2 and all(p.stat().st_size <= 25000 for p in shards)
    with tarfile.open(shards[0]) as tf:
        names = tf.getnames()
    assert names[0].endswith(".png") and names[1] == names[0][:-4] + ".cls"
    assert (out / "train" / "classes.txt").read_text().split() == ["class_0", "class_1"]
    again = tmp_path / "again"
    write_shards(data, again, parse_size("25KB"), progress=False)
    for a in shards:
        assert a.read_bytes() == (again / "train" / a.name).read_bytes()
    with pytest.raises(DataError, match="already holds"):
        write_shards(data, again, parse_size("25KB"), progress=False)
    (again / "train" / "notes.txt").write_text("the user's")
    write_shards(data, again, parse_size("25KB"), overwrite=True, progress=False)
    assert [p.read_bytes() for p in shards] == [p.read_bytes() for p in
                                                sorted((again / "train").glob("*.tar"))]
    assert (again / "train" / "notes.txt").read_text() == "the user's"
    with pytest.raises(DataError, match="inside the data folder"):
        write_shards(data, data / "out", parse_size("25KB"), progress=False)
    rc, stdout, _ = run_cli(["shard", str(data), str(tmp_path / "cli"), "--shard-size", "1MB",
                             "--no-progress"])
    assert rc == 0 and "train: 16 images" in stdout and "1 shard(s)" in stdout


def test_a_shard_folder_is_a_dataset_like_its_folder(tmp_path: Path) -> None:
    data, out = shards_of(tmp_path)
    folder, shards = find_dataset(data), find_dataset(out)
    assert isinstance(shards.train, ShardSource) and isinstance(shards.test, ShardSource)
    assert shards.train.classes == folder.train.classes and len(shards.train) == len(folder.train)
    rels = [str(f.relative_to(data / "train")) for f in folder.train.files or []]
    by_key = {k: (f, y) for k, f, y in zip(unique_keys(rels), folder.train.files or [],
                                            folder.train.labels or [], strict=True)}
    for i in range(len(shards.train)):
        name = shards.train.sample_name(i).split(":", 1)[1]
        f, y = by_key[name.rsplit(".", 1)[0]]
        assert shards.train.labels is not None and shards.train.labels[i] == y
        assert np.array_equal(np.asarray(shards.train.load(i)), np.asarray(open_rgb(f)))
    only = find_dataset(out / "train")  # a plain folder of shards: the training split
    assert len(only.train) == 16 and only.test is None


def test_buffer_shuffle_is_a_local_permutation() -> None:
    g = torch.Generator().manual_seed(0)
    out = buffer_shuffle(1000, 50, g)
    assert sorted(out.tolist()) == list(range(1000))
    assert (out <= np.arange(1000) + 49).all()  # output t was read by t + k - 1
    assert np.array_equal(buffer_shuffle(10, 1, g), np.arange(10))
    assert abs(np.corrcoef(out, np.arange(1000))[0, 1]) < 0.999  # it does shuffle


def _epoch_indices(loader: ShardTrainLoader, epoch: int, start: int = 0) -> list[torch.Tensor]:
    return [b.index for b in loader.batches(epoch, start)]


def cfg(**kw: object) -> InputSettings:
    base: dict[str, object] = {"batch_size": 2, "image_size": 16, "aug": "v2", "seed": 5,
                               "channels_last": False, "shuffle_buffer": 4}
    base.update(kw)
    return MocoConfig(**base).input_settings()  # type: ignore[arg-type]


def test_every_sample_exactly_once_per_epoch_across_2_ranks_x_2_workers(tmp_path: Path) -> None:
    _, out = shards_of(tmp_path, per_class=16, size="21KB")  # 32 samples = 2 x 2 x 8
    src = find_dataset(out).train
    assert isinstance(src, ShardSource) and len(src.index.shards) >= 4
    epochs = []
    for epoch in (0, 1):
        seen: list[int] = []
        for rank in range(2):
            loader = ShardTrainLoader(cfg(), src, CPU, 2, rank, 2)
            steps = _epoch_indices(loader, epoch)
            assert len(steps) == loader.steps() == 8
            seen += torch.cat(steps).tolist()
        assert sorted(seen) == list(range(32))
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    # 30 samples: 7 global steps of 2 x 2, as the folder loaders; 2 are left this epoch
    sub = src.subset(list(range(30)))
    loader = ShardTrainLoader(cfg(), sub, CPU, 2, 0, 2)
    got = torch.cat(_epoch_indices(loader, 0)).tolist() + torch.cat(
        _epoch_indices(ShardTrainLoader(cfg(), sub, CPU, 2, 1, 2), 0)).tolist()
    assert len(got) == len(set(got)) == 28


def test_each_reader_reads_its_shards_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a buffer of one, a reader's samples come in the order of its part of the stream:
    whole shards, members in order (sequential reads)."""
    _, out = shards_of(tmp_path, per_class=16, size="21KB")
    src = find_dataset(out).train
    assert isinstance(src, ShardSource)
    idx = torch.cat(_epoch_indices(ShardTrainLoader(cfg(shuffle_buffer=1), src, CPU, 0), 0))
    pos = src.table[idx.numpy()][:, :2]  # (shard, offset)
    runs = np.flatnonzero(np.diff(pos[:, 0]) != 0)
    assert len(runs) == len(np.unique(pos[:, 0])) - 1  # each shard read in one run
    same = np.diff(pos[:, 0]) == 0
    assert (np.diff(pos[:, 1])[same] > 0).all()  # forward within a shard


@pytest.mark.parametrize("start", [1, 2, 5])
def test_resume_mid_epoch_is_exact(tmp_path: Path, start: int) -> None:
    _, out = shards_of(tmp_path, per_class=16, size="21KB")
    src = find_dataset(out).train
    assert isinstance(src, ShardSource)
    full = list(ShardTrainLoader(cfg(), src, CPU, 2).batches(1))
    loader = ShardTrainLoader(cfg(), src, CPU, 3)  # -j changed: the run's layout wins
    loader.load_state_dict(ShardTrainLoader(cfg(), src, CPU, 2).state_dict(), start)
    assert loader.steps() == len(full)
    rest = list(loader.batches(1, start))
    assert len(rest) == len(full) - start
    for a, b in zip(full[start:], rest, strict=True):
        assert torch.equal(a.index, b.index)
        assert torch.equal(a.im_q, b.im_q) and torch.equal(a.im_k, b.im_k)
    assert loader.readers == 2  # and the next epochs too: the run's layout
    other = ShardTrainLoader(cfg(), src, CPU, 2, 0, 2)
    with pytest.raises(DataError, match="another process count.*same data and process count"):
        other.load_state_dict(ShardTrainLoader(cfg(), src, CPU, 2).state_dict(), start)


def test_pretrain_on_shards_stopped_and_resumed_is_bit_exact(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """moco pretrain OUT: SIGTERM mid-epoch, --resume auto: the same final state as the
    uninterrupted run (the shard position is in the checkpoint)."""
    _, out = shards_of(tmp_path, per_class=16, size="21KB")
    extra = ("--knn-every", "0", "--epochs", "2", "--workers", "2", "--shuffle-buffer", "5")
    train(make_cfg(out, tmp_path / "ref", *extra))
    sigterm_after(monkeypatch, 3)
    r1 = train(make_cfg(out, tmp_path / "run", *extra))
    assert r1.stopped_early
    saved = torch.load(r1.checkpoint, weights_only=True)["moco"]["loader"]
    assert saved["kind"] == "shards" and saved["readers"] == 2
    monkeypatch.setattr(train_mod, "train_step", _real_step)
    train(make_cfg(out, tmp_path / "run", *extra[:-4], "--workers", "1", "--shuffle-buffer", "5",
                   "--resume", "auto"))
    assert_same_final_state(final_state(tmp_path / "ref"), final_state(tmp_path / "run"))


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_bad_files_have_the_folders_outcome(tmp_path: Path, policy: str) -> None:
    """A truncated PNG, a truncated JPEG and a text file named .jpg, written into shards:
    stop names the sample and the fix, skip replaces and counts them (3), as from the folder."""
    data = make_image_folder(tmp_path / "d", per_class=8, splits=("train", "test"))
    write_broken(data / "train" / "class_1")
    for p in sorted((data / "train" / "class_0").glob("*.png"))[:3]:
        p.unlink()
    out = tmp_path / "shards"
    write_shards(data, out, parse_size("1MB"), progress=False)
    results = {}
    for name, where in (("folder", data), ("shards", out)):
        rc, stdout, err = run_cli(["pretrain", str(where), *TINY_FLAGS, "--output",
                                   str(tmp_path / f"run-{name}"), "--epochs", "1", "--moco-k", "16",
                                   "--on-bad-image", policy, "--crops", "original"])
        results[name] = (rc, stdout, err)
    for name, (rc, stdout, err) in results.items():
        if policy == "stop":
            assert rc == 2 and "--on-bad-image skip" in err, (name, err)
            assert any(b in err for b in ("trunc.png", "trunc.jpg", "notes.jpg")), (name, err)
            assert "Traceback" not in err
        else:
            assert rc == 0, (name, err)
            rec = json.loads((tmp_path / f"run-{name}" / "metrics.jsonl").read_text().splitlines()[-1])
            assert rec["bad_images"] == 3, name
            assert "3 unreadable image(s) replaced" in stdout
    if policy == "stop":
        assert "shard-000000.tar:class_1/" in results["shards"][2]


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_odd_modes_read_the_same_from_a_shard(tmp_path: Path, mode: str) -> None:
    d = tmp_path / "d" / "train" / "a"
    d.mkdir(parents=True)
    path = _mode_image(mode, d / "img")
    write_shards(tmp_path / "d", tmp_path / "s", parse_size("1MB"), progress=False)
    src = find_dataset(tmp_path / "s").train
    assert np.array_equal(np.asarray(src.load(0)), np.asarray(open_rgb(path)))


def test_knn_lincls_embed_read_shards(tmp_path: Path, r18_tiny_checkpoint: Path) -> None:
    data, out = shards_of(tmp_path, size="1MB")
    ckpt = r18_tiny_checkpoint
    res = {}
    for where in (data, out):
        rc, stdout, err = run_cli(["knn", str(where), "--pretrained", str(ckpt), "--k", "5",
                                   "--workers", "0", "--no-progress", "--json",
                                   str(tmp_path / f"{where.name}.json")])
        assert rc == 0, err
        res[where.name] = json.loads((tmp_path / f"{where.name}.json").read_text())
    assert res["shards"]["top1"] == res["data"]["top1"]
    assert res["shards"]["bank_size"] == 16
    rc, _, err = run_cli(["lincls", str(out), "--pretrained", str(ckpt), "--fast", "--epochs", "2",
                          "--workers", "0", "--no-progress", "--output", str(tmp_path / "lin")])
    assert rc == 0, err
    rc, stdout, err = run_cli(["embed", str(out / "train"), "--pretrained", str(ckpt), "--out",
                               str(tmp_path / "e.npy"), "--workers", "0", "--no-progress"])
    assert rc == 0, err
    assert np.load(tmp_path / "e.npy").shape[0] == 16
    files = json.loads((tmp_path / "e.npy.json").read_text())["files"]
    assert files[0].startswith("shard-000000.tar:")


@pytest.fixture
def r18_tiny_checkpoint(tmp_path: Path) -> Path:
    data = make_image_folder(tmp_path / "ckdata", per_class=4)
    rc, _, err = run_cli(["pretrain", str(data), *TINY_FLAGS, "--output", str(tmp_path / "ck"),
                          "--epochs", "1", "--knn-every", "0"])
    assert rc == 0, err
    ckpt = sorted((tmp_path / "ck").glob("checkpoint_*.pth.tar"))[-1]
    Image.new("RGB", (1, 1)).save(tmp_path / "unused.png")
    return ckpt


def test_webdataset_reads_ours_and_we_read_its(tmp_path: Path) -> None:
    """The layout is WebDataset's: its reader gets our samples (keys, pixels, labels) and its
    ShardWriter's output is a dataset here. Runs where the webdataset package is installed
    (it is not a dependency)."""
    import io

    wds = pytest.importorskip("webdataset")
    _, out = shards_of(tmp_path)
    urls = sorted(str(p) for p in (out / "train").glob("*.tar"))
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "png", "cls")
    got = {k: (np.asarray(img.convert("RGB")), int(c)) for k, img, c in ds}
    src = find_dataset(out).train
    assert len(got) == len(src) == 16 and src.labels is not None
    for i in range(len(src)):
        arr, label = got[src.sample_name(i).split(":", 1)[1].rsplit(".", 1)[0]]
        assert label == src.labels[i] and np.array_equal(arr, np.asarray(src.load(i)))
    (tmp_path / "wds").mkdir()
    with wds.ShardWriter(str(tmp_path / "wds" / "part-%06d.tar"), maxcount=5) as w:
        for k in range(12):
            b = io.BytesIO()
            Image.new("RGB", (20 + k, 10), (k, 2 * k, 3)).save(b, "JPEG")
            w.write({"__key__": f"s{k:04d}", "jpg": b.getvalue(), "cls": str(k % 3).encode()})
    theirs = find_dataset(tmp_path / "wds").train
    assert len(theirs) == 12 and sorted(theirs.labels or []) == sorted(k % 3 for k in range(12))


def test_a_full_disk_while_sharding_is_one_line_and_leaves_no_partial_shard(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    data = make_image_folder(tmp_path / "data", per_class=8)
    real = tarfile.TarFile.addfile
    calls = {"n": 0}

    def addfile(self: tarfile.TarFile, *a: object, **k: object) -> None:
        calls["n"] += 1
        if calls["n"] == 9:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    rc, _, err = run_cli(["shard", str(data), str(tmp_path / "out"), "--shard-size", "25KB",
                          "--no-progress"])
    assert rc == 2 and "No space left on device" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "train").exists()  # no split that looks whole
    rc, _, err = run_cli(["shard", str(data), str(tmp_path / "out"), "--shard-size", "25KB",
                          "--no-progress"])  # the disk has room again: written from scratch
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test", "train"]
    assert len(find_dataset(tmp_path / "out").train) == 16
