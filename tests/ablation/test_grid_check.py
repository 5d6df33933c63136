"""A grid is checked whole before anything trains: every run that is to train gets the checks
``moco pretrain`` makes before its first step (settings, device, data folder, batch against
the training set, architecture), and a bad run fails in one line that names it and the key,
before the first run starts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from helpers import make_image_folder
from PIL import Image

import moco.engine.loop as train_mod
from moco.ablation.ablate import run_grid, run_grid_jobs
from moco.ablation.grid import AblationError, load_spec, parse_spec
from moco.cli import main

GOOD_RUNS = 6


def tiny_base(data: Path) -> dict[str, Any]:
    """ResNet-18 at 32 px, batch 8 (2 BN groups of 4), K 32, 1 epoch, on the CPU."""
    return {"data": str(data), "arch": "resnet18", "image_size": 32, "batch_size": 8,
            "moco_k": 32, "bn_splits": 2, "epochs": 1, "workers": 0, "knn_k": 5,
            "channels_last": False, "device": "cpu"}


def grid_with_bad_run(data: Path, bad: dict[str, Any]) -> dict[str, Any]:
    """Six good runs, then a seventh ('bad', ``runs[6]``) with ``bad`` as its settings."""
    runs = [{"name": f"r{i}", "moco_m": 0.9 + i / 100} for i in range(GOOD_RUNS)]
    return {"name": "seven", "base": tiny_base(data), "runs": [*runs, {"name": "bad", **bad}]}


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The run folders pretrain was called for (nothing is trained: a stand-in records them)."""
    calls: list[str] = []

    def record(cfg: Any, **_k: Any) -> Any:
        calls.append(Path(cfg.output).name)
        return SimpleNamespace(stopped_early=False)

    monkeypatch.setattr(train_mod, "pretrain", record)
    return calls


def quiet(_msg: str) -> None:
    pass


def flat_folder(root: Path, n: int = 16) -> Path:
    """A folder of images without train/ or class folders: unlabeled training images."""
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((32, 32, 3), i * 8, np.uint8)).save(root / f"{i:03d}.png")
    return root


def other_classes(root: Path) -> Path:
    """train/ with 2 classes, test/ with 3: the kNN monitor cannot compare them."""
    make_image_folder(root, classes=2, splits=("train",))
    return make_image_folder(root, classes=3, splits=("test",))


# ----- each kind of bad run is found before the first run trains --------------------------------

BAD_RUNS = [
    ("missing data folder", lambda t, d: {"data": str(t / "missing")},
     ["key 'data'", "does not exist"]),
    ("data is a file", lambda t, d: {"data": str(next((d / "train").rglob("*.png")))},
     ["key 'data'", "is a file"]),
    ("knn splits of other classes", lambda t, d: {"data": str(other_classes(t / "other"))},
     ["key 'data'", "--knn-every 0"]),
    ("unknown architecture", lambda t, d: {"arch": "resnet19"}, ["--arch resnet19"]),
    ("batch larger than the training set", lambda t, d: {"batch_size": 64, "moco_k": 128},
     ["key 'batch_size'", "32 training images", "batch of 64"]),
    ("subset smaller than a batch", lambda t, d: {"train_subset": 4},
     ["key 'batch_size'", "4 training images (--train-subset 4)"]),
    ("subset of unlabeled images", lambda t, d: {"data": str(flat_folder(t / "flat")),
                                                 "train_subset": 8},
     ["key 'train_subset'", "labeled"]),
    ("BatchNorm over one value", lambda t, d: {"bn_splits": 8}, ["1 value per channel"]),
    ("precision the device lacks", lambda t, d: {"precision": "fp16"}, ["--precision fp16"]),
    ("shuffle needing processes", lambda t, d: {"shuffle_bn": "ddp"}, ["--shuffle-bn ddp"]),
    ("staleness beyond an epoch", lambda t, d: {"staleness_every": 1, "moco_k": 64},
     ["--staleness-every"]),
    ("settings that contradict", lambda t, d: {"batch_size": 6, "bn_splits": 4},
     ["not divisible by --bn-splits 4"]),
]


@pytest.mark.parametrize("bad, expected", [(b, e) for _, b, e in BAD_RUNS],
                         ids=[i for i, _, _ in BAD_RUNS])
def test_a_bad_seventh_run_fails_before_the_first_run_trains(
        bad: Any, expected: list[str], tiny_data: Path, tmp_path: Path,
        trained: list[str]) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(grid_with_bad_run(tiny_data, bad(tmp_path, tiny_data))))
    with pytest.raises(AblationError) as e:
        run_grid(load_spec(grid), tmp_path / "out", progress=False, log=quiet)
    message = str(e.value)
    assert trained == [], "a run trained before the bad one was found"
    assert "\n" not in message
    assert message.startswith(f"{grid}: run 'bad' (runs[6])"), message
    for text in expected:
        assert text in message, message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_the_machine_lacks_is_found_before_training(
        tiny_data: Path, tmp_path: Path, trained: list[str]) -> None:
    spec = parse_spec(grid_with_bad_run(tiny_data, {"device": "cuda"}))
    with pytest.raises(AblationError, match=r"run 'bad' \(runs\[6\]\): --device cuda"):
        run_grid(spec, tmp_path / "out", progress=False, log=quiet)
    assert trained == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_an_unreadable_data_folder_is_found_before_training(
        tiny_data: Path, tmp_path: Path, trained: list[str]) -> None:
    locked = make_image_folder(tmp_path / "locked")
    (locked / "train").chmod(0)
    try:
        spec = parse_spec(grid_with_bad_run(tiny_data, {"data": str(locked)}))
        with pytest.raises(AblationError, match=r"run 'bad' \(runs\[6\]\): key 'data'"):
            run_grid(spec, tmp_path / "out", progress=False, log=quiet)
    finally:
        (locked / "train").chmod(0o755)
    assert trained == []


