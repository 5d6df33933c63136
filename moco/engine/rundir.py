"""The run folder: which checkpoints it holds, their names and order, which one a run
resumes from, which ones are pruned, and the files written next to them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from moco.core.errors import RunError
from moco.utils.atomic import remove_stale_temporaries
from moco.utils.checkpoint import (
    CheckpointError,
    first_nonfinite,
    load_checkpoint,
    model_state,
)
from moco.utils.distributed import DistContext
from moco.utils.logs import Log
from moco.utils.runlock import RunLock

CHECKPOINT_GLOB = "checkpoint_*.pth.tar"


def existing_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run: its config, metrics or a checkpoint."""
    return any((run_dir / n).exists() for n in ("config.yaml", "metrics.jsonl")) or any(
        run_dir.glob(CHECKPOINT_GLOB))


def checkpoint_name(epoch: int, epoch_step: int) -> str:
    """The original's naming: the 0-based index of the epoch the state belongs to
    (``checkpoint_0003.pth.tar`` after 4 finished epochs), with the step inside the epoch when
    saved mid-epoch (``checkpoint_0004_step000010.pth.tar``)."""
    name = f"checkpoint_{max(epoch - 1, 0) if epoch_step == 0 else epoch:04d}"
    if epoch_step:
        name += f"_step{epoch_step:06d}"
    return f"{name}.pth.tar"


_CKPT_NAME = re.compile(r"checkpoint_(\d+)(?:_step(\d+))?\.pth\.tar$")


def checkpoint_age(p: Path) -> tuple[int, int, int]:
    """Sort key, oldest first: modification time, then the training position in the name (a
    tie-break for saves within one tick of a coarse file-system clock). ``checkpoint_0003``
    (0-based epoch 3 finished) is position (4, 0); ``checkpoint_0004_step000010`` is (4, 10)."""
    m = _CKPT_NAME.search(p.name)
    pos = (0, 0)
    if m:
        pos = (int(m[1]), int(m[2])) if m[2] is not None else (int(m[1]) + 1, 0)
    try:
        mtime = p.stat().st_mtime_ns
    except OSError:
        mtime = 0
    return mtime, *pos


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints in ``run_dir``, oldest first."""
    return sorted(run_dir.glob(CHECKPOINT_GLOB), key=checkpoint_age)


def resume_auto_choice(run_dir: Path, log: Log) -> tuple[Path, dict[str, Any]] | tuple[None, None]:
    """``--resume auto``'s checkpoint, loaded: the newest readable one (newer truncated or
    corrupt files are passed over, with a log line), or (None, None) when ``run_dir`` holds
    no checkpoint at all. A checkpoint that cannot be opened (permissions), a folder whose
    checkpoints all fail to load, or a newest one with NaN/Inf weights is a
    :class:`CheckpointError`: a run is never restarted from scratch over files that exist."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return None, None
    failures: list[str] = []
    for p in reversed(ckpts):
        if not os.access(p, os.R_OK):
            raise CheckpointError(f"--resume auto: cannot read {p} (permission denied); fix its "
                                  "permissions (chmod u+r) and run again; nothing was changed")
        try:
            ckpt = load_checkpoint(p)
        except CheckpointError as e:
            failures.append(str(e))
            log(f"--resume auto: skipping {p}: {e}")
            continue
        bad = first_nonfinite(model_state(ckpt, p)) if isinstance(ckpt.get("state_dict"), dict) else None
        if bad is not None:
            good, _ = newest_finite_checkpoint(run_dir)
            fix = f"resume from {good} with --resume {good}" if good else "start again"
            raise CheckpointError(f"--resume auto: the newest readable checkpoint {p} holds "
                                  f"NaN/Inf weights ({bad[0]}): the run had diverged; {fix}")
        return p, ckpt
    raise CheckpointError(
        f"--resume auto: cannot read any of the {len(ckpts)} checkpoint(s) in {run_dir} "
        f"({failures[0]}); nothing was changed: repair or move them away to start from "
        "scratch")


