"""The prepared device check of issue 15: ``make gpu-check`` (one GPU, at most 8 minutes).

Prints, in this order, and writes to one folder (``--out``, default runs/gpu-check):

1. the CUDA test tier's summary (``pytest -m cuda``): every command end to end on the GPU;
2. a throughput table, pairs/s end to end and model-only and their ratio, for ResNet-18 (CIFAR
   stem, 32 px, batch 512, the CIFAR-10 recipe) from the packed CIFAR-10 JPEGs and ResNet-50
   (224 px, batch 256, the MoCo v2 recipe) from synthetic ~500x375 JPEGs made here, decoded
   by the pipeline ``moco pretrain`` picks for them;
3. a learning check: ``moco pretrain --preset cifar10`` exactly, stopped (``--time-limit``)
   after as many epochs as fit in the minutes left, with each epoch's kNN next to the
   authors' log at the same number of image pairs seen (``moco.eval.authors_log``).

The GPU machine has no network and no venv: its python3 runs the repository with
``PYTHONPATH=.``; the data and pytest come in the folder ``scripts/pack_cifar_subset.py``
fills (gpu-pack/, carried with the working tree). ``--dry-run`` runs the same steps on the CPU
with tiny sizes (under 2 minutes; CI runs it), so the script is known to work before GPU time
is spent on it.

    make gpu-check                 # on the GPU machine
    make gpu-check DRY_RUN=1       # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / "gpu-pack"
sys.path.insert(0, str(ROOT))

THROUGHPUT_TARGET = 15_000  # pairs/s, ResNet-18 CIFAR stem, H100/H200 bf16 (issue 15)


class Report:
    """Prints each line and appends it to OUT/report.txt."""

    def __init__(self, out: Path) -> None:
        self.path = out / "report.txt"
        self.path.write_text("")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (CI)")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu-check"), help="output folder")
    p.add_argument("--work", default="", help="folder for the generated JPEGs, the extracted "
                   "CIFAR subset and the decoded caches (default OUT/work)")
    p.add_argument("--budget-min", type=float, default=None,
                   help="minutes for the whole check (default 8; dry run 2)")
    p.add_argument("--cifar", default="", help="CIFAR-10 ImageFolder (or the .tar.gz made by "
                   "scripts/pack_cifar_subset.py); default gpu-pack/cifar10-subset.tar.gz, else $MOCO_DATA")
    p.add_argument("--skip-tests", action="store_true", help="skip the CUDA test tier")
    return p.parse_args(argv)


# ----- data ---------------------------------------------------------------------------------

def _jpeg(args: tuple[Path, int, int, int]) -> None:
    import numpy as np
    from PIL import Image

    path, w, h, seed = args
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)[None, None] * (0.5 + 0.5 * np.sin(xx[..., None] / rng.uniform(5, 40)
                                                 + yy[..., None] / rng.uniform(5, 40)))
    img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)


def synthetic_jpegs(root: Path, n: int, size: tuple[int, int], classes: int = 4,
                    test: int = 0) -> Path:
    """ImageFolder of ``n`` random-content JPEGs of ``size`` (w, h) in ``classes`` classes
    (and ``test`` test images), made with every core."""
    from multiprocessing import Pool

    jobs = []
    for split, count in (("train", n), ("test", test)):
        for i in range(count):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            jobs.append((d / f"{i:05d}.jpg", size[0], size[1], i + (10**6 if split == "test" else 0)))
    with Pool(os.cpu_count() or 1) as pool:
        pool.map(_jpeg, jobs, chunksize=16)
    return root


def cifar_data(args: argparse.Namespace, work: Path) -> Path:
    """The CIFAR-10 (subset) folder: --cifar, the packed tar (extracted into WORK), $MOCO_DATA."""
    src = Path(args.cifar) if args.cifar else PACK / "cifar10-subset.tar.gz"
    if not src.exists() and not args.cifar and os.environ.get("MOCO_DATA"):
        src = Path(os.environ["MOCO_DATA"])
    if src.is_dir():
        return src
    if src.is_file() and src.name.endswith((".tar", ".tar.gz")):
        dest = work / "cifar10-subset"
        if not (dest / "train").is_dir():
            with tarfile.open(src) as tar:
                tar.extractall(work, filter="data")
        return dest
    raise SystemExit(f"no CIFAR-10 data at {src}: run scripts/pack_cifar_subset.py (or pass --cifar)")


# ----- 1. the CUDA tier -------------------------------------------------------------------------

def cuda_tests(report: Report, out: Path, timeout_s: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(PACK / "site-packages"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", "tests"]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout_s)
        text, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = f"{e.stdout or ''}\nTIMEOUT after {timeout_s:.0f} s", -1
    (out / "cuda_tests.txt").write_text(text)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    summary = lines[-1] if lines else "no output"
    if "No module named pytest" in text:
        summary = "pytest is not installed here: run scripts/pack_cifar_subset.py, which packs it"
    report(f"== 1. CUDA tests (pytest -m cuda, {time.perf_counter() - t0:.0f} s): {summary}")
    for ln in lines:
        if ln.startswith(("FAILED", "ERROR")):
            report(f"   {ln[:200]}")
    return {"summary": summary, "returncode": rc, "seconds": time.perf_counter() - t0}


# ----- 2. throughput ----------------------------------------------------------------------------

def throughput(report: Report, out: Path, work: Path, cifar: Path, dry: bool) -> list[dict[str, Any]]:
    from benchmarks.throughput import pairs_per_second
    from moco.data.splits import find_dataset
    from moco.engine.config_sources import build_config
    from moco.utils.runtime import default_workers, resolve_device

    device = "cpu" if dry else "cuda"
    workers = default_workers(resolve_device(device))
    steps, warmup = (2, 1) if dry else (20, 5)
    jpegs = synthetic_jpegs(work / "synthetic-500x375", 16 if dry else 256 * (2 * warmup + steps + 2),
                            (80, 60) if dry else (500, 375))
    rows = []
    setups = [
        ("ResNet-18 CIFAR stem, 32 px, batch 512", "cifar10", cifar,
         dict(batch_size=8 if dry else 512, moco_k=32 if dry else 4096, bn_splits=2 if dry else 8)),
        ("ResNet-50, 224 px, batch 256, JPEG ~500x375", "mocov2", jpegs,
         dict(arch="resnet18" if dry else "resnet50", image_size=48 if dry else 224,
              batch_size=4 if dry else 256, moco_k=32 if dry else 65536,
              bn_splits=2 if dry else 8)),
    ]
    report(f"== 2. throughput ({device}; pairs/s; {warmup} warm-up + {steps} timed steps; "
           f"{'dry run: tiny sizes, not the named ones' if dry else 'the named sizes'})")
    report(f"   {'setup':44s} {'end to end':>11s} {'model only':>11s} {'ratio':>6s}  loader, precision")
    for name, preset, data, over in setups:
        cfg = build_config(preset=preset, overrides=dict(data=str(data), device=device, **over))
        source = find_dataset(data).train
        t0 = time.perf_counter()
        r = pairs_per_second(cfg, source, steps=steps, warmup=warmup, workers=workers)
        r.update(setup=name, seconds=time.perf_counter() - t0, batch=cfg.batch_size, arch=cfg.arch)
        rows.append(r)
        report(f"   {name:44s} {r['end_to_end']:11.0f} {r['model_only']:11.0f} {r['ratio']:6.2f}  "
               f"{r['loader']}, {r['precision']}")
    if not dry:
        r18 = rows[0]
        report(f"   targets (H100/H200): ResNet-18 end to end >= {THROUGHPUT_TARGET} pairs/s: "
               f"{'met' if r18['end_to_end'] >= THROUGHPUT_TARGET else 'NOT met'}; ratio >= 0.9: "
               f"{'met' if r18['ratio'] >= 0.9 else 'NOT met'}")
    (out / "throughput.json").write_text(json.dumps(rows, indent=1))
    return rows


# ----- 3. learning ------------------------------------------------------------------------------

def compare_with_authors(history: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """Each epoch's kNN next to the authors' at the same number of pairs seen (global steps x
    batch), the difference, and whether it is within 2 points of theirs or above."""
    from moco.eval.authors_log import authors_knn_at

    rows = []
    for h in history:
        pairs = h["step"] * batch
        theirs = authors_knn_at(pairs)
        ours = h.get("knn_top1")
        diff = None if theirs is None or ours is None else ours - theirs
        rows.append({"epoch": h["epoch"], "pairs": pairs, "knn_top1": ours, "authors": theirs,
                     "diff": diff, "ok": None if diff is None else diff >= -2.0})
    return rows


def learning(report: Report, out: Path, work: Path, cifar: Path, minutes: float,
             dry: bool) -> dict[str, Any]:
    run = work / "learn"  # checkpoints (~100 MB each) stay in WORK; the records go to OUT
    cmd = [sys.executable, "-m", "moco", "pretrain", str(cifar), "--preset", "cifar10",
           "--output", str(run), "--overwrite", "--no-progress", "--time-limit", f"{minutes:.2f}"]
    if dry:  # the tiny folder holds fewer images than one batch of 512
        cmd += ["-b", "8", "--moco-k", "32", "--bn-splits", "2", "--device", "cpu",
                "--stop-after-epochs", "1", "--workers", "0"]
    report(f"== 3. learning: moco pretrain --preset cifar10 on {cifar.name} "
           f"({len(list((cifar / 'train').rglob('*.jpg')))} train images), --time-limit {minutes:.1f} min")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    with (out / "learn.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=ROOT)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if line.startswith(("epoch ", "kNN", "stopped", "MoCo pretraining")):
                report(f"   {line.rstrip()[:160]}")
        rc = proc.wait()
    if rc:
        report(f"   the run failed (exit {rc}): see {out / 'learn.log'}")
        return {"returncode": rc}
    import shutil

    from moco.utils.runlog import read_metrics

    (out / "learn").mkdir(exist_ok=True)
    for name in ("metrics.jsonl", "config.yaml"):
        shutil.copy(run / name, out / "learn" / name)
    history = read_metrics(run / "metrics.jsonl")
    batch = int(_config(run)["batch_size"])
    rows = compare_with_authors(history, batch)
    report(f"   {'epoch':>5s} {'pairs seen':>10s} {'kNN ours':>9s} {'authors':>8s} {'diff':>6s}")
    for r in rows:
        theirs = f"{r['authors']:8.2f}" if r["authors"] is not None else "       -"
        diff = f"{r['diff']:+6.2f}" if r["diff"] is not None else "     -"
        ours = f"{r['knn_top1']:9.2f}" if r["knn_top1"] is not None else "        -"
        report(f"   {r['epoch']:5d} {r['pairs']:10d} {ours} {theirs} {diff}")
    judged = [r for r in rows if r["ok"] is not None]
    verdict = ("no epoch reached the authors' first epoch in pairs seen" if not judged else
               f"{sum(r['ok'] for r in judged)} of {len(judged)} epochs within 2 points of the "
               "authors' log or above")
    report(f"   target: kNN within 2 points of the authors' log or above: {verdict} "
           f"({time.perf_counter() - t0:.0f} s)")
    result = {"returncode": rc, "epochs": rows, "verdict": verdict}
    (out / "learning.json").write_text(json.dumps(result, indent=1))
    return result


def _config(run: Path) -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load((run / "config.yaml").read_text()))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t_start = time.perf_counter()
    budget = 60 * (args.budget_min or (2.0 if args.dry_run else 8.0))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MOCO_CACHE"] = str(work / "cache")  # decoded caches and indexes
    report = Report(out)
    import torch
    import torchvision

    from moco.utils.machine import describe_machine

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA GPU here; run it on the GPU machine, or pass --dry-run")
    report(f"gpu-check{' (DRY RUN: CPU, tiny sizes)' if args.dry_run else ''}: "
           f"{describe_machine('cpu' if args.dry_run else 'cuda')}; python "
           f"{sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}")
    if args.dry_run:
        cifar = synthetic_jpegs(work / "tiny-cifar", 32, (32, 32), classes=4, test=16)
    else:
        cifar = cifar_data(args, work)
    results: dict[str, Any] = {}
    if args.skip_tests:
        report("== 1. CUDA tests: skipped (--skip-tests)")
    else:
        results["cuda_tests"] = cuda_tests(report, out, timeout_s=min(240.0, 0.45 * budget))
    results["throughput"] = throughput(report, out, work, cifar, args.dry_run)
    left = budget - (time.perf_counter() - t_start)
    # What the run needs outside its --time-limit: start-up, the cache, the first kNN, the report.
    minutes = max(0.2 if args.dry_run else 1.0, (left - (20 if args.dry_run else 45)) / 60)
    results["learning"] = learning(report, out, work, cifar, minutes, args.dry_run)
    total = time.perf_counter() - t_start
    report(f"gpu-check done in {total / 60:.1f} min; everything is in {out}")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    failed = (results.get("cuda_tests", {}).get("returncode", 0) not in (0, 5)
              or results["learning"].get("returncode"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
