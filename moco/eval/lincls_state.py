"""What makes a ``moco lincls`` run impossible to lose: its run folder, atomic copies and the
choice of the checkpoint to resume (``--resume auto``); it stops on signals as pretraining
does (:mod:`moco.utils.signals`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from moco.core.errors import ConfigError
from moco.data.source import DataError
from moco.utils.atomic import atomic_path, atomic_write_text
from moco.utils.checkpoint import CheckpointError, load_checkpoint
from moco.utils.paths import same_file
from moco.utils.runlog import write_metrics

LAST = "checkpoint.pth.tar"
BEST = "model_best.pth.tar"


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through the one atomic write: ``dst`` is never half written
    (``model_best.pth.tar`` survives a kill or a full disk during the copy)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def resume_path(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` names: ``auto`` -> ``RUN/checkpoint.pth.tar`` when it exists
    (None otherwise: start from --pretrained), else the path itself."""
    if resume == "auto":
        p = run_dir / LAST
        return p if p.exists() else None
    return Path(resume) if resume else None


def read_linear_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by ``moco lincls`` (refuses a MoCo pretraining checkpoint)."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("state_dict"), dict) or "best_acc1" not in ckpt:
        raise CheckpointError(f"{path} is not a linear-classification checkpoint (no best_acc1); "
                              "pass a MoCo checkpoint as --pretrained instead")
    return ckpt


def check_resume_matches(ckpt: dict[str, Any], path: Path, pretrained: str,
                         classes: list[str]) -> None:
    """Refuse to continue or evaluate the linear checkpoint ``ckpt`` (read from ``path``) with
    another encoder than the one it was trained from (``pretrained``, when given) or on data
    whose classes are not the ones its ``fc`` scores. Checkpoints of the original
    ``main_lincls.py`` record neither and are not checked."""
    ours = ckpt.get("moco") or {}
    recorded = str(ours.get("pretrained") or "")
    if pretrained and recorded and not same_file(recorded, pretrained):
        raise ConfigError(f"--pretrained {pretrained} is not the encoder that {path} was trained "
                          f"from ({recorded}): leave --pretrained out (or give {recorded}) to "
                          "continue that run, or start a new one in another --output")
    saved = ours.get("classes")
    if saved is not None and [str(c) for c in saved] != list(classes):
        raise DataError(f"the data's classes are not the ones {path} was trained on "
                        f"({classes_differ(list(saved), list(classes))}): its fc would score "
                        "other classes; give the data it was trained on, or train a new "
                        "classifier in another --output")


def classes_differ(saved: list[str], found: list[str]) -> str:
    """What differs between the class names of a checkpoint and of the data, in a few words."""
    only_saved = [c for c in saved if c not in set(found)]
    only_found = [c for c in found if c not in set(saved)]
    parts = [f"{len(saved)} in the checkpoint vs {len(found)} in the data"]
    if only_saved:
        parts.append(f"{len(only_saved)} only in the checkpoint, e.g. {only_saved[0]!r}")
    if only_found:
        parts.append(f"{len(only_found)} only in the data, e.g. {only_found[0]!r}")
    if not only_saved and not only_found:
        parts.append("the same names in another order")
    return "; ".join(parts)


def prepare_run_dir(run_dir: Path, *, resuming: bool, start_epoch: int, overwrite: bool,
                    settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Create ``run_dir``; when resuming keep the metrics of the finished epochs (returned),
    else refuse a folder holding a run unless ``overwrite``. Writes ``lincls.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    kept: list[dict[str, Any]] = []
    if resuming:
        if metrics.exists():
            kept = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        kept = [h for h in kept if h.get("epoch", 0) <= start_epoch]
        write_metrics(metrics, kept)
    elif ((run_dir / LAST).exists() or metrics.exists()) and not overwrite:
        raise ConfigError(f"{run_dir} already holds a linear-classification run; pass --resume "
                         "auto to continue it, --overwrite to replace it, or choose another "
                         "--output")
    else:
        metrics.unlink(missing_ok=True)
        (run_dir / BEST).unlink(missing_ok=True)
    atomic_write_text(run_dir / "lincls.json", json.dumps(settings, indent=1) + "\n")
    return kept
