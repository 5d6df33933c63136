"""Datasets, image modes, CIFAR python folders, subsets and the epoch batch sampler."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_image_folder
from PIL import Image

from moco.data.augment import TwoViews, pretrain_transform
from moco.data.datasets import EpochBatchSampler, TwoViewDataset, class_balanced_subset
from moco.data.folders import image_folder
from moco.data.source import DataError, open_rgb, to_rgb
from moco.data.splits import find_dataset
from moco.engine.config import IMAGENET_MEAN, IMAGENET_STD

# ----- folders ------------------------------------------------------------------------------


def test_image_folder_labeled(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=3, per_class=4, size=20)
    (root / "train" / ".hidden").mkdir()
    (root / "train" / "class_1" / "notes.txt").write_text("not an image")
    splits = find_dataset(root)
    tr = splits.train
    assert tr.labeled and len(tr) == 12
    assert tr.classes == ["class_0", "class_1", "class_2"]
    assert tr.labels == [0] * 4 + [1] * 4 + [2] * 4
    assert tr.files is not None
    assert all(f.parent.name == f"class_{y}" for f, y in zip(tr.files, tr.labels, strict=True))
    img = tr.load(5)
    assert img.mode == "RGB" and img.size == (20, 20)
    assert splits.test is not None and splits.test.labeled and len(splits.test) == 12


def test_val_preferred_over_test_and_test_optional(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=2, per_class=2, splits=("train", "val", "test"))
    (root / "val" / "class_1" / "000.png").unlink()
    splits = find_dataset(root)
    assert splits.test is not None and len(splits.test) == 3
    root2 = make_image_folder(tmp_path / "e", classes=2, per_class=2, splits=("train",))
    assert find_dataset(root2).test is None


def test_flat_unlabeled_train(tmp_path: Path) -> None:
    train = tmp_path / "d" / "train"
    train.mkdir(parents=True)
    for i in range(5):
        Image.fromarray(np.full((8, 8, 3), i * 10, np.uint8)).save(train / f"{i}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(train / "x.JPG")
    splits = find_dataset(tmp_path / "d")
    assert not splits.train.labeled
    assert splits.train.labels is None
    assert len(splits.train) == 6
    assert splits.test is None
    assert splits.train.load(2).mode == "RGB"


def test_missing_or_empty_data_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        find_dataset(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="train/"):
        find_dataset(tmp_path / "d")
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        find_dataset(tmp_path / "d")
    with pytest.raises(DataError):
        find_dataset("")
    assert issubclass(DataError, ValueError)


def test_a_data_symlink_loop_or_dangling_link_is_named(tmp_path: Path) -> None:
    from helpers import run_cli

    loop, dangling = tmp_path / "loop", tmp_path / "dangling"
    loop.symlink_to(loop)
    dangling.symlink_to(tmp_path / "gone")
    with pytest.raises(DataError, match="symbolic link loop"):
        find_dataset(loop)
    with pytest.raises(DataError, match="symbolic link to .*gone, which does not exist"):
        find_dataset(dangling)
    rc, _, err = run_cli(["shard", str(loop), str(tmp_path / "out"), "--no-progress"])
    assert rc == 2 and "symbolic link loop" in err and "Traceback" not in err


# ----- CIFAR python folders ------------------------------------------------------------------

def _write_cifar10(root: Path, per_batch: int = 3) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """torchvision's cifar-10-batches-py: pickled dicts (protocol 2, as the real files) with
    'data' uint8 [N, 3072] (R plane, G plane, B plane, row-major) and 'labels' list."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    all_data, all_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=per_batch)]
        entry = {"batch_label": f"training batch of {name}", "labels": labels, "data": data,
                 "filenames": [f"img_{i}.png" for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        all_data.append(data)
        all_labels.append(labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                     "frog", "horse", "ship", "truck"]}, f, protocol=2)
    train = np.concatenate(all_data[:5])
    train_labels = sum(all_labels[:5], [])
    return train, train_labels, all_data[5], all_labels[5]


