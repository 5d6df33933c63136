"""What an ablation grid's report needs from each run folder: its settings, state and
metrics per epoch (metrics.jsonl)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moco.ablation.grid import FAILED_MARKER, AblationSpec, run_config, run_status
from moco.utils.runlog import read_metrics


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
