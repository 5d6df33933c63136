"""``moco ablate``: grid files, resumable run-by-run training, the results table and plots,
and the cost-per-step measurement (MoCo v2 Table 3 analogue)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

import moco.train as train_mod
from moco.ablate import (
    AblationError,
    RunSpec,
    ablate,
    load_spec,
    measure_step_cost,
    parse_spec,
    run_config,
    run_grid,
    run_status,
    write_report,
)
from moco.cli import main
from moco.config import MocoConfig
from moco.train import RunError

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_base(data: Path) -> dict[str, Any]:
    """TINY_FLAGS as grid settings: ResNet-18 at 32 px, batch 8, K 32, 1 epoch of 4 steps."""
    return {"data": str(data), "arch": "resnet18", "image_size": 32, "batch_size": 8,
            "moco_k": 32, "bn_splits": 2, "epochs": 1, "workers": 0, "knn_k": 5,
            "channels_last": False, "device": "cpu", "print_freq": 1}


def write_grid(path: Path, data: Path, **extra: Any) -> Path:
    raw = {"name": "tiny", "title": "tiny momentum grid", "expect": "nothing in particular",
           "base": tiny_base(data), "grid": {"moco_m": [0.9, 0.99]}, **extra}
    path.write_text(yaml.safe_dump(raw))
    return path


def quiet(_msg: str) -> None:
    pass


# ----- grid files -----------------------------------------------------------------------------

def test_parse_grid_product_runs_and_sweep() -> None:
    spec = parse_spec({
        "base": {"preset": "cifar10", "epochs": 3, "train-subset": 100},
        "grid": {"moco_t": [0.07, 0.2], "mlp": [False, True]},
        "runs": [{"name": "extra", "moco-k": 256}],
    }, name="t")
    assert [r.name for r in spec.runs] == ["moco_t=0.07_mlp=false", "moco_t=0.07_mlp=true",
                                           "moco_t=0.2_mlp=false", "moco_t=0.2_mlp=true", "extra"]
    assert spec.runs[-1].settings == {"moco_k": 256}
    assert spec.sweep == ["moco_t", "mlp"] and spec.preset == "cifar10"
    cfg = run_config(spec, spec.runs[1], Path("/tmp/x/r"), {"epochs": 1})
    # preset <- base <- run <- overrides; the runner sets the folder.
    assert (cfg.arch, cfg.moco_t, cfg.mlp, cfg.train_subset, cfg.epochs) == ("resnet18", 0.07, True, 100, 1)
    assert cfg.output == "/tmp/x/r" and cfg.resume == ""


@pytest.mark.parametrize("raw, match", [
    ({"base": {}, "grid": {}}, "no runs"),
    ({"grid": {"moco_mm": [1]}}, "unknown setting"),
    ({"base": {"output": "x"}, "grid": {"moco_m": [0.9]}}, "set by the runner"),
    ({"grid": {"moco_m": 0.9}}, "non-empty list"),
    ({"runs": [{"name": "a"}, {"name": "a", "mlp": True}]}, "unique"),
    ({"runs": [{"name": "a"}], "colour": 1}, "top-level"),
    ({"runs": [{"name": "a"}], "cost": {"batch": [1]}}, "cost"),
])
def test_bad_grid_files_say_what_is_wrong(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(AblationError, match=match):
        parse_spec(raw)


def test_ready_made_grids_parse_and_validate() -> None:
    files = sorted((ROOT / "configs/ablations").glob("*.yaml"))
    assert len(files) >= 6
    for f in files:
        spec = load_spec(f)
        assert spec.expect and spec.budget, f"{f.name}: say what it must show and how long it takes"
        for r in spec.runs:
            run_config(spec, r, Path("/tmp/unused") / r.name).validate()


# ----- report from run folders (no training) ---------------------------------------------------

def _fake_run(run_dir: Path, epochs: int, knn: list[float | None], acc: list[float]) -> None:
    run_dir.mkdir(parents=True)
    with (run_dir / "metrics.jsonl").open("w") as f:
        for e in range(epochs):
            f.write(json.dumps({"epoch": e + 1, "loss": 5.0 - e, "acc1": acc[e], "knn_top1": knn[e],
                                "images_per_s": 100.0, "seconds": 10.0,
                                "knn_random_init": 30.0}) + "\n")
    (run_dir / "checkpoint_0000.pth.tar").write_bytes(b"")


def test_report_table_and_plots_from_metrics(tmp_path: Path) -> None:
    spec = parse_spec({"base": {"epochs": 2, "data": str(tmp_path)},
                       "grid": {"moco_t": [0.1, 0.2], "mlp": [False, True]}}, name="g")
    out = tmp_path / "out"
    _fake_run(out / "moco_t=0.1_mlp=false", 2, [31.0, 35.5], [50.0, 99.9])
    _fake_run(out / "moco_t=0.1_mlp=true", 1, [33.0], [40.0])  # partial: 1 of 2 epochs
    _fake_run(out / "moco_t=0.2_mlp=false", 2, [None, 40.25], [20.0, 30.0])
    (out / "moco_t=0.2_mlp=false" / "FAILED.txt").write_text("the loss became nan at epoch 2\n")
    report = write_report(spec, out)
    text = report.read_text()
    assert "| moco_t=0.1_mlp=false | moco_t=0.1, mlp=false | done | 4.000 | 99.9 / 99.9 | 35.50 / 35.50 |" in text
    assert "partial (1/2 ep)" in text and "failed: the loss became nan" in text
    assert "| moco_t=0.2_mlp=true |" in text  # never started: listed with no numbers
    for png in ("knn.png", "pretext.png", "loss.png", "sweep.png"):
        assert (out / png).stat().st_size > 1000, png
    assert "random init" in text or "randomly initialised" in text
    data = json.loads((out / "results.json").read_text())
    assert data["runs"][0]["final_knn_top1"] == 35.5 and data["runs"][2]["status"] == "failed"


# ----- cost per step ----------------------------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["moco", "end-to-end", "memory-bank"])
def test_measure_step_cost_in_process(mechanism: str) -> None:
    cfg = MocoConfig(arch="resnet18", image_size=32, batch_size=4, moco_k=16, bn_splits=2,
                     moco_dim=16, mechanism=mechanism, device="cpu", channels_last=False)
    r = measure_step_cost(cfg, num_samples=10, steps=1, warmup=0)
    assert "error" not in r, r
    assert r["time_per_step_s"] > 0 and r["peak_bytes"] > 0 and r["step_bytes"] >= 0
    assert r["dictionary_size"] == (3 if mechanism == "end-to-end" else 16)


def test_measure_step_cost_reports_errors_instead_of_raising() -> None:
    cfg = MocoConfig(arch="resnet18", image_size=32, batch_size=3, bn_splits=2, moco_k=16,
                     device="cpu", channels_last=False, shuffle_bn="split")
    r = measure_step_cost(cfg, num_samples=10, steps=1, warmup=0)
    assert "divisible" in r["error"]


# ----- the runner, end to end --------------------------------------------------------------------

@pytest.mark.slow
def test_runner_two_run_grid_writes_table_and_plots_then_skips(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    grid = write_grid(tmp_path / "grid.yaml", tiny_data, cost={
        "mechanisms": ["moco", "end-to-end", "memory-bank"], "batch_sizes": [4, 8],
        "steps": 1, "warmup": 0, "isolate": False})
    out = tmp_path / "out"
    assert main(["ablate", str(grid), "--output", str(out), "--no-progress"]) == 0
    text = (out / "results.md").read_text()
    for name in ("moco_m=0.9", "moco_m=0.99"):
        assert f"| {name} | {name} | done |" in text
        assert (out / name / "metrics.jsonl").is_file()
    for png in ("knn.png", "pretext.png", "loss.png", "sweep.png", "cost.png", "step_loss.png"):
        assert (out / png).stat().st_size > 1000, png
    assert "## Cost per step" in text and "| end-to-end | 8 | 7 |" in text
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert all(r["final_knn_top1"] is not None and r["status"] == "done" for r in runs)
    capsys.readouterr()

    # Re-running trains nothing (finished runs are skipped, cost points are cached).
    def no_training(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train_mod, "pretrain", no_training)
    monkeypatch.setattr("moco.ablate.measure_step_cost", no_training)
    assert main(["ablate", str(grid), "--output", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("finished earlier: skipped") == 2
    assert main(["ablate", str(grid), "--output", str(out), "--list"]) == 0
    assert capsys.readouterr().out.count(" done ") == 2

    # Changing a run's settings under a finished folder is refused, not silently mixed.
    assert main(["ablate", str(grid), "--output", str(out), "--set", "lr=0.5"]) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.slow
def test_runner_resumes_an_interrupted_run_and_records_failures(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec(write_grid(tmp_path / "grid.yaml", tiny_data))
    out = tmp_path / "out"
    overrides = {"knn_every": 0}
    real_step = train_mod.train_step
    count = {"n": 0}

    def step(*a: Any, **k: Any) -> train_mod.StepResult:
        r = real_step(*a, **k)
        count["n"] += 1
        if count["n"] == 6:  # run 2, step 2 of 4
            os.kill(os.getpid(), signal.SIGTERM)
        return r

    monkeypatch.setattr(train_mod, "train_step", step)
    outcomes = run_grid(spec, out, overrides=overrides, progress=False, log=quiet)
    assert [o.status for o in outcomes] == ["done", "stopped"]
    assert run_status(out / "moco_m=0.99", 1) == "partial"
    monkeypatch.setattr(train_mod, "train_step", real_step)
    logs: list[str] = []
    outcomes = run_grid(spec, out, overrides=overrides, progress=False, log=logs.append)
    assert [o.status for o in outcomes] == ["done", "done"]
    assert any("moco_m=0.99] resuming" in m for m in logs)
    assert any("resumed from" in m for m in logs)

    # A run that fails (e.g. diverges) is recorded, skipped on re-runs, retried on request.
    real_pretrain = train_mod.pretrain

    def diverge(cfg: MocoConfig, **_k: Any) -> Any:
        raise RunError("the loss became nan at epoch 1, step 3")

    spec.runs.append(RunSpec("bad", {"moco_m": 0.0}))
    monkeypatch.setattr(train_mod, "pretrain", diverge)
    report, outcomes = ablate(spec, out, overrides=overrides, progress=False, log=quiet)
    assert [o.status for o in outcomes] == ["done", "done", "failed"]
    assert "failed: the loss became nan" in report.read_text()
    _, outcomes = ablate(spec, out, overrides=overrides, progress=False, log=quiet)
    assert outcomes[-1].status == "failed"
    monkeypatch.setattr(train_mod, "pretrain", real_pretrain)
    _, outcomes = ablate(spec, out, overrides=overrides, progress=False, log=quiet,
                         retry_failed=True)
    assert outcomes[-1].status == "done" and not (out / "bad" / "FAILED.txt").exists()


def test_cost_only_measures_without_training_and_caches(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec(write_grid(tmp_path / "grid.yaml", tiny_data, cost={
        "mechanisms": ["moco", "end-to-end", "memory-bank"], "batch_sizes": [4], "steps": 1,
        "warmup": 1, "isolate": False, "settings": {"moco_dim": 16}}))
    out = tmp_path / "out"

    def no_training(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("--cost-only trained a run")

    monkeypatch.setattr(train_mod, "pretrain", no_training)
    report, outcomes = ablate(spec, out, cost_only=True, progress=False, log=quiet)
    assert outcomes == []
    points = json.loads((out / "cost.json").read_text())["points"]
    assert [p["mechanism"] for p in points] == ["moco", "end-to-end", "memory-bank"]
    assert all("error" not in p and p["min_time_per_step_s"] <= p["time_per_step_s"] for p in points)
    assert "| end-to-end | 4 | 3 |" in report.read_text() and (out / "cost.png").is_file()
    monkeypatch.setattr("moco.ablate.measure_step_cost", no_training)
    ablate(spec, out, cost_only=True, progress=False, log=quiet)  # cached: nothing measured
    with pytest.raises(AblationError, match="cost"):
        ablate(parse_spec({"runs": [{"name": "a"}]}), out, cost_only=True)


@pytest.mark.slow
def test_isolated_cost_measurement_runs_in_a_fresh_process() -> None:
    from moco.ablate import _measure_isolated

    cfg = MocoConfig(arch="resnet18", image_size=32, batch_size=4, moco_k=16, bn_splits=2,
                     moco_dim=16, mechanism="end-to-end", device="cpu", channels_last=False)
    r = _measure_isolated(cfg, 10, steps=1, warmup=1)
    assert "error" not in r, r
    assert r["step_bytes"] >= 0 and r["peak_bytes"] > r["step_bytes"] and r["dictionary_size"] == 3
