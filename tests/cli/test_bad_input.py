"""Bad input, each with a clear error (exit code 2, the problem and the fix on stderr, no
traceback) or a documented policy: docs/reliability.md has the table these tests check."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from helpers import TINY_FLAGS, _mode_image, make_image_folder, run_cli, write_broken
from PIL import Image
from torch._utils import ExceptionWrapper

from moco.cli import build_parser
from moco.cli.pretrain import config_from_args
from moco.data.augment import TwoViews, eval_transform, pretrain_transform
from moco.data.datasets import EvalDataset
from moco.data.folders import image_folder
from moco.data.source import DataError, ImageSource, load_checked, open_rgb, scan_images
from moco.engine.loop import Pretrainer
from moco.utils.checkpoint import atomic_save

pytestmark = pytest.mark.usefixtures("one_thread")


def pretrain_error(data: Path, out: Path, *extra: str, touches: bool = False) -> str:
    """Run ``moco pretrain`` expecting a user error: exit 2, one clean message, and (unless
    ``touches``: errors found once the run has started) no run folder left behind."""
    existed = out.exists() or touches
    rc, _, err = run_cli(["pretrain", str(data), *TINY_FLAGS, "--output", str(out),
                      "--knn-every", "0", *extra])
    assert rc == 2, err
    assert "Traceback" not in err, err
    err = err.strip().splitlines()[-1]  # (progress lines may come first)
    assert err.startswith("moco pretrain: error: "), err
    assert out.exists() == existed or touches, "the run folder was touched before the inputs were checked"
    return err


def loader_flags(tmp_path: Path, loader: str) -> list[str]:
    """``--loader`` through a config file (works whether or not the flag exists)."""
    path = tmp_path / f"loader-{loader}.yaml"
    path.write_text(f"loader: {loader}\n")
    return ["--config", str(path)]


# ----- the data folder -------------------------------------------------------------------------

def test_data_folder_missing(tmp_path: Path) -> None:
    err = pretrain_error(tmp_path / "nope", tmp_path / "run")
    assert "does not exist" in err


def test_data_folder_empty(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    err = pretrain_error(tmp_path / "d", tmp_path / "run")
    assert "no train/ folder" in err and "ImageFolder" in err


def test_data_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "d" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "d" / "train" / "cat" / "readme.txt").write_text("x")
    (tmp_path / "d" / "train" / "cat" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS
    err = pretrain_error(tmp_path / "d", tmp_path / "run")
    assert "no images found" in err and ".jpg" in err


# ----- unreadable image files ------------------------------------------------------------------

@pytest.mark.parametrize("loader", ["pil", "tensor"])
def test_unreadable_images_stop_by_default(tmp_path: Path, loader: str) -> None:
    """pil finds a broken file when it draws it (the steps done are saved first); tensor when
    it decodes the dataset into its cache, before the run folder is touched."""
    data = make_image_folder(tmp_path / "d", per_class=8, splits=("train",))
    broken = write_broken(data / "train" / "class_1")
    err = pretrain_error(data, tmp_path / "run", "--epochs", "1", "--moco-k", "16",
                         *loader_flags(tmp_path, loader), touches=loader == "pil")
    assert any(str(p) in err for p in broken), err
    assert "--on-bad-image skip" in err


@pytest.mark.parametrize("loader", ["pil", "tensor"])
def test_unreadable_images_skip_counts_and_reports(tmp_path: Path, loader: str) -> None:
    """16 training images, 3 broken: each broken one is replaced by the next readable image,
    and metrics.jsonl and the log report 3 (kNN uses the same policy)."""
    data = make_image_folder(tmp_path / "d", per_class=8, splits=("train", "test"))
    write_broken(data / "train" / "class_1")
    for p in sorted((data / "train" / "class_0").glob("*.png"))[:3]:
        p.unlink()  # keep 16 images in train/, so every one is drawn in the epoch
    rc, out, err = run_cli(["pretrain", str(data), *TINY_FLAGS, "--output", str(tmp_path / "run"),
                        "--epochs", "1", "--moco-k", "16", "--on-bad-image", "skip",
                        *loader_flags(tmp_path, loader)])
    assert rc == 0, err
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["bad_images"] == 3
    assert "3 unreadable image(s) replaced" in out


def test_skip_replaces_deterministically(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in (0, 3, 4):
        Image.new("RGB", (4, 4), (i, i, i)).save(folder / f"{i}.png")
    for i in (1, 2):
        (folder / f"{i}.png").write_bytes(b"broken")
    src = image_folder(folder)
    assert [load_checked(src, i, "skip")[1] for i in range(5)] == [0, 3, 3, 3, 4]
    assert load_checked(src, 1, "skip")[0].getpixel((0, 0)) == (3, 3, 3)
    with pytest.raises(DataError, match=r"1\.png.*--on-bad-image skip"):
        load_checked(src, 1, "stop")
    scan = scan_images(src, "skip")
    assert scan.good == [0, 3, 4] and sorted(scan.bad) == [1, 2] and scan.bad_count == 2
    with pytest.raises(DataError, match="1.png"):
        scan_images(src, "stop")
    for i in (0, 3, 4):
        (folder / f"{i}.png").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 5 images"):
        load_checked(image_folder(folder), 0, "skip")


def test_error_from_a_dataloader_worker_is_clean() -> None:
    """torch re-raises a worker's DataError with the worker's traceback as its message (as
    ``ExceptionWrapper.reraise`` does); the user still sees one line naming the file."""
    try:
        raise DataError("cannot read image /d/b.png: broken data stream")
    except DataError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as e:
        wrapper.reraise()
    assert "Original Traceback" in e.value.args[0]  # what torch makes of it
    assert str(e.value) == "cannot read image /d/b.png: broken data stream"
    assert str(DataError("plain message")) == "plain message"


# ----- image sizes and modes -------------------------------------------------------------------

@pytest.mark.parametrize("size", [(1, 1), (5, 3), (8, 8), (31, 200)])
def test_images_smaller_than_the_crop_are_upsampled(size: tuple[int, int]) -> None:
    img = Image.new("RGB", size, (200, 30, 60))
    mean, std = [0.5] * 3, [0.25] * 3
    for aug in ("v1", "v2", "cifar-demo"):
        q, k = TwoViews(pretrain_transform(aug, 32, 0.2, mean, std))(img, 7)
        assert q.shape == k.shape == (3, 32, 32) and torch.isfinite(q).all()
    x, _ = EvalDataset(ImageSource(array=np.asarray(img)[None]), eval_transform(32, mean, std))[0]
    assert x.shape == (3, 32, 32)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "P+transparency", "RGBA", "CMYK", "I;16",
                                  "I", "F"])
def test_odd_modes_become_8_bit_rgb(mode: str, tmp_path: Path) -> None:
    path = _mode_image(mode, tmp_path / "img")
    img = open_rgb(path)
    assert img.mode == "RGB" and img.size == (16, 16)
    q, _ = TwoViews(pretrain_transform("v2", 32, 0.2, [0.5] * 3, [0.25] * 3))(img, 0)
    assert q.shape == (3, 32, 32) and torch.isfinite(q).all()
    if mode in ("I;16", "I", "F"):  # full range kept, not clipped to white
        assert 0 < np.asarray(img).mean() < 250


# ----- sizes, hyperparameters, architecture ----------------------------------------------------

def test_batch_larger_than_the_dataset(tiny_data: Path, tmp_path: Path) -> None:
    err = pretrain_error(tiny_data, tmp_path / "run", "-b", "64", "--moco-k", "64")
    assert "32 images, fewer than one batch of 64" in err and "--batch-size" in err


def test_queue_smaller_than_the_batch(tiny_data: Path, tmp_path: Path) -> None:
    err = pretrain_error(tiny_data, tmp_path / "run", "-b", "8", "--moco-k", "4")
    assert "--moco-k 4" in err and "raise --moco-k or lower --batch-size" in err


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--moco-m", "1.0", "expected --moco-m in [0, 1), got 1.0 (from the command line)"),
    ("--moco-m", "-0.1", "expected --moco-m in [0, 1), got -0.1"),
    ("--moco-t", "0", "expected --moco-t > 0, got 0"),
    ("--moco-t", "-1", "expected --moco-t > 0, got -1"),
    ("--lr", "-0.1", "expected --lr >= 0, got -0.1"),
    ("--epochs", "0", "expected --epochs >= 1, got 0"),
    ("--moco-dim", "0", "expected --moco-dim >= 1, got 0"),
    ("--bn-splits", "3", "not divisible by --bn-splits 3"),
])
def test_invalid_hyperparameters(tiny_data: Path, tmp_path: Path, flag: str, value: str,
                                 says: str) -> None:
    assert says in pretrain_error(tiny_data, tmp_path / "run", flag, value)


def test_unknown_architecture(tiny_data: Path, tmp_path: Path) -> None:
    err = pretrain_error(tiny_data, tmp_path / "run", "-a", "resnet9000")
    assert "unknown architecture 'resnet9000'" in err and "resnet50" in err


# ----- checkpoints -----------------------------------------------------------------------------

@pytest.fixture
def r18_checkpoint(tiny_data: Path, tmp_path: Path) -> Path:
    """An untrained tiny run's checkpoint (written by the real save path)."""
    args = build_parser().parse_args(["pretrain", str(tiny_data), *TINY_FLAGS, "--output",
                                      str(tmp_path / "src"), "--knn-every", "0"])
    p = Pretrainer(config_from_args(args), log=lambda _m: None, progress=False)
    path = p.save()
    p.runlog.close()
    return path


