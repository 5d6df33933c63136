"""Throughput of MoCo pretraining, side by side, same model and batch (issue 5):

  (a) model only: ``moco.engine.training_step.train_step`` on ready tensors already on the device (the limit);
  (b) ours end to end: ``TensorTrainLoader`` (decoded cache + batched augmentation) + step;
  (c) the original recipe: ``PILTrainLoader`` (PIL decode + transforms in DataLoader workers)
      + step;
  (d) augmentation alone, two views per image, no decoding on either side: ours
      (``TensorTrainLoader`` batches) and PIL's (the same transforms in the same number of
      workers on the decoded images), on the same cores;
  (p) a plain hand-written MoCo step on the same model, ready tensors
      (:mod:`benchmarks.plain_moco`): the reference (a) should match.

Each measurement runs in its own subprocess, so its peak memory is its own. Memory is
measured after the timed steps, never during them: a sampler reading /proc every 50 ms takes
a quarter of a 2-core machine's rate. The timed steps run alone; then ``--memory-steps`` more
steps run with the sampler (the peak proportional set size of the process + its DataLoader
workers, PSS: pages shared between them counted once), and the process's peak RSS
(``ru_maxrss``, kept by the kernel, over the whole run) and on CUDA
``max_memory_allocated`` are read at the end. ``--repeat R`` runs the measurements R times,
interleaved, and keeps each one's best rate: on a machine shared with other jobs, the best of
a few short runs is the least disturbed. The last lines are the ratios b/a, b/c,
d_ours/d_pil and a/p.

    .venv/bin/python benchmarks/throughput.py                    # ResNet-18, 32 px, batch 256
    .venv/bin/python benchmarks/throughput.py --steps 20 --device cuda --cifar-stem
    .venv/bin/python benchmarks/throughput.py --method mocov3 --only a,b --cifar-stem  # MoCo v3

``--method mocov3`` measures MoCo v3 (no queue, two views through both encoders, the
predictor, BatchNorm over the whole batch) on the same network and batch, with the
``mocov3-r50`` preset's heads and optimizer (``cifar10-mocov3-vit``'s for a ViT) and v3's
augmentation (``cifar-v3`` at 64 px or less, else ``v3``); (p) is MoCo v1/v2's only.
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: benchmarks.plain_moco from the checkout
    sys.path.insert(0, str(ROOT))

PHASES = ("a", "b", "c", "d_ours", "d_pil", "p")
LABELS = {
    "a": "(a) model only, ready tensors",
    "b": "(b) ours: tensor pipeline + step",
    "c": "(c) original: PIL workers + step",
    "d_ours": "(d) augmentation alone, ours",
    "d_pil": "(d) augmentation alone, PIL",
    "p": "(p) plain hand-written MoCo step",
}
RATIOS = (("b", "a"), ("b", "c"), ("d_ours", "d_pil"), ("a", "p"))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("MOCO_DATA", ""),
                   help="dataset folder (default $MOCO_DATA, else ../shared/data/cifar10)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--cifar-stem", action="store_true", help="3x3 stem, no max-pool (default: ImageNet stem)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--moco-k", type=int, default=4096)
    p.add_argument("--method", default="moco", choices=("moco", "mocov3"),
                   help="moco: MoCo v2 (queue, Shuffling BN); mocov3: MoCo v3")
    p.add_argument("--mlp-dim", type=int, default=0, help="mocov3: hidden width of its MLPs "
                   "(default: the preset's)")
    p.add_argument("--patch-size", type=int, default=0, help="ViTs: patch size (0: 16)")
    p.add_argument("--aug", default=None, choices=("v1", "v2", "cifar-demo", "v3", "cifar-v3"),
                   help="default: v2 for moco, v3's for mocov3")
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
    p.add_argument("--memory-steps", type=int, default=3, help="steps run after the timed ones "
                   "with the memory sampler on (0: no sampler, peak RSS only)")
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
    preset, method = _method_settings(args)
    cfg = build_config(preset=preset, overrides=dict(
        data=args.data, arch=args.arch, cifar_stem=args.cifar_stem, image_size=args.image_size,
        batch_size=args.batch, moco_k=args.moco_k, device=args.device, patch_size=args.patch_size,
        precision=args.precision, channels_last={"true": True, "false": False}.get(args.channels_last, "auto"),
        cache_dir=args.cache_dir, **method))
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


def _method_settings(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The preset and the settings of ``--method``: MoCo v2 with SplitBN and the key shuffle,
    or MoCo v3 with its preset's heads and optimizer (no Shuffling BN)."""
    if args.method == "moco":
        return "mocov2", dict(aug=args.aug or "v2", bn_splits=8, shuffle_bn="split")
    vit = args.arch.startswith("vit")
    small = args.image_size <= 64
    out: dict[str, Any] = dict(aug=args.aug or ("cifar-v3" if small else "v3"))
    if args.mlp_dim:
        out["mlp_dim"] = args.mlp_dim
    if not small and vit:
        out.update(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    return ("cifar10-mocov3-vit" if vit else "mocov3-r50"), out


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(it: Any, args: argparse.Namespace, device: Any, fn: Any) -> float:
    """Images/s over ``args.steps`` items of ``it`` after ``args.warmup`` untimed ones."""
    return _rate(it, fn, args.warmup, args.steps, args.batch, device)


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


def _phase_steps(phase: str, s: dict[str, Any], args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(items, what to do with one, its device) of a phase; items never end."""
    import itertools

    import torch

    from benchmarks.plain_moco import PlainMoCoStep
    from moco.data.pil_loader import PILTrainLoader
    from moco.data.source import ImageSource
    from moco.data.tensor_loader import TensorTrainLoader
    from moco.engine.training_step import train_step

    cfg, device = s["cfg"], s["device"]

    def step(b: Any) -> None:
        train_step(s["model"], s["opt"], b, s["shuffle"], s["dtype"], None)

    def forever(loader: Any) -> Any:
        return itertools.chain.from_iterable(loader.batches(e) for e in itertools.count())

    ours = TensorTrainLoader(cfg, s["decoded"], device, prefetch=args.prefetch)
    if phase in ("a", "p"):
        ready = itertools.repeat(next(iter(ours.batches(0))))
        if phase == "a":
            return ready, step, device
        plain = PlainMoCoStep(s["model"], s["opt"], s["dtype"])
        return ready, lambda b: plain(b.im_q, b.im_k), device
    if phase == "b":
        return forever(ours), step, device
    if phase == "c":
        return forever(PILTrainLoader(cfg, s["split"], device, s["workers"])), step, device
    if phase == "d_ours":
        return forever(ours), lambda b: None, device
    if phase == "d_pil":
        arr = ImageSource(array=s["decoded"].images, labels=s["decoded"].labels, name="decoded")
        # all the cores, as ours (torch threads = cores) unless --workers says otherwise
        s["workers"] = args.workers if args.workers >= 0 else os.cpu_count() or 1
        pil = PILTrainLoader(cfg, arr, torch.device("cpu"), s["workers"])
        return forever(pil), lambda b: None, torch.device("cpu")
    raise SystemExit(f"unknown phase {phase}")


def run_phase(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement: the timed steps alone, then (``--memory-steps``) a few more with the
    memory sampler on; peak RSS and CUDA peak read at the end."""
    import torch

    s = _setup(args)
    device = s["device"]
    items, fn, dev = _phase_steps(args.phase, s, args)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ips = _timed(items, args, dev, fn)
    pss = None
    if args.memory_steps:
        mem = MemorySampler()
        for _ in range(args.memory_steps):
            fn(next(items))
        _sync(dev)
        pss = mem.stop()
    kib = 1 if sys.platform.startswith("linux") else 1 / 1024  # ru_maxrss: KiB on Linux
    return {
        "phase": args.phase, "images_per_s": ips, "peak_pss_mib": pss,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 1024,
        "cuda_peak_mib": (torch.cuda.max_memory_allocated(device) / 2**20
                          if device.type == "cuda" else None),
        "device": str(device), "threads": torch.get_num_threads(), "workers": s["workers"],
        "precision": str(s["dtype"]).replace("torch.", "") if s["dtype"] else "fp32",
    }


def _rate(it: Any, fn: Any, warmup: int, steps: int, batch: int, device: Any) -> float:
    """Items/s of ``fn`` over ``steps`` items of ``it`` (``batch`` each) after ``warmup``."""
    for _ in range(warmup):
        fn(next(it))
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn(next(it))
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def pairs_per_second(cfg: Any, source: Any, *, steps: int, warmup: int, workers: int,
                     end_to_end: bool = True, plain: bool = False) -> dict[str, Any]:
    """Pairs/s of ``cfg``'s training (``moco pretrain``'s loader, model, precision and step,
    no host sync between steps, as in the run): ``model_only`` on one ready batch repeated,
    ``plain_model_only`` (with ``plain``, a MoCo v1/v2 model) the same batch through the
    plain hand-written step (:mod:`benchmarks.plain_moco`), and ``end_to_end`` (unless False)
    through the loader that ``moco pretrain`` would pick for ``source``. ``warmup`` untimed
    steps before each (cudnn autotuning, compilation). ``cuda_peak_mib``: the GPU memory peak
    over all of it. In-process; used by scripts/gpu_check.py."""
    import itertools

    import torch

    from benchmarks.plain_moco import PlainMoCoStep
    from moco.core.shuffle_bn import LocalShuffle, NoShuffle
    from moco.data.loaders import make_train_loader
    from moco.engine.build import build_model, build_optimizer
    from moco.engine.training_step import train_step
    from moco.utils.runtime import configure_backends, resolve_device, resolve_precision

    device = resolve_device(cfg.device)
    configure_backends(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
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

    batches = itertools.chain.from_iterable(loader.batches(e) for e in itertools.count())
    ready = next(batches)
    out: dict[str, Any] = {"loader": type(loader).__name__, "device": str(device),
                           "precision": str(dtype).replace("torch.", "") if dtype else "fp32"}
    out["model_only"] = _rate(itertools.repeat(ready), step, warmup, steps, cfg.batch_size, device)
    if plain and hasattr(state["model"], "key_queue"):
        ref = PlainMoCoStep(state["model"], state["opt"], dtype, scaler)
        out["plain_model_only"] = _rate(itertools.repeat(ready), lambda b: ref(b.im_q, b.im_k),
                                        warmup, steps, cfg.batch_size, device)
    if end_to_end:
        out["end_to_end"] = _rate(batches, step, warmup, steps, cfg.batch_size, device)
        out["ratio"] = out["end_to_end"] / out["model_only"]
    state.clear()  # frees the model and optimizer state before the next measurement
    del loader, batches, ready
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.empty_cache()
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
    print(f"setup: {args.method}, {args.arch}{' CIFAR stem' if args.cifar_stem else ' ImageNet stem'}, "
          f"{args.image_size} px, batch {args.batch}, aug {_method_settings(args)[1]['aug']}, "
          f"data {args.data}")
    results: dict[str, dict[str, Any]] = {}
    phases = [p for p in PHASES if p in args.only.split(",")
              and not (p == "p" and args.method != "moco")]  # the plain step is MoCo v1/v2's
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
            print(_line(phase, r, rates, args.repeat), flush=True)
    ips = {k: v["images_per_s"] for k, v in results.items()}
    for num, den in RATIOS:
        if num in ips and den in ips:
            print(f"{num}/{den} = {ips[num] / ips[den]:.2f}")
    return 0


def _line(phase: str, r: dict[str, Any], rates: list[int], repeat: int) -> str:
    cuda = f", CUDA peak {r['cuda_peak_mib']:.0f} MiB" if r["cuda_peak_mib"] is not None else ""
    runs = f" (best of {rates})" if repeat > 1 else ""
    pss = (f"peak PSS {r['peak_pss_mib']:.0f} MiB with workers (after the timed steps), "
           if r["peak_pss_mib"] is not None else "")
    return (f"{LABELS[phase]:34s} {r['images_per_s']:7.0f} img/s{runs}   {pss}"
            f"RSS {r['peak_rss_mib']:.0f} MiB{cuda}   [{r['device']}, {r['precision']}, "
            f"{r['threads']} threads, {r['workers']} workers]")


if __name__ == "__main__":
    raise SystemExit(main())
