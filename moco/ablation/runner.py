"""The runs of a grid trained one after the other, resumable run by run: each run's settings
checked and its folder's state read before the first one starts (:func:`plan_runs`), finished
runs skipped, interrupted ones resumed, failed ones recorded."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moco.ablation.check import Datasets, check_data, check_settings
from moco.ablation.grid import (
    FAILED_MARKER,
    AblationError,
    AblationSpec,
    RunSpec,
    run_status,
    settings_mismatch,
)
from moco.core.errors import RunError
from moco.engine.config import MocoConfig
from moco.utils.atomic import atomic_write_text
from moco.utils.logs import Log

_log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    name: str
    status: str  # done | failed | partial | new | stopped
    message: str = ""


@dataclass
class RunPlan:
    """A run to train or skip, checked before the first run of the grid starts."""

    run: RunSpec
    run_dir: Path
    cfg: MocoConfig
    status: str
    changed: bool  # the folder holds a run with other settings (retrained with overwrite)
    fresh: bool = False  # trained from scratch: changed, or a failed run retried

    @property
    def trains(self) -> bool:
        """Whether the grid trains this run (else it is skipped: finished, or failed earlier)."""
        return self.fresh or self.status not in ("done", "failed")


def plan_runs(spec: AblationSpec, output: Path, overrides: dict[str, Any] | None = None,
              only: Sequence[str] | None = None, overwrite: bool = False,
              retry_failed: bool = False) -> list[RunPlan]:
    """The selected runs (``only``; default: all) with their folders' state, after the whole
    grid is checked: every run's settings, and the data of each run that is to train
    (:mod:`moco.ablation.check`), so that a grid with a bad run fails before the first run
    starts."""
    if only:
        missing = sorted(set(only) - {r.name for r in spec.runs})
        if missing:
            raise AblationError(f"--only: no run named {missing}; runs: {[r.name for r in spec.runs]}")
    configs = {r.name: check_settings(spec, r, output / r.name, overrides) for r in spec.runs}
    plans = [_plan(r, output / r.name, configs[r.name], overwrite, retry_failed)
             for r in spec.runs if not only or r.name in only]
    datasets: Datasets = {}
    for plan in plans:
        if plan.trains:
            check_data(spec, plan.run, plan.cfg, output, overrides=overrides, datasets=datasets)
    return plans


def _plan(run: RunSpec, run_dir: Path, cfg: MocoConfig, overwrite: bool,
          retry_failed: bool) -> RunPlan:
    """What the grid does with ``run``: its folder's state, and whether it retrains it."""
    status = run_status(run_dir, cfg.epochs)
    diffs = settings_mismatch(run_dir, cfg) if status != "new" else []
    if diffs and not overwrite:
        raise AblationError(
            f"{run_dir} holds a run with other settings ({'; '.join(diffs)}); delete that "
            "folder, choose another --output, or pass --overwrite to retrain it")
    fresh = bool(diffs) or (status == "failed" and retry_failed)
    return RunPlan(run, run_dir, cfg, status, bool(diffs), fresh)


def run_grid(
    spec: AblationSpec,
    output: Path,
    *,
    overrides: dict[str, Any] | None = None,
    only: Sequence[str] | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    progress: bool = True,
    log: Log = _log.info,
) -> list[RunOutcome]:
    """Train every run of ``spec`` that is not finished yet, one after the other.

    The whole grid is checked before the first run starts (:func:`plan_runs`). A finished run is
    skipped; an interrupted one resumed (``resume=auto``); a run whose folder holds a run
    with other settings is refused unless ``overwrite``. A run that stops with a
    :class:`~moco.core.errors.RunError` (e.g. the loss became NaN) is recorded in
    ``FAILED.txt`` and the grid goes on. A signal (Ctrl-C) stops the grid after the
    current run has checkpointed; re-running the same command continues it.
    """
    plans = plan_runs(spec, output, overrides, only, overwrite, retry_failed)
    outcomes = []
    for i, plan in enumerate(plans):
        head = f"[{spec.name} {i + 1}/{len(plans)} {plan.run.name}]"
        outcome = train_run(plan, head, progress, log) if plan.trains else _skip_run(plan, head, log)
        outcomes.append(outcome)
        if outcome.status == "stopped":
            break
    return outcomes


def _skip_run(plan: RunPlan, head: str, log: Log) -> RunOutcome:
    """A run finished earlier, or failed earlier and not retried."""
    if plan.status == "done":
        log(f"{head} finished earlier: skipped")
        return RunOutcome(plan.run.name, "done")
    msg = (plan.run_dir / FAILED_MARKER).read_text().strip()
    log(f"{head} failed earlier ({msg.splitlines()[0] if msg else ''}): skipped "
        "(--retry-failed to run it again)")
    return RunOutcome(plan.run.name, "failed", msg)


def train_run(plan: RunPlan, head: str, progress: bool, log: Log) -> RunOutcome:
    """Train one run of the grid: from scratch, resumed, or new; a training error (the loss
    became NaN) is recorded in its ``FAILED.txt``. ``head`` starts each of its log lines."""
    from moco.engine.loop import pretrain

    cfg = plan.cfg
    if plan.fresh:
        (plan.run_dir / FAILED_MARKER).unlink(missing_ok=True)
        log(f"{head} training from scratch")
    elif plan.status == "partial":
        cfg = dataclasses.replace(cfg, resume="auto")
        log(f"{head} resuming")
    else:
        log(f"{head} training")

    def run_log(msg: str) -> None:
        log(f"{head} {msg}")

    try:
        result = pretrain(cfg, log=run_log, progress=progress, overwrite=plan.fresh)
    except RunError as e:
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(plan.run_dir / FAILED_MARKER, str(e) + "\n")
        log(f"{head} FAILED: {e}")
        return RunOutcome(plan.run.name, "failed", str(e))
    if result.stopped_early:
        log(f"{head} stopped; re-run the same command to continue the grid")
        return RunOutcome(plan.run.name, "stopped")
    return RunOutcome(plan.run.name, "done")