def test_checkpoint_of_another_architecture(tiny_data: Path, tmp_path: Path,
                                            r18_checkpoint: Path) -> None:
    err = pretrain_error(tiny_data, tmp_path / "run", "--resume", str(r18_checkpoint),
                         "-a", "resnet34", touches=True)
    assert "is a resnet18 checkpoint but --arch is resnet34" in err
    err = pretrain_error(tiny_data, tmp_path / "run2", "--resume", str(r18_checkpoint), "--mlp",
                         touches=True)
    assert "does not match this model" in err and "mlp=True" in err


def test_checkpoint_of_another_format(tiny_data: Path, tmp_path: Path,
                                      r18_checkpoint: Path) -> None:
    tv = tmp_path / "resnet18_imagenet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), tv)
    err = pretrain_error(tiny_data, tmp_path / "a", "--resume", str(tv))
    assert "is a bare backbone state dict" in err and "not a pretraining checkpoint" in err
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    assert "holds a Tensor, not a dict" in pretrain_error(tiny_data, tmp_path / "b", "--resume",
                                                          str(tensor), touches=True)
    text = tmp_path / "notes.pth.tar"
    text.write_text("hello")
    assert "not a readable checkpoint" in pretrain_error(tiny_data, tmp_path / "c", "--resume",
                                                         str(text), touches=True)
    newer = tmp_path / "newer.pth.tar"
    atomic_save({"epoch": 1, "moco": {"format": 99}, "state_dict": {}}, newer)
    assert "newer moco" in pretrain_error(tiny_data, tmp_path / "d", "--resume", str(newer),
                                         touches=True)
    missing = tmp_path / "missing.pth.tar"
    assert "does not exist" in pretrain_error(tiny_data, tmp_path / "e", "--resume",
                                              str(missing), touches=True)


