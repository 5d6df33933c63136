"""The plots of an ablation grid's report: the runs' curves per epoch and per step, the final
values against the swept setting, and the cost per step by mechanism."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from moco.ablation.grid import AblationSpec, fmt_value
from moco.ablation.summary import RunSummary
from moco.utils.runlog import new_figure, save_figure


def draw_plots(spec: AblationSpec, summaries: list[RunSummary],
               output: Path) -> list[tuple[str, str]]:
    """The runs' curves and the sweep in ``output``: (title, file name) of each one drawn."""
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
    return plots


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
