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


def plot_history(history: list[dict[str, Any]], path: Path, baseline: float | None = None) -> None:
    """Loss and pretext acc@1 per epoch (left), kNN top-1 per epoch (right)."""
    fig = new_figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["loss"] for h in history], "o-", color="tab:blue", label="InfoNCE loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss", color="tab:blue")
    ax1b = ax1.twinx()
    acc = [(h["epoch"], h["acc1"]) for h in history if h.get("acc1") is not None]
    ax1b.plot([e for e, _ in acc], [a for _, a in acc], "s--", color="tab:orange",
              label="pretext acc@1")
    ax1b.set_ylabel("pretext acc@1 (%)", color="tab:orange")
    ax1.set_title("pretext task")
    knn = [(h["epoch"], h["knn_top1"]) for h in history if h.get("knn_top1") is not None]
    if knn:
        ax2.plot([e for e, _ in knn], [a for _, a in knn], "o-", color="tab:green", label="MoCo")
    if baseline is not None:
        ax2.axhline(baseline, color="gray", linestyle=":", label=f"random init ({baseline:.1f}%)")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("kNN top-1 (%)")
    ax2.set_title("kNN accuracy")
    if knn or baseline is not None:
        ax2.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
