"""Throughput of MoCo pretraining, side by side, same model and batch (issue 5):

  (a) model only: ``moco.engine.training_step.train_step`` on ready tensors already on the device (the limit);
  (b) ours end to end: ``TensorTrainLoader`` (decoded cache + batched augmentation) + step;
  (c) the original recipe: ``PILTrainLoader`` (PIL decode + transforms in DataLoader workers)
      + step;
  (d) augmentation alone, two views per image, no decoding on either side: ours
      (``TensorTrainLoader`` batches) and PIL's (the same transforms in the same number of
      workers on the decoded images), on the same cores.

Each measurement runs in its own subprocess, so its peak memory is its own: the peak of the
process's + its DataLoader workers' proportional set size (PSS: pages shared between them,
e.g. after fork, counted once), sampled every 50 ms from /proc, and on CUDA
``max_memory_allocated``. ``--repeat R`` runs the measurements R times, interleaved, and keeps
each one's best rate: on a machine shared with other jobs, the best of a few short runs is
the least disturbed. The last three lines are the ratios b/a, b/c and d_ours/d_pil.

    .venv/bin/python benchmarks/throughput.py                    # ResNet-18, 32 px, batch 256
    .venv/bin/python benchmarks/throughput.py --steps 20 --device cuda --cifar-stem
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PHASES = ("a", "b", "c", "d_ours", "d_pil")
LABELS = {
    "a": "(a) model only, ready tensors",
    "b": "(b) ours: tensor pipeline + step",
    "c": "(c) original: PIL workers + step",
    "d_ours": "(d) augmentation alone, ours",
    "d_pil": "(d) augmentation alone, PIL",
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("MOCO_DATA", ""),
                   help="dataset folder (default $MOCO_DATA, else ../shared/data/cifar10)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--cifar-stem", action="store_true", help="3x3 stem, no max-pool (default: ImageNet stem)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--moco-k", type=int, default=4096)
    p.add_argument("--aug", default="v2", choices=("v1", "v2", "cifar-demo"))
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--channels-last", default="auto", choices=("auto", "true", "false"),
                   help="auto (default, as moco pretrain): on CUDA only")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--workers", type=int, default=-1, help="PIL DataLoader workers (default: the "
                   "library's default for the device)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--prefetch", action="store_true", help="(b): augment the next batch in a "
                   "background thread (off by default, see docs/benchmarks.md)")
    p.add_argument("--only", default=",".join(PHASES), help=f"comma-separated subset of {PHASES}")
    p.add_argument("--repeat", type=int, default=1, help="rounds; the best rate of each is kept")
    p.add_argument("--cache-dir", default="", help="decoded cache folder (default $MOCO_CACHE or ~/.cache/moco)")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _setup(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from moco.core.shuffle_bn import LocalShuffle
    from moco.data.cache import cached_images
    from moco.data.input_plan import cache_short_side
    from moco.data.splits import find_dataset
    from moco.engine.build import build_model, build_optimizer
    from moco.engine.config_sources import build_config
    from moco.utils.runtime import default_workers, resolve_device, resolve_precision

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = build_config(preset="mocov2", overrides=dict(
        data=args.data, arch=args.arch, cifar_stem=args.cifar_stem, image_size=args.image_size,
        batch_size=args.batch, moco_k=args.moco_k, aug=args.aug, device=args.device,
        precision=args.precision, channels_last={"true": True, "false": False}.get(args.channels_last, "auto"),
        cache_dir=args.cache_dir, bn_splits=8, shuffle_bn="split"))
    device = resolve_device(cfg.device)
    model = build_model(cfg, device)
    if args.compile:  # as moco.engine.build.build_model does with --compile
        for child in model.children():
            child.compile()
    split = find_dataset(cfg.data).train
    decoded = cached_images(split, cfg.cache_dir or None, short_side=cache_short_side(cfg.image_size))
    if decoded is None:
        raise SystemExit("the decoded images do not fit in memory: this benchmark needs the cache")
    return dict(cfg=cfg, device=device, model=model, opt=build_optimizer(cfg, model),
                shuffle=LocalShuffle(torch.Generator().manual_seed(0)),
                dtype=resolve_precision(cfg.precision, device), split=split, decoded=decoded,
                workers=args.workers if args.workers >= 0 else default_workers(device))


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(it: Any, args: argparse.Namespace, device: Any, fn: Any) -> float:
    """Images/s over ``args.steps`` items of ``it`` after ``args.warmup`` untimed ones."""
    for _ in range(args.warmup):
        fn(next(it))
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        fn(next(it))
    _sync(device)
    return args.steps * args.batch / (time.perf_counter() - t0)


class MemorySampler:
    """Peak PSS (MiB) of this process and its descendants, sampled in a daemon thread."""

    def __init__(self, every: float = 0.05) -> None:
        import threading

        self.peak = 0.0
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _pids(pid: int) -> list[int]:
        out = [pid]
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                for child in (task / "children").read_text().split():
                    out += MemorySampler._pids(int(child))
        except OSError:
            pass
        return out

    @staticmethod
    def _pss_kib(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def sample(self) -> None:
        self.peak = max(self.peak, sum(self._pss_kib(p) for p in self._pids(os.getpid())) / 1024)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak


def run_phase(args: argparse.Namespace) -> dict[str, Any]:
    import itertools

    import torch

    from moco.data.batches import Batch
    from moco.data.pil_loader import PILTrainLoader
    from moco.data.source import ImageSource
    from moco.data.tensor_loader import TensorTrainLoader
    from moco.engine.training_step import train_step

    s = _setup(args)
    cfg, device = s["cfg"], s["device"]

    def step(b: Batch) -> None:
        train_step(s["model"], s["opt"], b, s["shuffle"], s["dtype"], None)

    def forever(loader: Any) -> Any:
        return itertools.chain.from_iterable(loader.batches(e) for e in itertools.count())

    ours = TensorTrainLoader(cfg, s["decoded"], device, prefetch=args.prefetch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    mem = MemorySampler()
    phase = args.phase
    if phase == "a":
        ready = next(iter(ours.batches(0)))
        ips = _timed(itertools.repeat(ready), args, device, step)
    elif phase == "b":
        ips = _timed(forever(ours), args, device, step)
    elif phase == "c":
        pil = PILTrainLoader(cfg, s["split"], device, s["workers"])
        ips = _timed(forever(pil), args, device, step)
    elif phase == "d_ours":
        ips = _timed(forever(ours), args, device, lambda b: None)
    elif phase == "d_pil":
        arr = ImageSource(array=s["decoded"].images, labels=s["decoded"].labels, name="decoded")
        # all the cores, as ours (torch threads = cores) unless --workers says otherwise
        s["workers"] = args.workers if args.workers >= 0 else os.cpu_count() or 1
        pil = PILTrainLoader(cfg, arr, torch.device("cpu"), s["workers"])
        ips = _timed(forever(pil), args, torch.device("cpu"), lambda b: None)
    else:
        raise SystemExit(f"unknown phase {phase}")
    kib = 1 if sys.platform.startswith("linux") else 1 / 1024  # ru_maxrss: KiB on Linux
    return {
        "phase": phase, "images_per_s": ips, "peak_pss_mib": mem.stop(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 1024,
        "cuda_peak_mib": (torch.cuda.max_memory_allocated(device) / 2**20
                          if device.type == "cuda" else None),
        "device": str(device), "threads": torch.get_num_threads(), "workers": s["workers"],
        "precision": str(s["dtype"]).replace("torch.", "") if s["dtype"] else "fp32",
    }


def pairs_per_second(cfg: Any, source: Any, *, steps: int, warmup: int, workers: int,
                     end_to_end: bool = True) -> dict[str, Any]:
    """Pairs/s of ``cfg``'s training (``moco pretrain``'s loader, model, precision and step,
    no host sync between steps, as in the run): ``model_only`` on one ready batch repeated,
    and ``end_to_end`` (unless False) through the loader that ``moco pretrain`` would pick for
    ``source``. ``warmup`` untimed steps first (cudnn autotuning, compilation). In-process;
    used by scripts/gpu_check.py."""
    import itertools

    import torch

    from moco.core.shuffle_bn import LocalShuffle, NoShuffle
    from moco.data.loaders import make_train_loader
    from moco.engine.build import build_model, build_optimizer
    from moco.engine.training_step import train_step
    from moco.utils.runtime import configure_backends, resolve_device, resolve_precision

    device = resolve_device(cfg.device)
    configure_backends(device)
    dtype = resolve_precision(cfg.precision, device)
    model = build_model(cfg, device, num_samples=len(source))
    state = {"model": model, "opt": build_optimizer(cfg, model)}
    del model
    shuffle = (LocalShuffle(torch.Generator().manual_seed(0))
               if cfg.shuffle_bn in ("split", "auto") else NoShuffle())
    loader = make_train_loader(cfg, source, device, workers)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    def step(b: Any) -> None:
        train_step(state["model"], state["opt"], b, shuffle, dtype, scaler)

    def timed(it: Any) -> float:
        for _ in range(warmup):
            step(next(it))
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step(next(it))
        _sync(device)
        return steps * cfg.batch_size / (time.perf_counter() - t0)

    batches = itertools.chain.from_iterable(loader.batches(e) for e in itertools.count())
    ready = next(batches)
    out: dict[str, Any] = {"loader": type(loader).__name__, "device": str(device),
                           "precision": str(dtype).replace("torch.", "") if dtype else "fp32",
                           "model_only": timed(itertools.repeat(ready))}
    if end_to_end:
        out["end_to_end"] = timed(batches)
        out["ratio"] = out["end_to_end"] / out["model_only"]
    state.clear()  # frees the model and optimizer state before the next measurement
    del loader, batches, ready
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return out


def machine() -> str:
    import torch

    from moco.utils.machine import describe_machine

    load = f", load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{describe_machine('cuda' if torch.cuda.is_available() else 'cpu')}{load}; torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not args.data:
        from moco.engine.config_sources import default_data_dir

        args.data = default_data_dir()
    if args.phase:
        print(json.dumps(run_phase(args)))
        return 0
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    print(f"machine: {machine()}")
    print(f"setup: {args.arch}{' CIFAR stem' if args.cifar_stem else ' ImageNet stem'}, "
          f"{args.image_size} px, batch {args.batch}, aug {args.aug}, data {args.data}")
    results: dict[str, dict[str, Any]] = {}
    phases = [p for p in PHASES if p in args.only.split(",")]
    for rnd in range(args.repeat):
        for phase in phases:
            cmd = [sys.executable, __file__, *base, "--data", args.data, "--phase", phase]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{LABELS[phase]}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
                return 1
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rates = results.get(phase, {}).get("rates", []) + [round(r["images_per_s"])]
            if phase not in results or r["images_per_s"] > results[phase]["images_per_s"]:
                results[phase] = r
            results[phase]["rates"] = rates
            if rnd + 1 < args.repeat:
                continue
            r = results[phase]
            cuda = f", CUDA peak {r['cuda_peak_mib']:.0f} MiB" if r["cuda_peak_mib"] is not None else ""
            runs = f" (best of {rates})" if args.repeat > 1 else ""
            print(f"{LABELS[phase]:34s} {r['images_per_s']:7.0f} img/s{runs}   peak PSS "
                  f"{r['peak_pss_mib']:.0f} MiB with workers, RSS {r['peak_rss_mib']:.0f} MiB{cuda}"
                  f"   [{r['device']}, {r['precision']}, {r['threads']} threads, "
                  f"{r['workers']} workers]", flush=True)
    ips = {k: v["images_per_s"] for k, v in results.items()}
    for num, den in (("b", "a"), ("b", "c"), ("d_ours", "d_pil")):
        if num in ips and den in ips:
            print(f"{num}/{den} = {ips[num] / ips[den]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
