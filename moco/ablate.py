"""``moco ablate``: train the runs of a grid one after the other (resumable run by run),
measure the mechanisms' cost per step, then write the report (MoCo v1 §4.1 / App. A.9,
MoCo v2 Tables 1-3; REFERENCE.md §3.1, §10). The grid file format is in
:mod:`moco.ablation_grid`, the report in :mod:`moco.ablation_report`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moco.ablation_grid import (
    FAILED_MARKER,
    IGNORED_WHEN_COMPARING,
    AblationError,
    AblationSpec,
    RunSpec,
    default_output,
    run_config,
    run_status,
    settings_mismatch,
)
from moco.ablation_report import write_report
from moco.config import MocoConfig
from moco.step_cost import measure_isolated, measure_step_cost

Log = Callable[[str], None]



@dataclass
class RunOutcome:
    name: str
    status: str  # done | failed | partial | new | stopped
    message: str = ""


def run_grid(
    spec: AblationSpec,
    output: Path,
    *,
    overrides: dict[str, Any] | None = None,
    only: Sequence[str] | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    progress: bool = True,
    log: Log = print,
) -> list[RunOutcome]:
    """Train every run of ``spec`` that is not finished yet, one after the other.

    Every run's settings are validated before the first one starts. A finished run is
    skipped; an interrupted one resumed (``resume=auto``); a run whose folder holds a run
    with other settings is refused unless ``overwrite``. A run that stops with a
    :class:`~moco.train.RunError` (e.g. the loss became NaN) is recorded in
    ``FAILED.txt`` and the grid goes on. A signal (Ctrl-C) stops the grid after the
    current run has checkpointed; re-running the same command continues it.
    """
    from moco.train import RunError, pretrain

    runs = [r for r in spec.runs if not only or r.name in only]
    if only:
        missing = sorted(set(only) - {r.name for r in spec.runs})
        if missing:
            raise AblationError(f"--only: no run named {missing}; runs: {[r.name for r in spec.runs]}")
    plans = []
    for r in runs:
        run_dir = output / r.name
        cfg = run_config(spec, r, run_dir, overrides)
        try:
            cfg.validate()
        except ValueError as e:
            raise AblationError(f"run {r.name}: {e}") from None
        status = run_status(run_dir, cfg.epochs)
        diffs = settings_mismatch(run_dir, cfg) if status != "new" else []
        if diffs and not overwrite:
            raise AblationError(
                f"{run_dir} holds a run with other settings ({'; '.join(diffs)}); delete that "
                "folder, choose another --output, or pass --overwrite to retrain it")
        plans.append((r, run_dir, cfg, status, bool(diffs)))
    outcomes = []
    for i, (r, run_dir, cfg, status, changed) in enumerate(plans):
        head = f"[{spec.name} {i + 1}/{len(plans)} {r.name}]"
        fresh = changed or (status == "failed" and retry_failed)
        if status == "done" and not fresh:
            log(f"{head} finished earlier: skipped")
            outcomes.append(RunOutcome(r.name, "done"))
            continue
        if status == "failed" and not fresh:
            msg = (run_dir / FAILED_MARKER).read_text().strip()
            log(f"{head} failed earlier ({msg.splitlines()[0] if msg else ''}): skipped "
                "(--retry-failed to run it again)")
            outcomes.append(RunOutcome(r.name, "failed", msg))
            continue
        if fresh:
            (run_dir / FAILED_MARKER).unlink(missing_ok=True)
            log(f"{head} training from scratch")
        elif status == "partial":
            cfg = dataclasses.replace(cfg, resume="auto")
            log(f"{head} resuming")
        else:
            log(f"{head} training")
        def run_log(msg: str, head: str = head) -> None:
            log(f"{head} {msg}")

        try:
            result = pretrain(cfg, log=run_log, progress=progress, overwrite=fresh)
        except RunError as e:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / FAILED_MARKER).write_text(str(e) + "\n")
            log(f"{head} FAILED: {e}")
            outcomes.append(RunOutcome(r.name, "failed", str(e)))
            continue
        if result.stopped_early:
            log(f"{head} stopped; re-run the same command to continue the grid")
            outcomes.append(RunOutcome(r.name, "stopped"))
            return outcomes
        outcomes.append(RunOutcome(r.name, "done"))
    return outcomes



def _train_size(cfg: MocoConfig) -> int:
    from moco.data import find_dataset

    if cfg.train_subset:
        return int(cfg.train_subset)
    try:
        return len(find_dataset(cfg.data).train)
    except ValueError:
        return 50000


def run_cost(spec: AblationSpec, output: Path, *, overrides: dict[str, Any] | None = None,
             log: Log = print) -> list[dict[str, Any]]:
    """Measure every (mechanism, batch size) of ``spec.cost``; results cached in cost.json
    (a point is measured again only if its settings changed or it failed)."""
    assert spec.cost is not None
    c = spec.cost
    path = output / "cost.json"
    cached: dict[str, dict[str, Any]] = {}
    if path.is_file():
        try:
            cached = {p["key"]: p for p in json.loads(path.read_text()).get("points", [])}
        except (ValueError, KeyError, TypeError):
            cached = {}
    base_run = RunSpec("cost", dict(c.settings))
    points = []
    for mech in c.mechanisms:
        for b in c.batch_sizes:
            cfg = run_config(spec, base_run, output / "cost", {**(overrides or {}),
                             "mechanism": mech, "batch_size": b})
            if cfg.moco_k < b and mech == "moco":
                cfg = dataclasses.replace(cfg, moco_k=b)
            key = json.dumps({k: v for k, v in cfg.to_dict().items()
                              if k not in IGNORED_WHEN_COMPARING} | {"steps": c.steps,
                             "warmup": c.warmup}, sort_keys=True, default=str)
            if key in cached and "error" not in cached[key]:
                points.append(cached[key])
                continue
            n = _train_size(cfg)
            log(f"[{spec.name} cost] {mech}, batch {b}: {c.warmup} + {c.steps} steps")
            r = (measure_isolated(cfg, n, c.steps, c.warmup) if c.isolate
                 else measure_step_cost(cfg, n, c.steps, c.warmup))
            r["key"] = key
            if "error" in r:
                log(f"[{spec.name} cost] {mech}, batch {b}: {r['error']}")
            points.append(r)
            output.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"points": points}, indent=1) + "\n")
    output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"points": points}, indent=1) + "\n")
    return points




def ablate(
    spec: AblationSpec,
    output: Path | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    only: Sequence[str] | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    cost: bool = True,
    cost_only: bool = False,
    report_only: bool = False,
    progress: bool = True,
    log: Log = print,
) -> tuple[Path, list[RunOutcome]]:
    """Train the grid (skipping finished runs), measure the cost points, write the report.
    ``cost_only``: measure the cost points without training; ``report_only``: neither.
    Returns results.md's path and what happened to each run."""
    out = output if output is not None else default_output(spec)
    outcomes: list[RunOutcome] = []
    if cost_only and not report_only:
        if spec.cost is None:
            raise AblationError(f"grid {spec.name} has no 'cost:' section to measure")
        run_cost(spec, out, overrides=overrides, log=log)
    elif not report_only:
        outcomes = run_grid(spec, out, overrides=overrides, only=only, overwrite=overwrite,
                            retry_failed=retry_failed, progress=progress, log=log)
        stopped = any(o.status == "stopped" for o in outcomes)
        if cost and spec.cost is not None and not stopped and not only:
            run_cost(spec, out, overrides=overrides, log=log)
    return write_report(spec, out, overrides=overrides), outcomes
