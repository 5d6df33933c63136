"""The report of an ablation grid: results.md, results.json and the PNG plots, drawn from
whatever the run folders hold (metrics.jsonl, TensorBoard events, cost.json)."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from moco.ablation.grid import AblationSpec, RunSpec, fmt_value, run_config
from moco.ablation.plots import draw_plots, plot_cost
from moco.ablation.summary import RunSummary, collect
from moco.utils.atomic import atomic_write_text


def _f(v: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _duration(seconds: float) -> str:
    if seconds <= 0:
        return "–"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _mb(v: Any) -> str:
    return "–" if v is None else f"{float(v) / 2**20:.0f} MB"


def results_table(summaries: list[RunSummary]) -> str:
    """The markdown table of results.md."""
    head = ("| run | settings | status | final loss | pretext acc@1 (final / max) | kNN top-1 "
            "(final / best) | img/s | train time | machine |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        settings = ", ".join(f"{k}={fmt_value(v)}" for k, v in s.settings.items()) or "(base)"
        status = s.status if s.status != "partial" else f"partial ({len(s.history)}/{s.epochs} ep)"
        if s.status == "failed":
            status = f"failed: {s.message.splitlines()[0][:80] if s.message else ''}"
        lines.append(
            f"| {s.name} | {settings} | {status} | {_f(s.last.get('loss'), '{:.3f}')} | "
            f"{_f(s.last.get('acc1'), '{:.1f}')} / {_f(s.max_acc1, '{:.1f}')} | "
            f"{_f(s.final_knn)} / {_f(s.best_knn)} | {_f(s.images_per_s, '{:.0f}')} | "
            f"{_duration(s.train_seconds)} | {'; '.join(s.machines) or '–'} |")
    return "\n".join(lines)


def cost_table(points: list[dict[str, Any]]) -> str:
    lines = ["| mechanism | batch | negatives per query | peak memory | memory of the step | "
             "time / step (median, fastest) | img/s | memory measured as |",
             "|---|---|---|---|---|---|---|---|"]
    for p in points:
        if "error" in p:
            lines.append(f"| {p['mechanism']} | {p['batch_size']} | {p.get('dictionary_size', '–')} "
                         f"| {p['error'][:60]} | | | | |")
            continue
        lines.append(
            f"| {p['mechanism']} | {p['batch_size']} | {p['dictionary_size']} | "
            f"{_mb(p['peak_bytes'])} | {_mb(p['step_bytes'])} | "
            f"{p['time_per_step_s'] * 1000:.0f} ms, "
            f"{p.get('min_time_per_step_s', p['time_per_step_s']) * 1000:.0f} ms | "
            f"{p['images_per_s']:.0f} | {p['memory_kind']} |")
    return "\n".join(lines)


def write_report(spec: AblationSpec, output: Path, *,
                 overrides: dict[str, Any] | None = None) -> Path:
    """results.md, results.json and the PNG plots from whatever the run folders hold."""
    output.mkdir(parents=True, exist_ok=True)
    summaries = collect(spec, output, overrides)
    plots = draw_plots(spec, summaries, output)
    cost_points = read_cost(output)
    if cost_points and plot_cost(cost_points, output / "cost.png"):
        plots.append(("cost per step by mechanism", "cost.png"))
    lines = (_intro_lines(spec) + _setup_lines(spec, output, overrides)
             + _results_lines(summaries) + _cost_lines(cost_points))
    if plots:
        lines += ["## Plots", ""] + [f"![{t}]({p})" for t, p in plots] + [""]
    path = output / "results.md"
    atomic_write_text(path, "\n".join(lines))
    atomic_write_text(output / "results.json", json.dumps(
        {"name": spec.name, "runs": [s.to_dict() for s in summaries], "cost": cost_points},
        indent=1) + "\n")
    return path


def read_cost(output: Path) -> list[dict[str, Any]]:
    """The cost points of ``output/cost.json`` ([] when absent or unreadable)."""
    if not (output / "cost.json").is_file():
        return []
    try:
        return list(json.loads((output / "cost.json").read_text()).get("points", []))
    except ValueError:
        return []


def _intro_lines(spec: AblationSpec) -> list[str]:
    """results.md's title, grid file, what the papers say and the budget."""
    lines = [f"# {spec.title or spec.name}", ""]
    if spec.source is not None:
        lines += [f"Grid file: `{spec.source}`. Re-run `moco ablate {spec.source}` to continue "
                  "or refresh this report.", ""]
    if spec.expect:
        lines += ["## What the papers say it should show", "", spec.expect, ""]
    if spec.budget:
        lines += [f"Budget: {spec.budget}", ""]
    return lines


def _setup_lines(spec: AblationSpec, output: Path,
                 overrides: dict[str, Any] | None) -> list[str]:
    """The setup section: the data, budget and network of the base settings, the settings
    given, the device and the machine."""
    base_cfg = run_config(spec, RunSpec("base", {}), output / "base", overrides)
    shown = {k: v for k, v in {**spec.base, **(overrides or {})}.items() if k != "data"}
    return ["## Setup", "",
            f"Data: `{base_cfg.data}`"
            + (f", {base_cfg.train_subset}-image class-balanced subset" if base_cfg.train_subset
               else "") + f"; {base_cfg.epochs} epochs; {base_cfg.arch} at "
            f"{base_cfg.image_size} px; preset `{spec.preset or base_cfg.preset or 'none'}`.",
            "", "Base settings: " + (", ".join(f"`{k}={fmt_value(v)}`" for k, v in shown.items())
                                     or "(preset defaults)"),
            "", f"Device: {base_cfg.device}; torch {torch.__version__}; "
            f"{os.cpu_count()} CPU cores; report written {time.strftime('%Y-%m-%d %H:%M')}.", ""]


def _results_lines(summaries: list[RunSummary]) -> list[str]:
    """The results section: what each column means, the table and the random-init floor."""
    lines = ["## Results", "",
             "kNN: weighted kNN (k, t as configured) of the test split against the full train "
             "split, on the encoder's features. Pretext acc@1: how often the positive wins among "
             "1 + K (end-to-end: among the batch). img/s: training steps only; train time: the "
             "epochs' wall time, their kNN evaluations included (not the random-init one). "
             "machine: where the epochs ran (img/s and times depend on it).", "",
             results_table(summaries), ""]
    inits = [s.knn_random_init for s in summaries if s.knn_random_init is not None]
    if inits:
        lines += [f"kNN top-1 of the randomly initialised network: {statistics.mean(inits):.2f}% "
                  "(a run has learned something only above this).", ""]
    return lines


def _cost_lines(cost_points: list[dict[str, Any]]) -> list[str]:
    """The cost section (none without cost points)."""
    if not cost_points:
        return []
    return ["## Cost per step (analogue of MoCo v2 Table 3)", "",
            "Synthetic batches, no data loading, after a warm-up step. 'memory of the "
            "step': rise of the allocated memory (GPU) or of the peak RSS (CPU) during a "
            "steady-state step over the memory held between steps (weights, gradients, "
            "SGD state, bank): activations and temporaries. 'peak memory': CUDA peak "
            "allocated over all steps, or the process's peak RSS including the PyTorch "
            "libraries. On a shared CPU the median time follows the machine's load; the "
            "fastest step is closer to the mechanism's own cost.", "",
            cost_table(cost_points), ""]
