"""``moco pretrain`` end to end on a tiny dataset: every artefact, in the original layouts."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from helpers import TINY_FLAGS, make_image_folder
from PIL import Image

from moco.cli import COMMANDS, build_parser, main
from moco.engine.build import build_model
from moco.engine.config_sources import build_config
from moco.utils.machine import describe_machine


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """One tiny 2-epoch pretraining run shared by the tests below."""
    root = tmp_path_factory.mktemp("e2e")
    data = make_image_folder(root / "data")
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:  # module scope: set up before autouse fixtures
        mp.setenv("MOCO_CACHE", str(root / "cache"))
        rc, stdout, stderr = _run(["pretrain", str(data), *TINY_FLAGS, "--output", str(out)])
    assert rc == 0, stderr
    return data, out, stdout


@pytest.mark.slow
def test_run_writes_every_artefact(tiny_run: tuple[Path, Path, str]) -> None:
    _, out, stdout = tiny_run
    for name in ("config.yaml", "checkpoint_0001.pth.tar", "metrics.jsonl", "plot.png"):
        assert (out / name).is_file(), name
    assert "checkpoint_0001.pth.tar" in stdout
    assert list((out / "tb").glob("events.out.tfevents.*"))
    with Image.open(out / "plot.png") as img:
        assert img.format == "PNG"


@pytest.mark.slow
def test_config_yaml_is_resolved(tiny_run: tuple[Path, Path, str]) -> None:
    data, out, _ = tiny_run
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"] == str(data)
    assert (cfg["arch"], cfg["image_size"], cfg["batch_size"], cfg["moco_k"], cfg["bn_splits"],
            cfg["epochs"], cfg["knn_k"], cfg["channels_last"]) == ("resnet18", 32, 8, 32, 2, 2, 5, False)
    # Defaults are written out too (a fully resolved config, not just the flags given).
    assert (cfg["lr"], cfg["moco_m"], cfg["moco_t"], cfg["moco_dim"], cfg["wd"]) == (
        0.03, 0.999, 0.07, 128, 1e-4)


@pytest.mark.slow
def test_checkpoint_original_layout(tiny_run: tuple[Path, Path, str]) -> None:
    _, out, _ = tiny_run
    ckpt = torch.load(out / "checkpoint_0001.pth.tar", map_location="cpu", weights_only=True)
    assert {"epoch", "arch", "state_dict", "optimizer"} <= set(ckpt)
    assert ckpt["epoch"] == 2  # finished epochs (= start_epoch on resume); file suffix is 0-based
    assert ckpt["arch"] == "resnet18"
    sd = ckpt["state_dict"]
    assert all(k.startswith("module.") for k in sd)
    others = {k for k in sd if not k.startswith(("module.encoder_q.", "module.encoder_k."))}
    assert others == {"module.queue", "module.queue_ptr"}
    queue, ptr = sd["module.queue"], sd["module.queue_ptr"]
    assert queue.shape == (128, 32) and queue.dtype == torch.float32
    torch.testing.assert_close(queue.norm(dim=0), torch.ones(32))
    assert ptr.shape == (1,) and ptr.dtype == torch.long
    assert int(ptr) == (2 * (32 // 8) * 8) % 32  # 2 epochs x 4 steps x 8 keys, mod K
    q = {k[len("module.encoder_q."):]: v for k, v in sd.items() if k.startswith("module.encoder_q.")}
    k = {k[len("module.encoder_k."):]: v for k, v in sd.items() if k.startswith("module.encoder_k.")}
    tv = torchvision.models.resnet18(num_classes=128).state_dict()
    assert {n: tuple(v.shape) for n, v in q.items()} == {n: tuple(v.shape) for n, v in tv.items()}
    assert q.keys() == k.keys()
    # The key encoder moved by momentum only (m = 0.999, 8 steps): from the same seeded start,
    # it moved by well under 1% of what the query encoder moved.
    init = build_model(build_config(yaml_path=out / "config.yaml"), torch.device("cpu")).state_dict()
    for name in ("conv1.weight", "layer2.0.conv1.weight", "bn1.weight", "fc.weight"):
        moved_q = (q[name] - init["encoder_q." + name]).abs().max()
        moved_k = (k[name] - init["encoder_k." + name]).abs().max()
        assert 0 < moved_k < 0.02 * moved_q, name
    opt = ckpt["optimizer"]
    assert {"state", "param_groups"} <= set(opt)
    assert opt["param_groups"][0]["lr"] == pytest.approx(0.03)


@pytest.mark.slow
def test_checkpoint_loads_into_torchvision_like_main_lincls(tiny_run: tuple[Path, Path, str]) -> None:
    _, out, _ = tiny_run
    state_dict = torch.load(out / "checkpoint_0001.pth.tar", map_location="cpu",
                            weights_only=True)["state_dict"]
    # main_lincls.py: keep encoder_q up to before the embedding layer, rename, load non-strict.
    for key in list(state_dict.keys()):
        if key.startswith("module.encoder_q") and not key.startswith("module.encoder_q.fc"):
            state_dict[key[len("module.encoder_q."):]] = state_dict[key]
        del state_dict[key]
    model = torchvision.models.resnet18(num_classes=10)
    msg = model.load_state_dict(state_dict, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"}
    assert msg.unexpected_keys == []


@pytest.mark.slow
def test_metrics_jsonl(tiny_run: tuple[Path, Path, str]) -> None:
    _, out, _ = tiny_run
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    for epoch, line in enumerate(lines, start=1):
        rec = json.loads(line)
        assert rec["epoch"] == epoch
        for key in ("loss", "acc1", "lr", "knn_top1", "images_per_s", "seconds"):
            assert isinstance(rec[key], (int, float)), key
        assert rec["loss"] > 0 and 0 <= rec["acc1"] <= 100 and 0 <= rec["knn_top1"] <= 100
        assert rec["lr"] == pytest.approx(0.03)
        assert rec["images_per_s"] > 0 and rec["seconds"] > 0
        assert rec["machine"] == describe_machine("cpu")  # the hardware behind the img/s


@pytest.mark.slow
def test_second_start_in_same_folder_refused(tiny_run: tuple[Path, Path, str]) -> None:
    data, out, _ = tiny_run
    before = sorted(p.name for p in out.iterdir())
    rc, _, err = _run(["pretrain", str(data), *TINY_FLAGS, "--output", str(out)])
    assert rc == 2
    assert "already" in err and "--resume" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.slow
def test_unlabeled_train_skips_knn(tmp_path: Path) -> None:
    train = tmp_path / "data" / "train"
    train.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(16):
        arr = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(arr).save(train / f"{i:03d}.png")
    flags = list(TINY_FLAGS)
    flags[flags.index("--epochs") + 1] = "1"
    rc, stdout, stderr = _run(["pretrain", str(tmp_path / "data"), *flags,
                               "--output", str(tmp_path / "run")])
    assert rc == 0, stderr
    assert "kNN" in stdout and "skipped" in stdout
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["knn_top1"] is None
    assert (tmp_path / "run" / "checkpoint_0000.pth.tar").is_file()


# ----- fast checks (no training) ------------------------------------------------------------

def test_existing_run_folder_refused_without_training(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("epochs: 1\n")
    rc, _, err = _run(["pretrain", str(tiny_data), *TINY_FLAGS, "--output", str(out)])
    assert rc == 2
    assert "--resume" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_missing_data_folder_clear_error(tmp_path: Path) -> None:
    rc, _, err = _run(["pretrain", str(tmp_path / "nope"), *TINY_FLAGS, "--output", str(tmp_path / "o")])
    assert rc == 2
    assert "does not exist" in err and "Traceback" not in err


def test_batch_not_divisible_by_bn_splits_clear_error(tiny_data: Path, tmp_path: Path) -> None:
    """The default --shuffle-bn (split on one process) needs batch % bn-splits == 0: refused
    before any training, with exit code 2."""
    flags = list(TINY_FLAGS)
    flags[flags.index("-b") + 1] = "6"
    flags[flags.index("--bn-splits") + 1] = "4"
    rc, _, err = _run(["pretrain", str(tiny_data), *flags, "--output", str(tmp_path / "o")])
    assert rc == 2
    assert "--bn-splits" in err and "divisible" in err and "Traceback" not in err
    assert not list((tmp_path / "o").glob("checkpoint_*"))


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(["--help"], capsys)
    for name in COMMANDS:  # modules are named with _, commands with - (detectron2-config)
        assert name.replace("_", "-") in text


def _pretrain_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["pretrain"]


def test_pretrain_help_mentions_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(["pretrain", "--help"], capsys)
    flags = [s for a in _pretrain_parser()._actions for s in a.option_strings]
    assert len(flags) > 30
    for flag in flags:
        assert flag in text, flag
    # The original main_moco.py flags are all there.
    for flag in ("--arch", "-a", "--workers", "-j", "--epochs", "--batch-size", "-b", "--lr",
                 "--learning-rate", "--schedule", "--momentum", "--wd", "--weight-decay",
                 "--print-freq", "-p", "--resume", "--seed", "--moco-dim", "--moco-k", "--moco-m",
                 "--moco-t", "--mlp", "--aug-plus", "--cos"):
        assert flag in flags, flag
    for flag in ("--preset", "--config", "--bn-splits", "--shuffle-bn", "--output", "--overwrite",
                 "--symmetric", "--knn-k", "--knn-t", "--image-size", "--cifar-stem"):
        assert flag in flags, flag


def test_python_m_moco_help() -> None:
    r = subprocess.run([sys.executable, "-m", "moco", "pretrain", "--help"], capture_output=True,
                       text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr
    assert "--moco-k" in r.stdout
