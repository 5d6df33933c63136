"""The report of an ablation grid, drawn from run folders (no training): the table, the
plots and results.json, with done, partial, failed and never-started runs."""

from __future__ import annotations

import json
from pathlib import Path

from moco.ablation.grid import parse_spec
from moco.ablation.report import write_report


def _fake_run(run_dir: Path, epochs: int, knn: list[float | None], acc: list[float],
              machines: tuple[str, ...] = ("AMD EPYC, 2 cores, 1 torch thread",)) -> None:
    run_dir.mkdir(parents=True)
    with (run_dir / "metrics.jsonl").open("w") as f:
        for e in range(epochs):
            f.write(json.dumps({"epoch": e + 1, "loss": 5.0 - e, "acc1": acc[e], "knn_top1": knn[e],
                                "images_per_s": 100.0, "seconds": 10.0, "knn_random_init": 30.0,
                                "machine": machines[min(e, len(machines) - 1)]}) + "\n")
    (run_dir / "checkpoint_0000.pth.tar").write_bytes(b"")


def test_report_table_and_plots_from_metrics(tmp_path: Path) -> None:
    spec = parse_spec({"base": {"epochs": 2, "data": str(tmp_path)},
                       "grid": {"moco_t": [0.1, 0.2], "mlp": [False, True]},
                       "runs": [{"name": "extra"}]}, name="g")
    out = tmp_path / "out"
    _fake_run(out / "moco_t=0.1_mlp=false", 2, [31.0, 35.5], [50.0, 99.9])
    _fake_run(out / "moco_t=0.1_mlp=true", 1, [33.0], [40.0])  # partial: 1 of 2 epochs
    # resumed on another machine for its second epoch: both are named
    _fake_run(out / "moco_t=0.2_mlp=true", 2, [30.0, 32.0], [10.0, 11.0], ("Intel Xeon, 2 cores, "
              "2 torch threads", "NVIDIA H100; AMD EPYC, 16 cores, 8 torch threads"))
    _fake_run(out / "moco_t=0.2_mlp=false", 2, [None, 40.25], [20.0, 30.0])
    (out / "moco_t=0.2_mlp=false" / "FAILED.txt").write_text("the loss became nan at epoch 2\n")
    report = write_report(spec, out)
    text = report.read_text()
    assert ("| moco_t=0.1_mlp=false | moco_t=0.1, mlp=false | done | 4.000 | 99.9 / 99.9 | "
            "35.50 / 35.50 | 100 | 0m20s | AMD EPYC, 2 cores, 1 torch thread |") in text
    assert "partial (1/2 ep)" in text and "failed: the loss became nan" in text
    assert ("| Intel Xeon, 2 cores, 2 torch threads; NVIDIA H100; AMD EPYC, 16 cores, 8 torch "
            "threads |") in text
    assert "| extra | (base) | new | – |" in text  # never started: listed with no numbers
    for png in ("knn.png", "pretext.png", "loss.png", "sweep.png"):
        assert (out / png).stat().st_size > 1000, png
    assert "random init" in text or "randomly initialised" in text
    data = json.loads((out / "results.json").read_text())
    assert data["runs"][0]["final_knn_top1"] == 35.5 and data["runs"][2]["status"] == "failed"
    assert data["runs"][3]["machines"][0].startswith("Intel Xeon") and data["runs"][4]["machines"] == []

