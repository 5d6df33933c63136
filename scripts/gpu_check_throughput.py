"""The throughput section of ``scripts/gpu_check.py``, run in a process of its own (so a hang
is killed with its process group): each row's pairs/s end to end and model only, the plain
hand-written step on the same model, the GPU memory peak; each row in its own guard,
appended to a JSON-lines file as soon as it is measured (a kill keeps the rows done)."""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

from gpu_check_parts import write_json_line


def rows(dry: bool, cifar: Path | None, jpegs: Path) -> list[dict[str, Any]]:
    """The rows: (name, preset, data, overrides, plain reference); tiny sizes in a dry run."""
    from moco.core.backbones import is_known_arch
    from moco.engine.config import PRESETS

    r18 = dict(batch_size=8, moco_k=32, image_size=16) if dry else dict(batch_size=512, moco_k=4096)
    r50 = dict(arch="resnet18" if dry else "resnet50", image_size=32 if dry else 224,
               batch_size=8 if dry else 256, moco_k=64 if dry else 65536, crops="original",
               bn_splits=2 if dry else 8)
    gpu = "auto" if dry else "gpu"  # the dry run decodes on the CPU (no nvJPEG there)
    out: list[dict[str, Any]] = [
        dict(name="R18 CIFAR stem 32px b512, --bn-splits 8 (cifar10 preset)", preset="cifar10",
             data=cifar, over=dict(r18, bn_splits=2 if dry else 8), plain=True),
        dict(name="R18 same, plain BN (--bn-splits 1)", preset="cifar10", data=cifar,
             over=dict(r18, bn_splits=1), plain=True),
        dict(name="R18 same, --bn-splits 8, NCHW (--channels-last false)", preset="cifar10",
             data=cifar, over=dict(r18, bn_splits=2 if dry else 8, channels_last=False), plain=False),
        dict(name="R50 224px b256 from ~500x375 JPEGs, --decode gpu", preset="mocov2", data=jpegs,
             over=dict(r50, decode=gpu), plain=True),
        dict(name="R50 same, --decode cpu (DataLoader workers)", preset="mocov2", data=jpegs,
             over=dict(r50, decode="cpu"), plain=False),
    ]
    vit = dict(name="MoCo v3 ViT-S/16 224px b256, --decode gpu", data=jpegs, plain=False,
               preset="mocov3" if "mocov3" in PRESETS else "mocov2",
               over=dict(r50, arch="vit_small", decode=gpu, bn_splits=1))
    if not is_known_arch("vit_small"):
        vit["skip"] = "-a vit_small is not in this checkout's backbone registry"
    return [*out, vit]


def measure(row: dict[str, Any], dry: bool, workers: int) -> dict[str, Any]:
    """One row through ``benchmarks.throughput.pairs_per_second``."""
    from benchmarks.throughput import pairs_per_second
    from moco.data.splits import find_dataset
    from moco.engine.config_sources import build_config

    if row["data"] is None:
        raise RuntimeError("no CIFAR-10 data: the prepare section found no gpu-pack/")
    cfg = build_config(preset=row["preset"], overrides=dict(
        data=str(row["data"]), device="cpu" if dry else "cuda", **row["over"]))
    steps, warmup = (1, 1) if dry else (12, 4)
    r = pairs_per_second(cfg, find_dataset(row["data"]).train, steps=steps, warmup=warmup,
                         workers=workers, plain=row["plain"])
    r.update(arch=cfg.arch, batch=cfg.batch_size, steps=steps, warmup=warmup)
    return r


def run_rows(args: Any, rows_file: Path) -> int:
    """Every row, each guarded, until ``args.deadline_at`` (a time.time() stamp) is near;
    returns 1 if a row failed."""
    from moco.utils.runtime import default_workers, resolve_device

    if "throughput" in (args.inject_failure or []):
        raise RuntimeError("injected failure (--inject-failure throughput)")
    work = Path(args.work)
    cifar = Path(args.cifar_dir) if args.cifar_dir else None
    if args.dry_run:  # one thread: two OpenMP threads stall on a shared CPU (docs/benchmarks.md)
        import torch

        torch.set_num_threads(1)
    workers = default_workers(resolve_device("cpu" if args.dry_run else "cuda"))
    failed = 0
    for row in rows(args.dry_run, cifar, work / "jpegs-500x375"):
        rec: dict[str, Any] = {"setup": row["name"]}
        t0 = time.time()
        if row.get("skip"):
            rec.update(status="skipped", why=row["skip"])
        elif args.deadline_at and time.time() > args.deadline_at - (5 if args.dry_run else 12):
            rec.update(status="skipped", why="the section's time budget was spent")
        else:
            try:
                rec.update(measure(row, args.dry_run, workers), status="ok")
            except Exception as e:  # a row's failure is recorded; the next row still runs
                failed += 1
                rec.update(status="failed", error=f"{type(e).__name__}: {e}",
                           trace=traceback.format_exc()[-3000:])
        rec["seconds"] = round(time.time() - t0, 1)
        write_json_line(rows_file, rec)
        print(f"throughput: {rec['setup']}: {rec['status']} ({rec['seconds']} s) "
              f"{ {k: rec[k] for k in ('model_only', 'end_to_end', 'plain_model_only') if k in rec} }"
              f"{' ' + rec['error'] if 'error' in rec else ''}", flush=True)
    return 1 if failed else 0
