"""``moco ablate``: resumable run-by-run training of a grid, failures kept, and the cost
measurement (``--cost-only``) cached."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import make_image_folder

import moco.engine.loop as train_mod
from moco.ablation.ablate import AblateOptions, ablate, run_grid, run_grid_jobs
from moco.ablation.grid import AblationError, RunSpec, load_spec, parse_spec, run_status
from moco.cli import main
from moco.core.errors import RunError
from moco.engine.config import MocoConfig
from moco.engine.training_step import StepResult

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
    monkeypatch.setattr("moco.ablation.ablate.measure_step_cost", no_training)
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

    def step(*a: Any, **k: Any) -> StepResult:
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
    report, outcomes = ablate(spec, out, AblateOptions(overrides=overrides, progress=False),
                              log=quiet)
    assert [o.status for o in outcomes] == ["done", "done", "failed"]
    assert "failed: the loss became nan" in report.read_text()
    _, outcomes = ablate(spec, out, AblateOptions(overrides=overrides, progress=False), log=quiet)
    assert outcomes[-1].status == "failed"
    monkeypatch.setattr(train_mod, "pretrain", real_pretrain)
    _, outcomes = ablate(spec, out, AblateOptions(overrides=overrides, progress=False,
                                                  retry_failed=True), log=quiet)
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
    report, outcomes = ablate(spec, out, AblateOptions(cost_only=True, progress=False), log=quiet)
    assert outcomes == []
    points = json.loads((out / "cost.json").read_text())["points"]
    assert [p["mechanism"] for p in points] == ["moco", "end-to-end", "memory-bank"]
    assert all("error" not in p and p["min_time_per_step_s"] <= p["time_per_step_s"] for p in points)
    assert "| end-to-end | 4 | 3 |" in report.read_text() and (out / "cost.png").is_file()
    monkeypatch.setattr("moco.ablation.ablate.measure_step_cost", no_training)
    ablate(spec, out, AblateOptions(cost_only=True, progress=False), log=quiet)  # cached: nothing measured
    with pytest.raises(AblationError, match="cost"):
        ablate(parse_spec({"runs": [{"name": "a"}]}), out, AblateOptions(cost_only=True))



# ----- several runs at once (--jobs) -----------------------------------------------------------

TIMING_KEYS = {"seconds", "images_per_s", "machine"}


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_jobs_train_runs_at_once_with_the_results_of_one_at_a_time(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as this process (one_thread): bit-exact
    spec = load_spec(write_grid(tmp_path / "grid.yaml", tiny_data))
    one, two = tmp_path / "one", tmp_path / "two"
    assert [o.status for o in run_grid(spec, one, progress=False, log=quiet)] == ["done", "done"]
    logs: list[str] = []
    outcomes = run_grid_jobs(spec, two, jobs=2, log=logs.append)
    assert [(o.name, o.status) for o in outcomes] == [("moco_m=0.9", "done"), ("moco_m=0.99", "done")]
    assert any("moco_m=0.99] training" in m for m in logs)  # the jobs' logs come through
    for r in spec.runs:
        assert _metrics(two / r.name) == _metrics(one / r.name), r.name
    # At once: each run started before the other finished.
    starts = [(two / r.name / "config.yaml").stat().st_mtime for r in spec.runs]
    ends = [(two / r.name / "metrics.jsonl").stat().st_mtime for r in spec.runs]
    assert max(starts) < min(ends)
    # Finished runs are skipped, as one at a time.
    logs.clear()
    assert [o.status for o in run_grid_jobs(spec, two, jobs=2, log=logs.append)] == ["done", "done"]
    assert sum("finished earlier: skipped" in m for m in logs) == 2


@pytest.mark.slow
def test_jobs_pass_a_signal_on_and_a_crashed_job_is_reported(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # Images that cannot be decoded: the grid's check before training lists the folder, the
    # run finds them unreadable when it loads them.
    unreadable = make_image_folder(tmp_path / "unreadable")
    for f in unreadable.rglob("*.png"):
        f.write_bytes(b"not an image")
    grid = write_grid(tmp_path / "grid.yaml", tiny_data, runs=[{"name": "unreadable",
                                                                "data": str(unreadable)}])
    spec = load_spec(grid)
    out = tmp_path / "out"
    overrides = {"epochs": 25, "knn_every": 0}  # 100 steps: long enough to be stopped mid-run

    def stop_when_both_train() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            # A first checkpoint in both: each job is in its loop, its signal handler set
            # (a SIGTERM during a job's start-up would end it as failed, not stopped).
            if all(list((out / n).glob("checkpoint_*.pth.tar"))
                   for n in ("moco_m=0.9", "moco_m=0.99")):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=stop_when_both_train, daemon=True)
    killer.start()
    outcomes = run_grid_jobs(spec, out, jobs=2, overrides=overrides, log=quiet)
    killer.join()
    # Both running jobs checkpointed and stopped; the third was never started.
    assert [o.status for o in outcomes] == ["stopped", "stopped", "stopped"]
    assert all(run_status(out / n, 25) == "partial" for n in ("moco_m=0.9", "moco_m=0.99"))
    assert all(list((out / n).glob("checkpoint_*.pth.tar")) for n in ("moco_m=0.9", "moco_m=0.99"))

    logs: list[str] = []
    outcomes = run_grid_jobs(spec, out, jobs=2, overrides=overrides, log=logs.append)
    by_name = {o.name: o for o in outcomes}
    assert by_name["moco_m=0.9"].status == by_name["moco_m=0.99"].status == "done"
    assert sum("] resuming" in m for m in logs) == 2
    # A job that dies of an error (here: unreadable images) is reported with the reason, and is
    # not marked as a diverged run (no FAILED.txt), so it trains once the data is fixed.
    assert by_name["unreadable"].status == "failed"
    assert "can be read" in by_name["unreadable"].message
    assert not (out / "unreadable" / "FAILED.txt").exists()


def test_jobs_must_be_positive(tiny_data: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    grid = write_grid(tmp_path / "grid.yaml", tiny_data)
    assert main(["ablate", str(grid), "--output", str(tmp_path / "out"), "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err
