"""Does the fast pipeline learn as well? Two pretraining runs that differ only in ``--loader``
(``tensor``: decoded cache + batched augmentation; ``pil``: the original per-image recipe),
then their loss, pretext accuracy and kNN accuracy per epoch side by side.

Everything else is the same: config, seed (weights, data order), model. Only the random
augmentation draws differ (same distributions, different streams), so the curves should agree
within the seed-to-seed spread; ``--seeds 0,1`` runs each pipeline twice to show that spread.

    # on a GPU (about 20 min for both at 100 epochs of the CIFAR-10 demo recipe):
    .venv/bin/python benchmarks/compare_pipelines.py --out runs/compare -- \\
        --preset cifar10 --epochs 100 --knn-every 5
    # on 2 CPU cores (about 1 h for both): the make-demo settings, full train set, 30 epochs
    .venv/bin/python benchmarks/compare_pipelines.py --out runs/compare-cpu -- \\
        --config configs/demo.yaml --train-subset 0 --epochs 30 --knn-every 5
    # the first 6 epochs of the README's longer CPU run, PIL arm only, next to that run
    # (linked as tensor-seed0): about 25 min on 2 CPU cores
    mkdir -p runs/compare-long && ln -s ../long-cpu runs/compare-long/tensor-seed0
    .venv/bin/python benchmarks/compare_pipelines.py --out runs/compare-long --loaders pil \\
        --stop-after-epochs 6 -- --config configs/long-cpu.yaml
    # only print the table of runs already made
    .venv/bin/python benchmarks/compare_pipelines.py --out runs/compare --report

A pipeline "learns as well" when its loss and pretext-accuracy curves lie within the spread
of the other's seeds and its final kNN top-1 is equal within that spread, after a run long
enough to pass the untrained network's kNN (about 35-37 % for a ResNet-18 on this CIFAR-10
copy, by the notes that come with the data set).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LOADERS = ("tensor", "pil")


def read(run: Path) -> list[dict[str, Any]]:
    f = run / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def fmt(v: float | None, spec: str) -> str:
    return format(v, spec) if v is not None else "-"


def report(out: Path, seeds: list[int], epochs_limit: int = 0) -> int:
    """Print the per-epoch table; ``epochs_limit`` > 0 compares only the first epochs."""
    runs = {(ld, s): read(out / f"{ld}-seed{s}")[:epochs_limit or None] for ld in LOADERS for s in seeds}
    names = [f"{ld}/s{s}" for ld in LOADERS for s in seeds]
    epochs = max((len(h) for h in runs.values()), default=0)
    if not epochs:
        print(f"no metrics in {out}", file=sys.stderr)
        return 1
    for key, label, spec in (("loss", "loss", ".4f"), ("acc1", "pretext acc@1 %", ".1f"),
                             ("knn_top1", "kNN top-1 %", ".2f"), ("images_per_s", "images/s", ".0f")):
        print(f"\n{label}")
        print("epoch " + "".join(f"{n:>14s}" for n in names))
        for e in range(epochs):
            row = []
            for ld in LOADERS:
                for s in seeds:
                    h = runs[(ld, s)]
                    row.append(fmt(h[e].get(key), spec) if e < len(h) else "")
            if key == "knn_top1" and all(v in ("-", "") for v in row):
                continue
            print(f"{e + 1:5d} " + "".join(f"{v:>14s}" for v in row))
    init = [h[0].get("knn_random_init") for h in runs.values() if h]
    finals = {n: h[-1].get("knn_top1") for n, h in zip(names, runs.values(), strict=True) if h}
    print(f"\nkNN of the untrained network: {', '.join(fmt(v, '.2f') for v in init)}")
    print("final kNN top-1: " + ", ".join(f"{n} {fmt(v, '.2f')}" for n, v in finals.items()))
    return 0


def train(cmd: list[str], run: Path, stop_after: int) -> int:
    """Run ``moco pretrain``; with ``stop_after`` > 0, SIGTERM it once that many epochs are
    logged (it saves a checkpoint and exits; ``--resume auto`` continues the same schedule)."""
    proc = subprocess.Popen(cmd)
    while stop_after and proc.poll() is None:
        if len(read(run)) >= stop_after:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(2)
    rc = proc.wait()
    return 0 if stop_after and len(read(run)) >= stop_after else rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/compare", help="parent folder of the runs")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, each run with both loaders")
    ap.add_argument("--report", action="store_true", help="only print the table")
    ap.add_argument("--loaders", default=",".join(LOADERS),
                    help="which pipelines to train now (default both; the report shows both)")
    ap.add_argument("--stop-after-epochs", type=int, default=0, metavar="N",
                    help="stop each run after N epochs of its schedule (0: run to --epochs)")
    ap.add_argument("flags", nargs=argparse.REMAINDER, help="-- then flags for moco pretrain")
    args = ap.parse_args()
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    flags = [f for f in args.flags if f != "--"]
    if not args.report:
        for s in seeds:
            for ld in args.loaders.split(","):
                run = out / f"{ld}-seed{s}"
                cmd = [sys.executable, "-m", "moco", "pretrain", *flags, "--loader", ld,
                       "--seed", str(s), "--output", str(run), "--no-progress"]
                cmd += ["--resume", "auto"] if (run / "config.yaml").exists() else []
                print("+", " ".join(cmd), flush=True)
                if train(cmd, run, args.stop_after_epochs):
                    return 1
    return report(out, seeds, args.stop_after_epochs)


if __name__ == "__main__":
    raise SystemExit(main())
