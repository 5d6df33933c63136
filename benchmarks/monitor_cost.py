"""What the health report and the online probe add to an epoch of pretraining.

Times, on this machine, (a) one training step of the model alone (MoCo or end-to-end, a
fixed batch already augmented: no data loading), (b) the online probe's step (on the head
input read off a training forward), (c) the health report of the encoder on its fixed sample
(moco.eval.health.encoder_health; the first call augments the sample's views, later calls
reuse them when they fit in memory), and prints each as a share of an epoch of
``--train-images`` images estimated from (a). Data loading is left out of the epoch, so the
shares printed are upper bounds of what a real epoch sees.

    .venv/bin/python benchmarks/monitor_cost.py                                  # the CPU demo's model
    .venv/bin/python benchmarks/monitor_cost.py --data ../shared/data/cifar10 --mechanism moco \\
        --k 4096 --batch 512 --cifar-stem --train-images 50000 --device cuda     # the authors' recipe
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from moco.core.backbones import feature_dim_of
from moco.core.mechanisms import EndToEnd
from moco.core.model import MoCo, build_encoder
from moco.data.augment import pretrain_transform
from moco.data.recipes import CIFAR_MEAN, CIFAR_STD
from moco.data.source import ImageSource
from moco.eval.feature_tap import HeadInputTap
from moco.eval.health import HealthSample, default_sample_size, encoder_health
from moco.eval.probe import OnlineProbe


def _timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median seconds of ``repeat`` calls of ``fn`` (the device synchronised around each)."""
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _images(args: argparse.Namespace) -> ImageSource:
    if args.data:
        from moco.data.splits import find_dataset

        return find_dataset(args.data).train
    rng = np.random.default_rng(0)  # varied synthetic images of the chosen size
    s = args.image_size
    return ImageSource(array=rng.integers(0, 256, (2048, s, s, 3), dtype=np.uint8))


def _model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    enc = build_encoder(args.arch, 128, mlp=args.mlp, cifar_stem=args.cifar_stem, bn_splits=8)
    if args.mechanism == "moco":
        return MoCo(enc, dim=128, k=args.k, m=0.99, t=0.1).to(device)
    return EndToEnd(enc, t=0.1).to(device)


def measure(args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    source = _images(args)
    model = _model(args, device)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)

    def step() -> None:
        out = model(x, x.flip(3))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    t_step = _timed(step, device, args.steps)
    tap = HeadInputTap(model.encoder_q)
    probe = OnlineProbe(feature_dim_of(model.encoder_q), 10, device=device)

    step()
    features = tap.take()  # the head input of a training forward (the tap keeps a reference)
    assert features is not None
    t_probe = _timed(lambda: probe.step(features, labels), device, args.steps)
    tap.close()
    n = args.sample or default_sample_size(args.train_images)
    view = pretrain_transform("cifar-demo", args.image_size, 0.2, CIFAR_MEAN, CIFAR_STD)
    sample = HealthSample(source, view, size=n, seed=0)
    t_first = _timed(lambda: encoder_health(model.encoder_q, sample, device), device, 1)
    t_health = _timed(lambda: encoder_health(model.encoder_q, sample, device), device, 3)
    return {"step": t_step, "probe": t_probe, "health_first": t_first,
            "health": t_health, "sample": float(len(sample))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="a dataset (its train split is sampled); default: "
                   "synthetic images")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--cifar-stem", action="store_true")
    p.add_argument("--mlp", action="store_true")
    p.add_argument("--mechanism", choices=("end-to-end", "moco"), default="end-to-end")
    p.add_argument("--k", type=int, default=4096, help="queue length (moco)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--train-images", type=int, default=10000, help="images per epoch (the CPU "
                   "demo: 10,000; CIFAR-10: 50,000)")
    p.add_argument("--sample", type=int, default=0, help="health sample (0: the default for "
                   "--train-images)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    r = measure(args)
    steps = args.train_images // args.batch
    epoch = steps * r["step"]
    print(f"{args.arch}{' (CIFAR stem)' if args.cifar_stem else ''}, {args.mechanism}, batch "
          f"{args.batch}, {args.image_size} px, {args.device}, {torch.get_num_threads()} threads")
    print(f"  training step (model only):  {r['step'] * 1e3:8.1f} ms; epoch of "
          f"{args.train_images:,} images ({steps} steps): {epoch:.1f} s without data loading")
    print(f"  online probe per step:       {r['probe'] * 1e3:8.2f} ms = "
          f"{100 * r['probe'] / r['step']:.2f}% of a step")
    print(f"  health report, {int(r['sample'])} images: first {r['health_first']:.2f} s "
          f"({100 * r['health_first'] / epoch:.2f}% of the epoch), then {r['health']:.2f} s "
          f"({100 * r['health'] / epoch:.2f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
