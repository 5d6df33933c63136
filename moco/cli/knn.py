"""``moco knn DATA --pretrained CKPT``: weighted kNN top-1/top-5 of a pretrained encoder.

The bank is DATA/train, the queries DATA/val (or DATA/test), both un-augmented (resize +
center crop) through the training monitor's pipeline and settings (the same figure as the
run's monitor for the same weights: :mod:`moco.eval.features`). Features are L2-normalised;
each query's class scores are the sums of exp(similarity / t) over its k nearest bank rows of
each class (the weighted kNN of Wu et al. 2018, as the authors' CIFAR-10 demo). The bank
is stored once in a preallocated [N, D] tensor and scanned in chunks, so a bank of a million
images costs N x D x 4 bytes (8 GB for 1M ResNet-50 features; 2 GB at ``--features head``
or with ``--half-bank``) and no more.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class KnnResult:
    top1: float
    top5: float
    k: int
    t: float
    features: str
    bank_size: int
    num_queries: int
    feature_dim: int
    extract_seconds: float
    knn_seconds: float


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "knn", help="weighted kNN accuracy of a pretrained encoder",
        description="Weighted kNN classification (k neighbours, weights exp(sim/t)) of "
        "DATA/val (or DATA/test) against the features of DATA/train.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("data", metavar="DATA", help="dataset folder with labeled train/ and val/ or "
                   "test/ (or a torchvision CIFAR python folder)")
    p.add_argument("--pretrained", required=True, metavar="CKPT", help="checkpoint to evaluate")
    p.add_argument("-a", "--arch", default=None, help="expected architecture (default: from CKPT)")
    p.add_argument("--k", "--knn-k", dest="k", type=int, default=200, help="neighbours")
    p.add_argument("--t", "--knn-t", dest="t", type=float, default=0.1, help="temperature")
    p.add_argument("--features", choices=("backbone", "head"), default=None,
                   help="pooled backbone features or the projection head's output (default: what "
                   "the pretraining run's kNN monitor used, else backbone)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size (default: the pretraining run's, else 32 for a CIFAR stem, 224)")
    p.add_argument("-b", "--batch-size", type=int, default=256, help="feature-extraction batch")
    p.add_argument("-j", "--workers", type=int, default=-1, help="data-loading processes "
                   "(-1: cores - 1 on CPU, up to 8 with CUDA)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--bank-chunk", type=int, default=65536, help="bank rows compared at once")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=None,
                   help="autocast of the feature extraction (default: the pretraining run's "
                   "--precision, as its kNN monitor; auto: bf16/fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--half-bank", action="store_true", help="store the bank in float16 (half the "
                   "memory; scores are computed in float32 on each chunk)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def knn_evaluate(data: str | Path, pretrained: str | Path, *, arch: str | None = None,
                 k: int = 200, t: float = 0.1, features: str | None = None,
                 image_size: int | None = None, batch_size: int = 256, workers: int = -1,
                 device: str = "auto", bank_chunk: int = 65536, half_bank: bool = False,
                 precision: str | None = None, progress: bool = True) -> KnnResult:
    """kNN top-1/top-5 (%) of ``pretrained`` on ``data`` (train = bank, val/test = queries).

    The images go through the training monitor's pipeline with the settings the pretraining
    run recorded (:func:`moco.eval.features.eval_config`: image size, mean/std, loader,
    precision, channels_last), so a checkpoint gets the figure its run's monitor logged."""
    import torch
    from tqdm import tqdm

    from moco.cli.common import check_numbers
    from moco.data.splits import find_dataset, knn_splits
    from moco.engine.runtime import default_workers, resolve_device, resolve_precision
    from moco.eval import features as feats
    from moco.eval.encoders import load_encoder
    from moco.eval.knn import knn_accuracy

    check_numbers(k=k, t=t, batch_size=batch_size, bank_chunk=bank_chunk, workers=workers,
                  image_size=image_size)
    # The same check of the splits as the training monitor's (moco.data.splits.knn_splits).
    bank_source, query_source = knn_splits(find_dataset(data), data, required=True)  # type: ignore[misc]
    dev = resolve_device(device)
    model, info = load_encoder(pretrained, arch, dev, features=features)
    nw = workers if workers >= 0 else default_workers(dev)
    cfg = feats.eval_config(info.config, image_size=image_size or info.image_size,
                            mean=info.mean, std=info.std, workers=nw, precision=precision)
    autocast = resolve_precision(cfg.precision, dev)
    t0 = time.perf_counter()
    total = len(bank_source) + len(query_source)
    with tqdm(total=total, desc="features", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        bank, bank_labels = feats.source_features(
            model, bank_source, cfg, dev, nw, autocast_dtype=autocast, batch_size=batch_size,
            dtype=torch.float16 if half_bank else torch.float32, progress=bar)
        query, query_labels = feats.source_features(
            model, query_source, cfg, dev, nw, autocast_dtype=autocast, batch_size=batch_size,
            progress=bar)
    t1 = time.perf_counter()
    top1, top5 = knn_accuracy(query.to(dev), query_labels, bank, bank_labels, k=k, t=t,
                              bank_chunk=bank_chunk)
    t2 = time.perf_counter()
    return KnnResult(top1, top5, k, t, info.features, len(bank_source), len(query_source),
                     int(bank.shape[1]), t1 - t0, t2 - t1)


def run(args: argparse.Namespace) -> int:
    from moco.engine.paths import check_output, check_writable_parent

    if args.json:  # checked before the features are computed, never over an input
        check_output(args.json, "--json", files={"the input checkpoint (--pretrained)":
                                                 args.pretrained},
                     folders={"the data folder": args.data})
        check_writable_parent(args.json, "--json")
    r = knn_evaluate(args.data, args.pretrained, arch=args.arch, k=args.k, t=args.t,
                     features=args.features, image_size=args.image_size,
                     batch_size=args.batch_size, workers=args.workers, device=args.device,
                     bank_chunk=args.bank_chunk, half_bank=args.half_bank,
                     precision=args.precision, progress=not args.no_progress)
    print(f"kNN (k={r.k}, t={r.t}, {r.features} features, {r.feature_dim}-d; bank {r.bank_size}, "
          f"queries {r.num_queries}): top-1 {r.top1:.2f}%  top-5 {r.top5:.2f}%  "
          f"(features {r.extract_seconds:.1f} s, kNN {r.knn_seconds:.1f} s)")
    if args.json:
        from moco.engine.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(asdict(r), indent=2) + "\n")
    return 0
