"""``moco ablate``: train the runs of a grid (resumable run by run, one at a time or several
at once), measure the mechanisms' cost per step, then write the report (MoCo v1 §4.1 / App.
A.9, MoCo v2 Tables 1-3). The grid file format is in :mod:`moco.ablation.grid`, the runs in
:mod:`moco.ablation.runner` and :mod:`moco.ablation.jobs`, the report in
:mod:`moco.ablation.report`."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moco.ablation.grid import (
    IGNORED_WHEN_COMPARING,
    AblationError,
    AblationSpec,
    RunSpec,
    default_output,
    run_config,
)
from moco.ablation.jobs import run_grid_jobs
from moco.ablation.report import write_report
from moco.ablation.runner import RunOutcome, RunPlan, plan_runs, run_grid
from moco.ablation.step_cost import measure_isolated, measure_step_cost
from moco.engine.config import MocoConfig
from moco.utils.atomic import atomic_write_text
from moco.utils.logs import Log

__all__ = ["AblateOptions", "RunOutcome", "RunPlan", "ablate", "plan_runs", "run_cost", "run_grid",
           "run_grid_jobs", "train_grid"]

_log = logging.getLogger(__name__)


def _train_size(cfg: MocoConfig) -> int:
    from moco.data.splits import find_dataset

    if cfg.train_subset:
        return int(cfg.train_subset)
    try:
        return len(find_dataset(cfg.data).train)
    except ValueError:
        return 50000


def run_cost(spec: AblationSpec, output: Path, *, overrides: dict[str, Any] | None = None,
             log: Log = _log.info) -> list[dict[str, Any]]:
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
            atomic_write_text(path, json.dumps({"points": points}, indent=1) + "\n")
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"points": points}, indent=1) + "\n")
    return points




@dataclass
class AblateOptions:
    """What :func:`ablate` does with a grid (the flags of ``moco ablate``).

    ``overrides``: settings over every run's (``--set``); ``only``: train only these runs (no
    cost measurement); ``overwrite``: retrain runs whose folder holds other settings;
    ``retry_failed``: train again runs that failed earlier; ``cost``: measure the cost points
    after training; ``cost_only``: measure them without training; ``report_only``: neither;
    ``jobs``: runs trained at once (:func:`run_grid_jobs`); ``progress``: progress bars.
    """

    overrides: dict[str, Any] | None = None
    only: Sequence[str] | None = None
    overwrite: bool = False
    retry_failed: bool = False
    cost: bool = True
    cost_only: bool = False
    report_only: bool = False
    jobs: int = 1
    progress: bool = True


def ablate(spec: AblationSpec, output: Path | None = None, options: AblateOptions | None = None,
           *, log: Log = _log.info) -> tuple[Path, list[RunOutcome]]:
    """Train the grid (skipping finished runs), measure the cost points, write the report, as
    ``options`` say. Returns results.md's path and what happened to each run."""
    opts = options if options is not None else AblateOptions()
    if opts.jobs < 1:
        raise AblationError(f"--jobs must be at least 1, got {opts.jobs}")
    out = output if output is not None else default_output(spec)
    outcomes: list[RunOutcome] = []
    if opts.cost_only and not opts.report_only:
        if spec.cost is None:
            raise AblationError(f"grid {spec.name} has no 'cost:' section to measure")
        run_cost(spec, out, overrides=opts.overrides, log=log)
    elif not opts.report_only:
        outcomes = train_grid(spec, out, opts, log)
    return write_report(spec, out, overrides=opts.overrides), outcomes


def train_grid(spec: AblationSpec, output: Path, opts: AblateOptions,
               log: Log = _log.info) -> list[RunOutcome]:
    """Train the grid's runs (``opts.jobs`` at once), then measure its cost points unless the
    grid stopped, only some runs were asked for, or ``opts.cost`` is off."""
    if opts.jobs > 1:
        outcomes = run_grid_jobs(spec, output, jobs=opts.jobs, overrides=opts.overrides,
                                 only=opts.only, overwrite=opts.overwrite,
                                 retry_failed=opts.retry_failed, log=log)
    else:
        outcomes = run_grid(spec, output, overrides=opts.overrides, only=opts.only,
                            overwrite=opts.overwrite, retry_failed=opts.retry_failed,
                            progress=opts.progress, log=log)
    stopped = any(o.status == "stopped" for o in outcomes)
    if opts.cost and spec.cost is not None and not stopped and not opts.only:
        run_cost(spec, output, overrides=opts.overrides, log=log)
    return outcomes
