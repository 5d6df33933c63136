"""What a newcomer meets in the first hour of ``moco pretrain`` on a small folder: settings that
run but cannot work as meant are warned about (a queue longer than the data, an lr not scaled
with the batch, kNN's k beyond its bank, BatchNorm groups of a few images), the first line is the run's summary, progress bars
only on a terminal, ``overwrite`` a setting like lincls', and config.yaml's paths absolute."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from helpers import TINY_FLAGS, make_cfg

import moco
from moco.engine.config import MocoConfig
from moco.engine.config_checks import lr_advice, run_advice
from moco.engine.config_sources import build_config
from moco.engine.loop import Pretrainer

pytestmark = pytest.mark.usefixtures("one_thread")


# ----- warnings, not refusals --------------------------------------------------------------------

def test_a_queue_longer_than_the_training_set_is_warned() -> None:
    cfg = MocoConfig(moco_k=65536, knn_k=5)
    [said] = run_advice(cfg, 61, None)
    assert said.startswith("--moco-k 65536 is larger than the 61 training images")
    assert "use --moco-k 61 or less (e.g. 32)" in said
    assert run_advice(MocoConfig(moco_k=32, knn_k=5), 61, None) == []
    bank = MocoConfig(mechanism="memory-bank", moco_k=100, knn_k=5)
    assert "drawn from a bank of 61 images" in run_advice(bank, 61, None)[0]
    assert run_advice(MocoConfig(mechanism="end-to-end", moco_k=100, knn_k=5), 61, None) == []


def test_a_changed_batch_without_a_scaled_lr_is_warned_with_the_linear_rule() -> None:
    [said] = lr_advice(build_config(overrides={"batch_size": 16}))
    assert ("-b 16 is not the default batch 256, but --lr 0.03 is still the one tuned for 256: "
            "the linear scaling rule (Goyal et al.) gives lr 0.03 x 16/256 = 0.001875; "
            "--lr-scale linear applies it") in said
    [said] = lr_advice(build_config(preset="cifar10", overrides={"batch_size": 128}))
    assert "not preset cifar10's batch 512" in said and "pass --lr 0.015" in said
    for quiet in ({"batch_size": 16, "lr": 0.002}, {"batch_size": 16, "lr_scale": "linear"},
                  {"batch_size": 256}):
        assert lr_advice(build_config(overrides=quiet)) == [], quiet


def test_knn_k_larger_than_its_bank_is_warned() -> None:
    [said] = run_advice(MocoConfig(moco_k=32, knn_k=200), 32, 32)
    assert said.startswith("--knn-k 200 is larger than the kNN monitor's bank of 32 train images")
    assert run_advice(MocoConfig(moco_k=32, knn_k=20), 32, 32) == []
    assert run_advice(MocoConfig(moco_k=32, knn_k=200), 32, None) == []  # no monitor


def test_batchnorm_groups_of_few_images_are_warned_with_the_splits_that_fix_them() -> None:
    """-b 32 over the default 8 SplitBN groups normalises 4 images at a time (the pilots on
    500 images: 27.9% kNN against 32.6% with --bn-splits 2)."""
    def advice(mode: str = "split", world: int = 1, **kw: object) -> list[str]:
        cfg = MocoConfig(moco_k=32, knn_k=5, lr=0.01, **kw)  # type: ignore[arg-type]
        return run_advice(cfg, 500, None, shuffle_bn=mode, world_size=world)

    [said] = advice(batch_size=32)
    assert said == ("BatchNorm normalises groups of 4 images (-b 32 / --bn-splits 8): noisy "
                    "statistics (the original: 32 per GPU; MoCo v2 on 500 images learned 4.7 kNN "
                    "points less with groups of 4 than of 16); use --bn-splits 2 (16 images each)")
    assert advice(batch_size=128, bn_splits=16)[0].endswith("use --bn-splits 8 (16 images each)")
    assert advice(batch_size=16, bn_splits=2)[0].endswith("use -b 32 or more with --bn-splits 2")
    [said] = advice("ddp", 4, batch_size=32)
    assert "groups of 8 images (-b 32 / 4 processes)" in said and said.endswith("use -b 64 or more")
    for fine in ({"batch_size": 32, "bn_splits": 2}, {"batch_size": 256}, {"batch_size": 128}):
        assert advice(**fine) == [], fine
    assert advice("syncbn", 4, batch_size=32) == []  # one BN over the global batch
    assert advice(batch_size=32, mechanism="mocov3") == []  # no Shuffling BN: the global batch
    assert run_advice(MocoConfig(moco_k=32, knn_k=5, batch_size=8, lr=0.01), 500, None) == []  # no mode


def test_the_run_logs_its_summary_first_then_the_warnings(tiny_data: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The first line is the summary; the input pipeline's choices are debug records."""
    logs: list[str] = []
    caplog.set_level(logging.INFO, logger="moco")
    cfg = make_cfg(tiny_data, tmp_path / "run", "--moco-k", "64", "--knn-k", "50")
    Pretrainer(cfg, log=logs.append).close()
    assert logs[0].startswith("MoCo pretraining: resnet18, 32 images from")
    assert logs[1].startswith("warning: --moco-k 64 is larger than the 32 training images")
    assert any(m.startswith("warning: -b 8 is not the default batch 256") for m in logs)
    assert any(m.startswith("warning: --knn-k 50 is larger than") for m in logs)
    infos = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not any(m.startswith(("input:", "indexed the sizes")) for m in infos), infos


# ----- progress bars ------------------------------------------------------------------------------

def test_the_library_shows_no_progress_bar_unless_asked(
        tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = [f for f in TINY_FLAGS if f != "--no-progress"]
    cfg = moco.build_config(overrides={"data": str(tiny_data), "output": str(tmp_path / "run"),
                                       "epochs": 1, "knn_every": 0, "arch": "resnet18",
                                       "image_size": 32, "batch_size": 8, "moco_k": 32,
                                       "bn_splits": 2, "workers": 0, "channels_last": False})
    moco.pretrain(cfg, log=lambda _m: None)
    assert "epoch 1/1" not in capsys.readouterr().err
    # The command line: bars on a terminal only (here stderr is captured, not a terminal).
    from moco.cli import main

    assert main(["pretrain", str(tiny_data), *flags, "--epochs", "1", "--knn-every", "0",
                 "--output", str(tmp_path / "cli")]) == 0
    assert "epoch 1/1" not in capsys.readouterr().err


# ----- overwrite, config.yaml --------------------------------------------------------------------

def test_overwrite_is_a_setting_and_never_saved_on(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert MocoConfig(overwrite=True).overwrite is True
    moco.pretrain(make_cfg(tiny_data, out, "--epochs", "1", "--knn-every", "0"), log=print)
    again = make_cfg(tiny_data, out, "--epochs", "1", "--knn-every", "0", "--overwrite")
    assert again.overwrite is True
    moco.pretrain(again, log=print)  # replaces the run instead of refusing
    assert yaml.safe_load((out / "config.yaml").read_text())["overwrite"] is False


def test_config_yaml_keeps_absolute_paths(tiny_data: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tiny_data.parent)
    p = Pretrainer(make_cfg(Path(tiny_data.name), Path("runs/a"), "--knn-every", "0"))
    p.close()
    saved = yaml.safe_load((tiny_data.parent / "runs/a/config.yaml").read_text())
    assert saved["data"] == str(tiny_data) and saved["output"] == str(tiny_data.parent / "runs/a")
    assert p.cfg.data == tiny_data.name  # the run itself keeps what it was given
