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
from dataclasses import asdict
from typing import Any


def __getattr__(name: str) -> Any:
    """``knn_evaluate`` and ``KnnResult``, the library's (:mod:`moco.eval.knn`), for code that
    imported them from here; imported on first use (``moco --help`` does not load torch)."""
    if name in ("knn_evaluate", "KnnResult"):
        from moco.eval import knn

        return getattr(knn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def run(args: argparse.Namespace) -> int:
    from moco.utils.paths import check_output, check_writable_parent

    if args.json:  # checked before the features are computed, never over an input
        check_output(args.json, "--json", files={"the input checkpoint (--pretrained)":
                                                 args.pretrained},
                     folders={"the data folder": args.data})
        check_writable_parent(args.json, "--json")
    from moco.eval.knn import knn_evaluate

    r = knn_evaluate(args.data, args.pretrained, arch=args.arch, k=args.k, t=args.t,
                     features=args.features, image_size=args.image_size,
                     batch_size=args.batch_size, workers=args.workers, device=args.device,
                     bank_chunk=args.bank_chunk, half_bank=args.half_bank,
                     precision=args.precision, progress=not args.no_progress)
    print(f"kNN (k={r.k}, t={r.t}, {r.features} features, {r.feature_dim}-d; bank {r.bank_size}, "
          f"queries {r.num_queries}): top-1 {r.top1:.2f}%  top-5 {r.top5:.2f}%  "
          f"(features {r.extract_seconds:.1f} s, kNN {r.knn_seconds:.1f} s)")
    if args.json:
        from moco.utils.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(asdict(r), indent=2) + "\n")
    return 0
