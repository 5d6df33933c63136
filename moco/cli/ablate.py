"""``moco ablate GRID.yaml``: train a grid of pretraining runs that differ in one or two
settings, then write results.md (table) and PNG plots (``moco/ablation/ablate.py``; the grid file
format: ``moco/ablation/grid.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from moco.utils.settings import NoAliasLoader


def _setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as YAML (``true``, ``0.1``, ``[1, 2]``); the value is
    checked against the setting's declaration in :func:`run`."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.load(value, Loader=NoAliasLoader)  # noqa: S506 - safe loader
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None


def add_parser(sub: Any) -> None:
    from moco.cli import COMMANDS

    p = sub.add_parser(
        "ablate", help=COMMANDS["ablate"],
        description="Train every run of a grid file (the papers' grids are in "
        "moco/configs/ablations/, installed with moco), each in its own "
        "sub-folder of the output folder, then write results.md and PNG plots. Resumable: "
        "finished runs are skipped and an interrupted run is resumed, so re-running the same "
        "command continues the grid.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("grid", metavar="GRID.yaml", help="grid file: base settings, grid/runs, cost")
    p.add_argument("--output", help="folder of the grid (default: the file's 'output:', else "
                   "runs/ablations/<name>)")
    p.add_argument("--data", help="dataset folder, overriding the grid's base 'data:'")
    p.add_argument("--set", dest="settings", type=_setting, action="append", default=[],
                   metavar="KEY=VALUE", help="override a base setting for every run (YAML value), "
                   "e.g. --set epochs=2 --set train_subset=1000; repeatable")
    p.add_argument("--only", nargs="+", metavar="RUN", help="train only these runs (no cost "
                   "measurement); the report still lists every run")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="train up to N runs at once, "
                   "each in its own process (on a CPU with cores/N torch threads unless "
                   "OMP_NUM_THREADS is set)")
    p.add_argument("--list", action="store_true", help="list the runs and their state, train nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite results.md and the plots "
                   "from the run folders, train nothing")
    p.add_argument("--no-cost", action="store_true", help="skip the memory/time-per-step measurement")
    p.add_argument("--cost-only", action="store_true", help="only measure memory/time per step "
                   "(the grid's 'cost:' section) and write the report; train nothing")
    p.add_argument("--overwrite", action="store_true", help="retrain runs whose folder holds a run "
                   "with other settings (otherwise refused)")
    p.add_argument("--retry-failed", action="store_true", help="train again runs that failed "
                   "(diverged) earlier; by default they are kept as failed")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moco.ablation.ablate import AblateOptions, ablate
    from moco.ablation.grid import (
        check_set_values,
        default_output,
        fmt_value,
        load_spec,
        run_config,
        run_status,
    )

    spec = load_spec(args.grid)
    overrides = check_set_values(dict(args.settings))
    if args.data:
        overrides["data"] = args.data
    output = Path(args.output) if args.output else default_output(spec)
    if args.list:
        for r in spec.runs:
            cfg = run_config(spec, r, output / r.name, overrides)
            settings = ", ".join(f"{k}={fmt_value(v)}" for k, v in r.settings.items())
            print(f"{r.name:32s} {run_status(output / r.name, cfg.epochs):8s} {settings}")
        if spec.cost is not None:
            print(f"cost: {spec.cost.mechanisms} x batch {spec.cost.batch_sizes}, "
                  f"{spec.cost.steps} steps each")
        return 0
    report, outcomes = ablate(spec, output, AblateOptions(
        overrides=overrides, only=args.only, overwrite=args.overwrite,
        retry_failed=args.retry_failed, cost=not args.no_cost, cost_only=args.cost_only,
        report_only=args.report_only, jobs=args.jobs, progress=not args.no_progress), log=print)
    print(f"results: {report}")
    if any(o.status == "stopped" for o in outcomes):
        print(f"stopped: re-run 'moco ablate {args.grid}' (same options) to continue")
        return 130
    failed = [o.name for o in outcomes if o.status == "failed"]
    if failed:
        print(f"failed runs (kept in the table): {', '.join(failed)}")
    return 0