@pytest.mark.parametrize("point_at_inner", [False, True])
def test_cifar10_python_folder(tmp_path: Path, point_at_inner: bool) -> None:
    train, train_labels, test, test_labels = _write_cifar10(tmp_path)
    splits = find_dataset(tmp_path / "cifar-10-batches-py" if point_at_inner else tmp_path)
    tr, te = splits.train, splits.test
    assert te is not None
    assert len(tr) == 15 and len(te) == 3
    assert tr.labels == train_labels and te.labels == test_labels
    assert tr.labeled and len(tr.classes) == 10
    for i in (0, 7, 14):
        img = tr.load(i)
        assert img.mode == "RGB" and img.size == (32, 32)
        arr = np.asarray(img)
        planes = train[i].reshape(3, 32, 32)  # channel-planar, row-major
        for c in range(3):
            assert np.array_equal(arr[:, :, c], planes[c])
    assert np.array_equal(np.asarray(te.load(2)), test[2].reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar_malicious_pickle_refused(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.mkdir, (str(marker),))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match="refusing"):
        find_dataset(tmp_path)
    assert not marker.exists()


def test_cifar_corrupt_batch_clear_error(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="test_batch"):
        find_dataset(tmp_path)


# ----- image modes ------------------------------------------------------------------------------

def _rgb(img: Image.Image) -> np.ndarray:
    out = to_rgb(img)
    assert out.mode == "RGB"
    assert out.size == img.size
    return np.asarray(out)


def test_mode_l_and_la() -> None:
    arr = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    out = _rgb(Image.fromarray(arr, "L"))
    assert all(np.array_equal(out[:, :, c], arr) for c in range(3))
    la = Image.fromarray(np.stack([arr, np.zeros_like(arr)], axis=-1), "LA")
    out = _rgb(la)
    assert np.array_equal(out[:, :, 0], arr)  # alpha dropped, not composited


def test_mode_rgba() -> None:
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2], arr[..., 3] = 10, 20, 30, 0
    out = _rgb(Image.fromarray(arr, "RGBA"))
    assert out[0, 0].tolist() == [10, 20, 30]


def test_mode_p_with_and_without_transparency() -> None:
    p = Image.new("P", (2, 2))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 1), 1)
    out = _rgb(p)
    assert out[0, 0].tolist() == [255, 0, 0] and out[1, 1].tolist() == [0, 0, 255]
    p.info["transparency"] = 0
    out = _rgb(p)
    assert out[0, 0].tolist() == [255, 0, 0] and out[1, 1].tolist() == [0, 0, 255]


def test_mode_cmyk() -> None:
    out = _rgb(Image.new("CMYK", (2, 2), (0, 255, 0, 0)))  # magenta
    assert out[0, 0].tolist() == [255, 0, 255]


def test_mode_16_bit_not_clipped_to_white(tmp_path: Path) -> None:
    arr = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = _rgb(img)
    assert out[:, :, 0].tolist() == [[0, 64], [128, 255]]
    assert np.array_equal(out[:, :, 0], out[:, :, 2])
    # Through a 16-bit PNG file (whatever mode Pillow opens it in).
    img.save(tmp_path / "g16.png")
    out = np.asarray(open_rgb(tmp_path / "g16.png"))
    assert out[:, :, 0].tolist() == [[0, 64], [128, 255]]
    # A dark 16-bit image is not white either.
    dark = Image.fromarray(np.full((3, 3), 3000, np.uint16))
    assert int(_rgb(dark).max()) < 20


def test_open_rgb_bad_files(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="x.png"):
        open_rgb(tmp_path / "x.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.jpg"):
        open_rgb(tmp_path / "t.jpg")


def test_image_folder_converts_modes(tmp_path: Path) -> None:
    d = tmp_path / "train" / "c"
    d.mkdir(parents=True)
    Image.fromarray(np.full((4, 4), 7, np.uint8), "L").save(d / "l.png")
    Image.fromarray(np.full((4, 4, 4), 9, np.uint8), "RGBA").save(d / "rgba.png")
    src = image_folder(tmp_path / "train")
    assert all(src.load(i).mode == "RGB" for i in range(len(src)))


# ----- subsets and sampler ----------------------------------------------------------------------