def newest_finite_checkpoint(run_dir: Path) -> tuple[Path | None, Path | None]:
    """(the newest checkpoint of ``run_dir`` that loads and whose weights are all finite,
    the newest checkpoint file): what a divergence message may call good."""
    ckpts = list_checkpoints(run_dir)
    for p in reversed(ckpts):
        try:
            ckpt = load_checkpoint(p)
            if first_nonfinite(model_state(ckpt, p)) is None:
                return p, ckpts[-1]
        except CheckpointError:
            continue
    return None, ckpts[-1] if ckpts else None


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint in ``run_dir`` that loads (``--resume auto``): a truncated or
    corrupt newer file is passed over for the previous valid one."""
    for p in reversed(list_checkpoints(run_dir)):
        try:
            load_checkpoint(p)
            return p
        except CheckpointError:
            continue
    return None


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, log: Log) -> RunLock:
    """Create ``run_dir`` (or check it is writable), take its lock (a second process is
    refused), refuse to write over a run unless resuming or ``overwrite``, remove temporaries
    left by a kill mid-save and, for ``overwrite``, the old run's checkpoints and logs."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to the output folder {run_dir}: {e.strerror}; "
                       "choose another --output") from None
    lock = RunLock(run_dir, log=log).acquire()
    if existing_run(run_dir) and not resume and not overwrite:
        lock.release()
        raise RunError(
            f"{run_dir} already holds a run; pass --resume auto to continue it, "
            "--overwrite to replace it, or choose another --output")
    for name in (CHECKPOINT_GLOB, "config.yaml", "metrics.jsonl", "plot.png"):
        remove_stale_temporaries(run_dir, name)  # left by a kill mid-write
    if existing_run(run_dir) and not resume:
        for p in (list(run_dir.glob(CHECKPOINT_GLOB)) + [run_dir / "metrics.jsonl"]
                  + list(run_dir.glob("tb/events.out.tfevents.*"))):
            p.unlink(missing_ok=True)
    return lock


def prune_checkpoints(run_dir: Path, keep_last: int, keep: Path | None) -> None:
    """Keep the newest ``keep_last`` checkpoints (0 keeps all) and ``keep``."""
    if keep_last <= 0:
        return
    for p in list_checkpoints(run_dir)[:-keep_last]:
        if p != keep:
            p.unlink(missing_ok=True)


def find_resume(resume: str, run_dir: Path, dist: DistContext,
                log: Log) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint ``--resume`` names, loaded, or None for ``auto`` in a folder without any
    checkpoint. Rank 0 picks the file of ``auto`` and every rank loads that one; an error
    reaches every rank."""
    ckpt: dict[str, Any] | None = None
    if resume == "auto":
        found: tuple[Path | None, str] = (None, "")
        if dist.is_main:
            try:
                path, ckpt = resume_auto_choice(run_dir, log)
                found = (path, "")
            except CheckpointError as e:
                found = (None, str(e))
        chosen, error = dist.broadcast_object(found)
        if error:
            raise CheckpointError(error)
        if chosen is None:
            return None
        path = chosen
    else:
        path = Path(resume)
    if ckpt is None:
        ckpt = load_checkpoint(path)
    return path, ckpt


def finite_checkpoint_advice(run_dir: Path) -> str:
    """Which checkpoint of a diverged run holds finite weights, and how to continue from it."""
    good, newest = newest_finite_checkpoint(run_dir)
    if good is None:
        return f"no checkpoint with finite weights was saved in {run_dir}"
    if good == newest:
        return (f"the newest checkpoint, {good}, has finite weights and is kept: "
                "continue with --resume auto")
    return (f"the newest checkpoint with finite weights is {good} ({newest} already "
            f"holds NaN/Inf): continue with --resume {good}")
