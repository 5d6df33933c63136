"""What a run writes besides checkpoints: metrics.jsonl, TensorBoard events and plot.png."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from moco.utils.atomic import atomic_path, atomic_write_text

_log = logging.getLogger(__name__)


@contextlib.contextmanager
def _matplotlib_folder() -> Iterator[None]:
    """matplotlib keeps a font cache under ~/.cache and ~/.config/matplotlib; a run writes
    only to its run folder and moco's cache folder ($MOCO_CACHE, else ~/.cache/moco), so
    unless the user chose a place (MPLCONFIGDIR), matplotlib is first imported with its
    folder in moco's cache. The variable is set only for that import, then restored:
    importing moco changes no environment variable."""
    if "matplotlib" in sys.modules or os.environ.get("MPLCONFIGDIR"):
        yield
        return
    cache = os.environ.get("MOCO_CACHE") or os.path.join("~", ".cache", "moco")
    os.environ["MPLCONFIGDIR"] = os.path.join(os.path.expanduser(cache), "matplotlib")
    try:
        yield
    finally:
        os.environ.pop("MPLCONFIGDIR", None)


def new_figure(**kw: Any) -> Any:
    """A matplotlib ``Figure`` (``figsize=...``) outside pyplot: no backend is chosen or
    changed, nothing stays open (the plots of runs and reports are made this way)."""
    with _matplotlib_folder():
        from matplotlib.figure import Figure
    return Figure(**kw)


def save_figure(fig: Any, path: Path) -> None:
    """``fig`` as a PNG at ``path``, through the one atomic write."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def __getattr__(name: str) -> Any:
    """``plt``: pyplot with the Agg backend, for scripts (imported on first use only)."""
    if name == "plt":
        with _matplotlib_folder():
            import matplotlib

            if "matplotlib.pyplot" not in sys.modules:
                matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        return plt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """``metrics.jsonl``: one JSON line per record of ``history``, rewritten atomically (a
    kill mid-write never leaves a cut line)."""
    atomic_write_text(path, "".join(json.dumps(h) + "\n" for h in history))


class RunLog:
    """Writes one JSON line per epoch (the whole history, atomically), mirrors scalars to
    TensorBoard, redraws the plot."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.plot_path = run_dir / "plot.png"
        self._tb: Any = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(tag, value, step)

    def epoch(self, record: dict[str, Any], history: list[dict[str, Any]],
              metrics: tuple[str, ...] = ()) -> None:
        """Write ``history`` (``record`` its last line) and mirror ``record``'s scalars, and
        those named in ``metrics`` (a method's own), to TensorBoard; redraw the plot."""
        if not self.enabled:
            return
        write_metrics(self.metrics_path, history)
        for key in ("loss", "acc1", "lr", "knn_top1", "images_per_s", "staleness_queue_loss",
                    "staleness_fresh_loss", *metrics):
            if record.get(key) is not None:
                self.scalar(f"epoch/{key}", float(record[key]), int(record["epoch"]))
        if self._tb is not None:
            self._tb.flush()
        plot_history(history, self.plot_path, baseline=record.get("knn_random_init"))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path, log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` ([] without the file). A line that is not a whole JSON
    record (cut by a kill mid-write on a file system where the atomic rename is not, or
    zero-filled) is left out, and ``log`` (default: a logging warning) says which."""
    if not path.is_file():
        return []
    records, bad = [], []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(i)
    if bad:
        lines = f"line {bad[0]} is" if len(bad) == 1 else f"lines {', '.join(map(str, bad))} are"
        (log or _log.warning)(f"warning: {path}: {lines} not a complete record (cut by a kill "
                              f"mid-write?): left out, {len(records)} record(s) kept")
    return records


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[Any], list[float]]:
    """The epochs and values of ``key`` in the records that have it."""
    pts = [(h["epoch"], float(h[key])) for h in history if h.get(key) is not None]
    return [e for e, _ in pts], [v for _, v in pts]


def _pretext_panel(ax1: Any, history: list[dict[str, Any]]) -> None:
    """Loss (and its chance level) and pretext acc@1 per epoch."""
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["loss"] for h in history], "o-", color="tab:blue", label="InfoNCE loss")
    chance = _series(history, "loss_chance")
    if chance[0]:
        ax1.plot(*chance, ":", color="tab:blue", label="chance level (untrained)")
        ax1.legend(loc="lower left", fontsize=8)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss", color="tab:blue")
    ax1b = ax1.twinx()
    ax1b.plot(*_series(history, "acc1"), "s--", color="tab:orange", label="pretext acc@1")
    ax1b.set_ylabel("pretext acc@1 (%)", color="tab:orange")
    ax1.set_title("pretext task")


def _accuracy_panel(ax2: Any, history: list[dict[str, Any]], baseline: float | None) -> None:
    """kNN top-1 and the online probe's top-1 per epoch, the untrained network's kNN."""
    knn, probe = _series(history, "knn_top1"), _series(history, "probe_top1")
    if knn[0]:
        ax2.plot(*knn, "o-", color="tab:green", label="kNN top-1")
    if probe[0]:
        ax2.plot(*probe, "^-", color="tab:purple", label="online linear probe top-1")
    if baseline is not None:
        ax2.axhline(baseline, color="gray", linestyle=":", label=f"random init ({baseline:.1f}%)")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("top-1 (%)")
    ax2.set_title("accuracy (labels)")
    if knn[0] or probe[0] or baseline is not None:
        ax2.legend(loc="lower right", fontsize=8)


def _health_panel(ax3: Any, history: list[dict[str, Any]]) -> None:
    """The label-free health signals per epoch: effective rank (left axis), std x sqrt(d)
    (right axis, 1 = spread, 0 = collapsed)."""
    dims = [h.get("health_dim") for h in history if h.get("health_dim")]
    ax3.plot(*_series(history, "health_rank"), "o-", color="tab:red",
             label=f"effective rank of {dims[-1]}-d embeddings" if dims else "effective rank")
    features = _series(history, "health_rank_features")
    if features[0]:
        ax3.plot(*features, "o--", color="tab:brown", label="effective rank of the features")
    ax3.set_xlabel("epoch")
    ax3.set_ylabel("effective rank (RankMe)", color="tab:red")
    ax3.set_ylim(bottom=0)
    ax3b = ax3.twinx()
    std = _series(history, "health_std_ratio")
    ax3b.plot(*std, "s:", color="tab:gray", label="std x sqrt(d) of the embeddings")
    ax3b.set_ylabel("std x sqrt(d) (1 spread, 0 collapsed)", color="tab:gray")
    ax3b.set_ylim(0, max([1.05, *std[1]]))
    handles = ax3.get_legend_handles_labels()
    more = ax3b.get_legend_handles_labels()
    ax3.legend(handles[0] + more[0], handles[1] + more[1], loc="lower left", fontsize=8)
    ax3.set_title("health (no labels)")


def plot_history(history: list[dict[str, Any]], path: Path, baseline: float | None = None) -> None:
    """Loss (with its chance level) and pretext acc@1 per epoch; kNN and online-probe top-1
    per epoch; and, when the records have them, the health signals per epoch (effective rank,
    std of the normalised embeddings: docs/monitoring.md)."""
    health = any(h.get("health_rank") is not None for h in history)
    fig = new_figure(figsize=(15 if health else 10, 4))
    axes = fig.subplots(1, 3 if health else 2)
    _pretext_panel(axes[0], history)
    _accuracy_panel(axes[1], history, baseline)
    if health:
        _health_panel(axes[2], history)
    fig.tight_layout()
    save_figure(fig, path)