def test_class_balanced_subset_counts() -> None:
    labels = [i % 3 for i in range(30)]  # 10 per class
    for n, counts in ((9, [3, 3, 3]), (7, [3, 2, 2]), (30, [10, 10, 10]), (1, [1, 0, 0])):
        idx = class_balanced_subset(labels, n, seed=0)
        assert len(idx) == n == len(set(idx))
        assert idx == sorted(idx)
        assert [sum(labels[i] == c for i in idx) for c in range(3)] == counts
    assert class_balanced_subset(labels, 9, seed=1) == class_balanced_subset(labels, 9, seed=1)
    assert class_balanced_subset(labels, 9, seed=1) != class_balanced_subset(labels, 9, seed=2)


def test_class_balanced_subset_small_class() -> None:
    """A class with fewer images than its share gives all it has; the rest is spread over the
    other classes so that the subset still has n images."""
    labels = [0] * 2 + [1] * 10 + [2] * 10
    idx = class_balanced_subset(labels, 12, seed=0)
    assert len(idx) == 12 == len(set(idx))
    assert [sum(labels[i] == c for i in idx) for c in range(3)] == [2, 5, 5]
    assert len(class_balanced_subset(labels, 100, seed=0)) == 22


def _batches(n: int, b: int, seed: int = 0, epoch: int = 0, start: int = 0, rank: int = 0,
             world: int = 1) -> list[list[tuple[int, int]]]:
    return list(EpochBatchSampler(n, b, seed, epoch, start, rank, world))


def test_sampler_deterministic_and_epoch_dependent() -> None:
    a = _batches(20, 4, seed=3, epoch=1)
    assert a == _batches(20, 4, seed=3, epoch=1)
    assert a != _batches(20, 4, seed=3, epoch=2)
    assert a != _batches(20, 4, seed=4, epoch=1)
    idx = [i for batch in a for i, _ in batch]
    assert sorted(idx) == list(range(20))  # a permutation
    assert idx != list(range(20))  # shuffled
    seeds = [s for batch in a for _, s in batch]
    assert len(set(seeds)) == 20  # one augmentation seed per position


def test_sampler_drop_last() -> None:
    s = EpochBatchSampler(10, 4, 0, 0)
    assert s.steps() == 2 == len(s)
    batches = list(s)
    assert len(batches) == 2 and all(len(b) == 4 for b in batches)
    idx = [i for b in batches for i, _ in b]
    assert len(set(idx)) == 8


def test_sampler_start_step() -> None:
    full = _batches(24, 4, seed=1, epoch=5)
    assert len(full) == 6
    s = EpochBatchSampler(24, 4, 1, 5, start_step=4)
    assert len(s) == 2 and s.steps() == 6
    assert list(s) == full[4:]
    assert _batches(24, 4, seed=1, epoch=5, start=6) == []


def test_sampler_world_size_2_concatenates_to_world_size_1() -> None:
    n, b = 37, 3
    single = _batches(n, 2 * b, seed=7, epoch=2)
    r0 = _batches(n, b, seed=7, epoch=2, rank=0, world=2)
    r1 = _batches(n, b, seed=7, epoch=2, rank=1, world=2)
    assert len(single) == len(r0) == len(r1) == n // (2 * b)
    for s, a, c in zip(single, r0, r1, strict=True):
        assert a + c == s
    # Resuming mid-epoch on 2 ranks gives the same tail.
    assert _batches(n, b, seed=7, epoch=2, start=3, rank=1, world=2) == r1[3:]


def test_sampler_too_few_images() -> None:
    with pytest.raises(DataError, match="batch"):
        EpochBatchSampler(5, 4, 0, 0, world_size=2)


def test_two_view_dataset_seeded(tmp_path: Path) -> None:
    src = find_dataset(make_image_folder(tmp_path / "d", classes=1, per_class=3)).train
    ds = TwoViewDataset(src, TwoViews(pretrain_transform("v2", 16, 0.2, IMAGENET_MEAN, IMAGENET_STD)))
    q1, k1 = ds[(1, 99)]
    q2, k2 = ds[(1, 99)]
    assert torch.equal(q1, q2) and torch.equal(k1, k2)
    assert q1.shape == (3, 16, 16) and not torch.equal(q1, k1)