def test_a_bad_grid_point_is_named_with_where_its_value_comes_from(
        tiny_data: Path, tmp_path: Path, trained: list[str]) -> None:
    spec = parse_spec({"base": {**tiny_base(tiny_data), "moco_k": 128},
                       "grid": {"batch_size": [8, 16, 64]}})
    with pytest.raises(AblationError) as e:
        run_grid(spec, tmp_path / "out", progress=False, log=quiet)
    assert str(e.value).startswith("run 'batch_size=64' (grid): key 'batch_size' = 64 (set in "
                                   "the grid)"), str(e.value)
    assert trained == []
    # A base value is named as such, and a --set value as the command line's.
    spec = parse_spec(grid_with_bad_run(tiny_data, {}))
    with pytest.raises(AblationError, match=r"run 'r0' \(runs\[0\]\): key 'data' = \S+ \(set "
                       r"on the command line\)"):
        run_grid(spec, tmp_path / "out", overrides={"data": str(tmp_path / "gone")},
                 progress=False, log=quiet)
    spec.base["data"] = str(tmp_path / "gone")
    with pytest.raises(AblationError, match=r"run 'r0' \(runs\[0\]\): key 'data' = \S+ \(set "
                       r"in base\)"):
        run_grid(spec, tmp_path / "out", progress=False, log=quiet)
    assert trained == []


# ----- what is checked: the runs that train, each data folder once ------------------------------

def test_only_the_runs_that_train_are_checked(
        tiny_data: Path, tmp_path: Path, trained: list[str]) -> None:
    spec = parse_spec(grid_with_bad_run(tiny_data, {"data": str(tmp_path / "missing")}))
    outcomes = run_grid(spec, tmp_path / "out", only=["r0", "r1"], progress=False, log=quiet)
    assert [o.status for o in outcomes] == ["done", "done"] and trained == ["r0", "r1"]


def test_each_data_folder_is_listed_once_for_the_whole_grid(
        tiny_data: Path, tmp_path: Path, trained: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import moco.ablation.check as check_mod

    listed: list[str] = []
    real = check_mod.find_dataset

    def counting(root: Any, *a: Any, **k: Any) -> Any:
        listed.append(str(root))
        return real(root, *a, **k)

    monkeypatch.setattr(check_mod, "find_dataset", counting)
    spec = parse_spec(grid_with_bad_run(tiny_data, {"moco_m": 0.5}))
    run_grid(spec, tmp_path / "out", progress=False, log=quiet)
    assert listed == [str(tiny_data)] and len(trained) == GOOD_RUNS + 1


# ----- the command and several runs at once ----------------------------------------------------

def test_the_command_refuses_a_bad_run_in_one_line_before_training(
        tiny_data: Path, tmp_path: Path, trained: list[str],
        capsys: pytest.CaptureFixture[str]) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(grid_with_bad_run(tiny_data, {"data": str(tmp_path / "nope")})))
    assert main(["ablate", str(grid), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{grid}: run 'bad' (runs[6]): key 'data'" in err, err
    assert trained == []


def test_the_command_names_the_run_of_contradicting_settings(
        tiny_data: Path, tmp_path: Path, trained: list[str],
        capsys: pytest.CaptureFixture[str]) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(grid_with_bad_run(tiny_data, {"batch_size": 6,
                                                                 "bn_splits": 4})))
    assert main(["ablate", str(grid), "--output", str(tmp_path / "out"), "--only", "r0"]) == 2
    assert "run 'bad' (runs[6])" in capsys.readouterr().err
    assert trained == []


def test_jobs_check_the_whole_grid_before_starting_a_process(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_process(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a job was started before the grid was checked")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(grid_with_bad_run(tiny_data, {"data": str(tmp_path / "nope")})))
    with pytest.raises(AblationError, match=r"run 'bad' \(runs\[6\]\): key 'data'"):
        run_grid_jobs(load_spec(grid), tmp_path / "out", jobs=2, log=quiet)


# ----- the cost section ------------------------------------------------------------------------

@pytest.mark.parametrize("cost, match", [
    ({"mechanisms": ["moco", "mocco"]}, r"mocco \(cost\.mechanisms"),
    ({"batch_sizes": [8, "big"]}, r"big \(cost\.batch_sizes"),
    ({"batch_sizes": [0]}, r"cost\.batch_sizes"),
    ({"steps": "3x"}, r"cost\.steps"),
    ({"warmup": -1}, r"cost\.warmup"),
    ({"isolate": "perhaps"}, r"cost\.isolate"),
])
def test_the_cost_section_is_checked_when_the_grid_is_read(cost: dict[str, Any],
                                                           match: str) -> None:
    with pytest.raises(AblationError, match=match):
        parse_spec({"runs": [{"name": "a"}], "cost": cost})
