"""The report of an ablation grid: results.md, results.json and the PNG plots, drawn from
whatever the run folders hold (metrics.jsonl, TensorBoard events, cost.json)."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moco.ablation.grid import (
    FAILED_MARKER,
    AblationSpec,
    RunSpec,
    fmt_value,
    run_config,
    run_status,
)
from moco.utils.atomic import atomic_write_text
from moco.utils.runlog import new_figure, read_metrics, save_figure


@dataclass
class RunSummary:
    """What the table and plots need from one run folder."""

    name: str
    settings: dict[str, Any]
    status: str
    epochs: int
    history: list[dict[str, Any]]
    knn_random_init: float | None = None
    message: str = ""

    @property
    def last(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    @property
    def final_knn(self) -> float | None:
        vals = [h["knn_top1"] for h in self.history if h.get("knn_top1") is not None]
        return float(vals[-1]) if vals else None

    @property
    def best_knn(self) -> float | None:
        vals = [h["knn_top1"] for h in self.history if h.get("knn_top1") is not None]
        return float(max(vals)) if vals else None

    @property
    def max_acc1(self) -> float | None:
        return max(float(h["acc1"]) for h in self.history) if self.history else None

    @property
    def images_per_s(self) -> float | None:
        vals = [float(h["images_per_s"]) for h in self.history if h.get("images_per_s")]
        return statistics.mean(vals) if vals else None

    @property
    def train_seconds(self) -> float:
        return float(sum(float(h.get("seconds") or 0.0) for h in self.history))

    @property
    def machines(self) -> list[str]:
        """The machines the epochs were trained on (several if the run was resumed elsewhere)."""
        return list(dict.fromkeys(str(h["machine"]) for h in self.history if h.get("machine")))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "settings": self.settings, "status": self.status,
                "epochs_done": len(self.history), "epochs": self.epochs,
                "final_loss": self.last.get("loss"), "final_acc1": self.last.get("acc1"),
                "max_acc1": self.max_acc1, "final_knn_top1": self.final_knn,
                "best_knn_top1": self.best_knn, "knn_random_init": self.knn_random_init,
                "images_per_s": self.images_per_s, "train_seconds": self.train_seconds,
                "machines": self.machines, "message": self.message}


def collect(spec: AblationSpec, output: Path,
            overrides: dict[str, Any] | None = None) -> list[RunSummary]:
    """Read every run's metrics.jsonl (runs never started are listed with no history)."""
    out = []
    for r in spec.runs:
        run_dir = output / r.name
        cfg = run_config(spec, r, run_dir, overrides)
        history = read_metrics(run_dir / "metrics.jsonl")
        status = run_status(run_dir, cfg.epochs)
        base = next((h.get("knn_random_init") for h in history
                     if h.get("knn_random_init") is not None), None)
        msg = (run_dir / FAILED_MARKER).read_text().strip() if status == "failed" else ""
        out.append(RunSummary(r.name, r.settings, status, cfg.epochs, history, base, msg))
    return out


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


def plot_curves(summaries: list[RunSummary], key: str, ylabel: str, title: str, path: Path,
                baseline: bool = False) -> bool:
    """One line per run of ``key`` per epoch (kNN curves start at epoch 0 = random init)."""
    fig = new_figure(figsize=(7, 4.5))
    ax = fig.subplots()
    drawn = False
    for s in summaries:
        pts = [(h["epoch"], h[key]) for h in s.history if h.get(key) is not None]
        if baseline and pts and s.knn_random_init is not None:
            pts = [(0, s.knn_random_init)] + pts
        if pts:
            ax.plot([e for e, _ in pts], [v for _, v in pts], "o-", ms=3, label=s.name)
            drawn = True
    inits = [s.knn_random_init for s in summaries if s.knn_random_init is not None]
    if baseline and inits:
        ax.axhline(statistics.mean(inits), color="gray", ls=":",
                   label=f"random init ({statistics.mean(inits):.1f}%)")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if drawn:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path)
    return drawn