def test_truncated_checkpoint(tiny_data: Path, tmp_path: Path, r18_checkpoint: Path) -> None:
    data = r18_checkpoint.read_bytes()
    cut = tmp_path / "cut.pth.tar"
    cut.write_bytes(data[: len(data) // 2])
    err = pretrain_error(tiny_data, tmp_path / "run", "--resume", str(cut), touches=True)
    assert "not a readable checkpoint (truncated" in err


# ----- the output folder -----------------------------------------------------------------------

def test_unwritable_output_folder(tiny_data: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    err = pretrain_error(tiny_data, blocker / "run")
    assert f"cannot write to the output folder {blocker / 'run'}" in err and "--output" in err
    import os

    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        err = pretrain_error(tiny_data, ro)
        assert "cannot write to the output folder" in err


# ----- images and folders: decompression bombs, unreadable class folders, images beside them ------

def bomb_dataset(root: Path, size: int = 32) -> Path:
    """16 train images (2 classes) and a test split; one train image is twice the size, a
    decompression bomb once PIL's limit is lowered to 1.5 x size^2 pixels (see below)."""
    data = make_image_folder(root, per_class=8, size=size, splits=("train", "test"))
    bomb = data / "train" / "class_1" / "007.png"
    Image.fromarray(np.zeros((2 * size, 2 * size, 3), np.uint8)).save(bomb)
    return bomb


@pytest.mark.parametrize("loader", ["pil", "tensor", "crop"])
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_decompression_bomb_follows_on_bad_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 loader: str, policy: str) -> None:
    """tensor: 32 px images, kept whole in the decoded cache; crop: 48 px images, larger than
    the cache's 37 px short side, cropped from the files at their full size."""
    size = 48 if loader == "crop" else 32
    bomb = bomb_dataset(tmp_path / "d", size)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(1.5 * size * size))
    loader = "tensor" if loader == "crop" else loader
    argv = ["pretrain", str(tmp_path / "d"), *TINY_FLAGS, "--output", str(tmp_path / "run"),
            "--epochs", "1", "--moco-k", "16", "--knn-every", "0", "--on-bad-image", policy,
            *loader_flags(tmp_path, loader)]
    rc, out, err = run_cli(argv)
    assert "Traceback" not in err, err
    if policy == "stop":
        line = err.strip().splitlines()[-1]
        assert rc == 2 and str(bomb) in line and "--on-bad-image skip" in line, err
    else:
        assert rc == 0, err
        rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
        assert rec["bad_images"] == 1


def test_decompression_bomb_in_the_evaluation_commands(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import save_original_checkpoint

    bomb = bomb_dataset(tmp_path / "d")
    ckpt = tmp_path / "m.pth.tar"
    save_original_checkpoint(ckpt, "resnet18", with_optimizer=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    ev = ["-j", "0", "--device", "cpu", "--no-progress", "--image-size", "32"]
    for argv in (["knn", str(tmp_path / "d"), "--pretrained", str(ckpt), *ev],
                 ["embed", str(tmp_path / "d"), "--pretrained", str(ckpt), "--out",
                  str(tmp_path / "e.npy"), *ev]):
        rc, _, err = run_cli(argv)
        assert rc == 2 and "Traceback" not in err and str(bomb) in err, err
    rc, _, err = run_cli(["embed", str(tmp_path / "d"), "--pretrained", str(ckpt), "--out",
                          str(tmp_path / "e.npy"), "--skip-bad", *ev])
    assert rc == 0 and "skipped unreadable image" in err and bomb.name in err, err


def unlistable(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """``folder`` cannot be listed: chmod 000 where that works (not as root), else listing it
    raises what it raises for a folder without read permission."""
    if os.geteuid() != 0:
        folder.chmod(0)
        return
    real_scandir = os.scandir

    def scandir(path: Any = ".") -> Any:
        if isinstance(path, (str, os.PathLike)) and Path(path) == folder:
            raise PermissionError(13, "Permission denied", str(folder))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_unreadable_class_folder_stops_or_is_counted(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    data = make_image_folder(tmp_path / "d", classes=3, per_class=8, splits=("train",))
    bad = data / "train" / "class_2"
    unlistable(monkeypatch, bad)
    try:
        err = pretrain_error(data, tmp_path / "run", "--epochs", "1", "--moco-k", "16")
        assert f"cannot list the folder {bad}: Permission denied" in err
        assert "--on-bad-image skip" in err
        src = image_folder(data / "train", "skip")
        assert src.classes == ["class_0", "class_1", "class_2"]  # labels keep their meaning
        assert len(src) == 16 and src.unreadable_folders == [str(bad)]
        rc, out, err = run_cli(["pretrain", str(data), *TINY_FLAGS, "--output",
                                str(tmp_path / "run"), "--epochs", "1", "--moco-k", "16",
                                "--knn-every", "0", "--on-bad-image", "skip"])
        assert rc == 0, err
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any("left out 1 unreadable folder(s)" in m and str(bad) in m for m in warned)
    finally:
        bad.chmod(0o755)


def test_images_beside_class_folders_are_refused(tmp_path: Path) -> None:
    from helpers import save_original_checkpoint

    data = make_image_folder(tmp_path / "d", per_class=8)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(data / "train" / "stray.png")
    says = "mixes 1 image file(s) (e.g. stray.png) with 2 class folder(s) of images (e.g. class_0/)"
    assert says in pretrain_error(data, tmp_path / "run")
    ckpt = tmp_path / "m.pth.tar"
    save_original_checkpoint(ckpt, "resnet18", with_optimizer=False)
    for argv in (["knn", str(data), "--pretrained", str(ckpt)],
                 ["lincls", str(data), "--pretrained", str(ckpt), "--output",
                  str(tmp_path / "lin")]):
        rc, _, err = run_cli([*argv, "-j", "0", "--device", "cpu", "--no-progress"])
        assert rc == 2 and says in err and "Traceback" not in err, err
    # An empty folder beside the images is no layout: the images are used, unlabeled.
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(flat / "a.png")
    (flat / "empty").mkdir()
    assert not image_folder(flat).labeled and len(image_folder(flat)) == 1


# ----- numbers that are not numbers: NaN and Inf in a checkpoint ----------------------------------

@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A main_moco.py checkpoint whose query encoder has one Inf (a BN running variance)."""
    from helpers import save_original_checkpoint

    path = tmp_path_factory.mktemp("nan") / "diverged.pth.tar"
    save_original_checkpoint(path, "resnet18", with_optimizer=False)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["module.encoder_q.layer2.0.bn1.running_var"][3] = float("inf")
    ckpt["state_dict"]["module.encoder_q.layer3.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(ckpt, path)
    return path


def test_a_checkpoint_with_nan_or_inf_is_refused_by_every_command(poisoned: Path, tiny_data: Path,
                                                                  tmp_path: Path) -> None:
    ev = ["-j", "0", "--device", "cpu", "--no-progress", "--image-size", "32"]
    for argv in (["knn", str(tiny_data), "--pretrained", str(poisoned), *ev],
                 ["embed", str(tiny_data / "test"), "--pretrained", str(poisoned), "--out",
                  str(tmp_path / "e.npy"), *ev],
                 ["export", str(poisoned), "-f", "torchvision", "-o", str(tmp_path / "x.pth")],
                 ["lincls", str(tiny_data), "--pretrained", str(poisoned), "--output",
                  str(tmp_path / "lin"), *ev]):
        rc, out, err = run_cli(argv)
        assert rc == 2 and "Traceback" not in err, (argv[0], err)
        line = err.strip().splitlines()[-1]
        assert "layer2.0.bn1.running_var holds 1 NaN/Inf value(s)" in line, (argv[0], line)
        assert "diverged run" in line and "--lr" not in line.split("(or train again")[0]
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "e.npy").exists()
    err = pretrain_error(tiny_data, tmp_path / "run", "--resume", str(poisoned))
    assert "module.encoder_q.layer2.0.bn1.running_var holds 1 NaN/Inf" in err


# ----- evaluation on data whose classes do not match ----------------------------------------------

def test_monitor_and_knn_share_the_class_check(tmp_path: Path) -> None:
    from helpers import save_original_checkpoint

    data = make_image_folder(tmp_path / "d", per_class=8)
    (data / "test" / "class_1").rename(data / "test" / "class_9")
    err = pretrain_error(data, tmp_path / "run", "--knn-every", "1")
    says = (f"the classes of {data / 'train'} and {data / 'test'} differ (2 vs 2 class folders; "
            f"1 only in {data / 'train'} (e.g. 'class_1'); 1 only in {data / 'test'} (e.g. "
            "'class_9'))")
    assert says in err and "--knn-every 0" in err
    ckpt = tmp_path / "m.pth.tar"
    save_original_checkpoint(ckpt, "resnet18", with_optimizer=False)
    rc, _, err = run_cli(["knn", str(data), "--pretrained", str(ckpt), "-j", "0", "--device",
                          "cpu", "--no-progress"])
    assert rc == 2 and says in err
    # Without the monitor the same data pretrains (the check is the monitor's).
    args = build_parser().parse_args(["pretrain", str(data), *TINY_FLAGS, "--output",
                                      str(tmp_path / "ok"), "--knn-every", "0"])
    p = Pretrainer(config_from_args(args), log=lambda _m: None, progress=False)
    assert p.knn_query is None
    p.close()


def test_the_class_check_is_one_function() -> None:
    import inspect

    import moco.cli.knn as knn_cmd
    import moco.engine.run as run

    assert "knn_splits(" in inspect.getsource(run.find_run_data)
    assert "knn_splits(" in inspect.getsource(knn_cmd.knn_evaluate)


# ----- messages: one line that names the flag or the file and the fix -----------------------------

def test_huge_seed_is_one_line_naming_the_flag(tiny_data: Path, tmp_path: Path) -> None:
    err = pretrain_error(tiny_data, tmp_path / "run", "--seed", str(2**64 + 1))
    assert "expected --seed in [0, 4294967295], got 18446744073709551617" in err
    assert "Overflow" not in err


@pytest.mark.parametrize(("extra", "says"), [
    (["-b", "8", "--bn-splits", "8"], "1 image per group: -b 8 / --bn-splits 8"),
    (["-b", "8", "--bn-splits", "8", "--shuffle-bn", "none"], "1 image per group"),
    (["-b", "8", "--bn-splits", "8", "--mechanism", "end-to-end"], "1 image per group"),
])
def test_too_many_bn_splits_for_the_feature_map(tiny_data: Path, tmp_path: Path,
                                               extra: list[str], says: str) -> None:
    err = pretrain_error(tiny_data, tmp_path / "run", *extra)
    assert says in err and "BatchNorm would normalise 1 value per channel" in err
    assert "--cifar-stem" in err and "Expected more than 1 value" not in err
    # With the CIFAR stem the last feature map is 4x4 at 32 px: 16 values per channel, fine.
    args = build_parser().parse_args(["pretrain", str(tiny_data), *TINY_FLAGS, *extra,
                                      "--cifar-stem", "--output", str(tmp_path / "ok"),
                                      "--knn-every", "0"])
    Pretrainer(config_from_args(args), log=lambda _m: None, progress=False).close()


def test_checkpoint_of_the_wrong_kind_is_named_in_one_short_line(
        tiny_data: Path, tmp_path: Path, r18_checkpoint: Path) -> None:
    tv = tmp_path / "tv.pth"
    torch.save(torchvision.models.resnet50().state_dict(), tv)
    err = pretrain_error(tiny_data, tmp_path / "a", "--resume", str(tv))
    assert len(err) < 400 and "bare backbone state dict" in err
    err = pretrain_error(tiny_data, tmp_path / "b", "--resume", str(r18_checkpoint),
                         "--moco-dim", "64", touches=True)
    assert "does not match this model" in err and "of another shape" in err and len(err) < 700
    assert err.count("encoder_q.") <= 6  # a few names, not the whole list


def test_a_folder_is_not_called_missing(tiny_data: Path, tmp_path: Path,
                                        r18_checkpoint: Path) -> None:
    run_dir = r18_checkpoint.parent
    err = pretrain_error(tiny_data, tmp_path / "run", "--resume", str(run_dir))
    assert f"{run_dir} is a folder, not a checkpoint file; the newest checkpoint in it is " \
           f"{r18_checkpoint}" in err and "does not exist" not in err
    for argv in (["knn", str(tiny_data), "--pretrained", str(run_dir)],
                 ["export", str(run_dir), "-f", "torchvision", "-o", str(tmp_path / "x.pth")],
                 ["embed", str(tiny_data), "--pretrained", str(run_dir), "-o",
                  str(tmp_path / "e.npy")]):
        rc, _, err = run_cli(argv)
        assert rc == 2 and "is a folder, not a checkpoint file" in err, err


def test_unsafe_checkpoint_message_gives_no_unsafe_advice(tiny_data: Path, tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("true",))

    path = tmp_path / "evil.pth.tar"
    torch.save({"epoch": 1, "state_dict": {}, "x": Evil()}, path)
    for argv in (["knn", str(tiny_data), "--pretrained", str(path)],
                 ["pretrain", str(tiny_data), *TINY_FLAGS, "--resume", str(path), "--output",
                  str(tmp_path / "run")]):
        rc, _, err = run_cli(argv)
        assert rc == 2 and "cannot be loaded safely" in err and "system" in err, err
        assert "weights_only" not in err and "Re-running" not in err and "trust" not in err
    npy = tmp_path / "emb.npy"
    np.save(npy, np.zeros((2, 3), np.float32))
    rc, _, err = run_cli(["knn", str(tiny_data), "--pretrained", str(npy)])
    assert rc == 2 and "is a numpy .npy file" in err


def test_bad_device_is_one_line(tiny_data: Path, tmp_path: Path) -> None:
    err = pretrain_error(tiny_data, tmp_path / "run", "--device", "foo")
    assert "expected --device to be auto, cpu, cuda, cuda:N" in err


def test_ablate_set_and_grid_values_are_checked(tmp_path: Path) -> None:
    grid = tmp_path / "g.yaml"
    grid.write_text("base: {epochs: 1}\ngrid: {moco_m: [0.9, 1.5]}\n")
    rc, _, err = run_cli(["ablate", str(grid), "--list"])
    assert rc == 2 and f"expected --moco-m in [0, 1), got 1.5 (key 'moco_m' in grid of {grid})" \
        in err, err
    grid.write_text("base: {epochs: 1}\ngrid: {moco_m: [0.9]}\n")
    rc, _, err = run_cli(["ablate", str(grid), "--list", "--set", "epochs=2.5"])
    assert rc == 2 and "expected --epochs to be an integer >= 1, got 2.5 (--set epochs=2.5)" \
        in err, err
    rc, _, err = run_cli(["ablate", str(grid), "--list", "--set", "mlp=maybe"])
    assert rc == 2 and "expected --mlp to be true or false, got maybe (--set mlp=maybe)" \
        in err, err
    grid.write_text("base: &b {epochs: 1}\ngrid: {moco_m: [0.9]}\nother: *b\n")
    rc, _, err = run_cli(["ablate", str(grid), "--list"])
    assert rc == 2 and "aliases (*b) are not accepted" in err, err


def test_embed_unreadable_subfolder_is_an_error_or_skipped(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import save_original_checkpoint

    images = make_image_folder(tmp_path / "imgs", per_class=2, size=8, splits=("a", "b"))
    ckpt = tmp_path / "m.pth.tar"
    save_original_checkpoint(ckpt, "resnet18", with_optimizer=False)
    bad = images / "b" / "class_1"
    unlistable(monkeypatch, bad)
    ev = ["-j", "0", "--device", "cpu", "--no-progress", "--image-size", "32"]
    try:
        rc, _, err = run_cli(["embed", str(images), "--pretrained", str(ckpt), "-o",
                              str(tmp_path / "e.npy"), *ev])
        assert rc == 2 and f"cannot list the folder {bad}" in err and "--skip-bad" in err, err
        rc, out, err = run_cli(["embed", str(images), "--pretrained", str(ckpt), "-o",
                                str(tmp_path / "e.npy"), "--skip-bad", *ev])
        assert rc == 0 and "left out 1 unreadable folder(s)" in err, err
        assert "6 x 512 embeddings" in out
    finally:
        bad.chmod(0o755)