def plot_step_loss(summaries: list[RunSummary], output: Path, path: Path) -> bool:
    """Per-step loss from each run's TensorBoard scalars (``step/loss``): the m = 0 "loss
    oscillates" signature is visible here rather than in epoch means."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return False
    fig = new_figure(figsize=(7, 4.5))
    ax = fig.subplots()
    drawn = False
    for s in summaries:
        tb = output / s.name / "tb"
        if not tb.is_dir():
            continue
        try:
            acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
            acc.Reload()
            events = acc.Scalars("step/loss") if "step/loss" in acc.Tags().get("scalars", []) else []
        except Exception:  # a half-written event file: skip the run's curve
            continue
        if events:
            ax.plot([e.step for e in events], [e.value for e in events], lw=0.8, label=s.name)
            drawn = True
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss")
    ax.set_title("loss per step")
    if drawn:
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, path)
    return drawn


def plot_sweep(summaries: list[RunSummary], sweep: list[str], path: Path) -> bool:
    """Final kNN top-1 (left) and final pretext acc@1 (right) against the swept value. With
    two swept settings: x = the first, one line per value of the second. Runs without a
    swept setting are placed by name."""
    done = [s for s in summaries if s.history]
    if not done:
        return False
    fig = new_figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2)
    x_key = sweep[0] if sweep else None
    group_key = sweep[1] if len(sweep) > 1 else None

    def xlabel(s: RunSummary) -> str:
        return fmt_value(s.settings[x_key]) if x_key and x_key in s.settings else s.name

    xs: list[str] = []
    for s in done:
        if xlabel(s) not in xs:
            xs.append(xlabel(s))
    groups: dict[str, list[RunSummary]] = {}
    for s in done:
        if x_key and x_key not in s.settings:
            g = "other runs"
        else:
            g = (f"{group_key}={fmt_value(s.settings[group_key])}"
                 if group_key and group_key in s.settings else "")
        groups.setdefault(g, []).append(s)
    for ax, metric, label in ((axes[0], "knn", "final kNN top-1 (%)"),
                              (axes[1], "acc1", "final pretext acc@1 (%)")):
        for g, members in groups.items():
            pts = []
            for s in members:
                v = s.final_knn if metric == "knn" else s.last.get("acc1")
                if v is not None:
                    pts.append((xs.index(xlabel(s)), float(v)))
            if pts:
                ax.plot([p for p, _ in pts], [v for _, v in pts], "o" if g == "other runs" else "o-",
                        label=g or None)
        if metric == "knn":
            inits = [s.knn_random_init for s in done if s.knn_random_init is not None]
            if inits:
                ax.axhline(statistics.mean(inits), color="gray", ls=":", label="random init")
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(xs, rotation=20 if max(len(x) for x in xs) > 6 else 0, fontsize=8)
        ax.set_xlabel(x_key or "run")
        ax.set_ylabel(label)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7)
    fig.suptitle("final values against the swept setting")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def plot_cost(points: list[dict[str, Any]], path: Path) -> bool:
    """Memory of the step (left) and time per step (right) against the batch size, one line
    per mechanism."""
    ok = [p for p in points if "error" not in p]
    if not ok:
        return False
    fig = new_figure(figsize=(11, 4.5))
    a1, a2 = fig.subplots(1, 2)
    cuda = any(str(p.get("device", "")).startswith("cuda") for p in ok)
    for mech in dict.fromkeys(p["mechanism"] for p in ok):
        pts = sorted((p["batch_size"], p) for p in ok if p["mechanism"] == mech)
        bs = [b for b, _ in pts]
        mem_key = "peak_bytes" if cuda else "step_bytes"
        a1.plot(bs, [p[mem_key] / 2**20 for _, p in pts], "o-", label=mech)
        a2.plot(bs, [p.get("min_time_per_step_s", p["time_per_step_s"]) * 1000 for _, p in pts],
                "o-", label=mech)
    sizes = sorted({p["batch_size"] for p in ok})
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(b) for b in sizes])
        ax.set_xlabel("batch size")
        ax.legend(fontsize=8)
    a1.set_ylabel("peak GPU memory (MB)" if cuda else "peak RSS rise during the steps (MB)")
    a2.set_ylabel("time per step (ms, fastest of the timed steps)")
    fig.suptitle("cost per training step by mechanism (cf. MoCo v2 Table 3)")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def write_report(spec: AblationSpec, output: Path, *,
                 overrides: dict[str, Any] | None = None) -> Path:
    """results.md, results.json and the PNG plots from whatever the run folders hold."""
    output.mkdir(parents=True, exist_ok=True)
    summaries = collect(spec, output, overrides)
    plots = []
    if plot_curves(summaries, "knn_top1", "kNN top-1 (%)", "kNN accuracy per epoch",
                   output / "knn.png", baseline=True):
        plots.append(("kNN top-1 per epoch", "knn.png"))
    if plot_curves(summaries, "acc1", "pretext acc@1 (%)",
                   "pretext accuracy per epoch (near 100%: BN 'cheating')",
                   output / "pretext.png"):
        plots.append(("pretext accuracy per epoch", "pretext.png"))
    if plot_curves(summaries, "loss", "InfoNCE loss (epoch mean)", "loss per epoch",
                   output / "loss.png"):
        plots.append(("loss per epoch", "loss.png"))
    if plot_step_loss(summaries, output, output / "step_loss.png"):
        plots.append(("loss per step", "step_loss.png"))
    if plot_sweep(summaries, spec.sweep, output / "sweep.png"):
        plots.append(("final values against the swept setting", "sweep.png"))
    cost_points: list[dict[str, Any]] = []
    if (output / "cost.json").is_file():
        try:
            cost_points = list(json.loads((output / "cost.json").read_text()).get("points", []))
        except ValueError:
            cost_points = []
    if cost_points and plot_cost(cost_points, output / "cost.png"):
        plots.append(("cost per step by mechanism", "cost.png"))

    base_cfg = run_config(spec, RunSpec("base", {}), output / "base", overrides)
    shown = {k: v for k, v in {**spec.base, **(overrides or {})}.items() if k != "data"}
    lines = [f"# {spec.title or spec.name}", ""]
    if spec.source is not None:
        lines += [f"Grid file: `{spec.source}`. Re-run `moco ablate {spec.source}` to continue "
                  "or refresh this report.", ""]
    if spec.expect:
        lines += ["## What the papers say it should show", "", spec.expect, ""]
    if spec.budget:
        lines += [f"Budget: {spec.budget}", ""]
    lines += ["## Setup", "",
              f"Data: `{base_cfg.data}`"
              + (f", {base_cfg.train_subset}-image class-balanced subset" if base_cfg.train_subset
                 else "") + f"; {base_cfg.epochs} epochs; {base_cfg.arch} at "
              f"{base_cfg.image_size} px; preset `{spec.preset or base_cfg.preset or 'none'}`.",
              "", "Base settings: " + (", ".join(f"`{k}={fmt_value(v)}`" for k, v in shown.items())
                                       or "(preset defaults)"),
              "", f"Device: {base_cfg.device}; torch {torch.__version__}; "
              f"{os.cpu_count()} CPU cores; report written {time.strftime('%Y-%m-%d %H:%M')}.",
              "", "## Results", "",
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
    if cost_points:
        lines += ["## Cost per step (analogue of MoCo v2 Table 3)", "",
                  "Synthetic batches, no data loading, after a warm-up step. 'memory of the "
                  "step': rise of the allocated memory (GPU) or of the peak RSS (CPU) during a "
                  "steady-state step over the memory held between steps (weights, gradients, "
                  "SGD state, bank): activations and temporaries. 'peak memory': CUDA peak "
                  "allocated over all steps, or the process's peak RSS including the PyTorch "
                  "libraries. On a shared CPU the median time follows the machine's load; the "
                  "fastest step is closer to the mechanism's own cost.", "",
                  cost_table(cost_points), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{t}]({p})" for t, p in plots] + [""]
    path = output / "results.md"
    atomic_write_text(path, "\n".join(lines))
    atomic_write_text(output / "results.json", json.dumps(
        {"name": spec.name, "runs": [s.to_dict() for s in summaries], "cost": cost_points},
        indent=1) + "\n")
    return path

