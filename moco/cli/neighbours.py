"""``moco neighbours CKPT DATA -o grid.png``: what the encoder finds similar, as a picture.

A few query images, each followed by its k nearest images of a bank (DATA's train split) with
the cosine similarity under each, through the kNN protocol's features
(:mod:`moco.eval.neighbours`).
"""

from __future__ import annotations

import argparse
from typing import Any

from moco.utils.settings import Setting, coerce, from_command_line

_COUNTS = {
    "queries": Setting(("--queries",), "", "", kind="int", min=1, max=256),
    "k": Setting(("--k",), "", "", kind="int", min=1, max=64),
    "bank_images": Setting(("--bank-images",), "", "", kind="int", min=0),
}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "neighbours", help="a grid of query images and their nearest neighbours",
        description="Draw QUERIES query images, each followed by its K nearest images of DATA's "
        "training split (cosine similarity of the L2-normalised features, as the kNN monitor; "
        "the similarity under each image; green / red frames: same / other class than the "
        "query when DATA is labeled). The queries come from DATA/val or DATA/test when there "
        "is one, else from the bank, where each query's first neighbour is itself (1.00).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint (ours, the original "
                   "main_moco.py's, the CIFAR-10 notebook's, a safetensors export)")
    p.add_argument("data", metavar="DATA", help="what moco pretrain reads: train/ (and val/ or "
                   "test/), a folder of images, a CIFAR python folder or tar shards")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the grid (.png)")
    p.add_argument("--queries", type=int, default=8, help="query images (rows)")
    p.add_argument("--k", type=int, default=8, help="neighbours per query (columns)")
    p.add_argument("--bank-images", type=int, default=10000, help="images of the training "
                   "split searched (class-balanced when labeled; 0: all)")
    p.add_argument("--queries-from", choices=("auto", "heldout", "bank"), default="auto",
                   help="where the queries come from (auto: val/ or test/ when DATA has one)")
    p.add_argument("--features", choices=("backbone", "head"), default=None,
                   help="pooled backbone features or the projection head's output (default: what "
                   "the pretraining run's kNN monitor used, else backbone)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size (default: the pretraining run's, else 32 for a CIFAR stem, 224)")
    p.add_argument("--seed", type=int, default=0, help="which queries and bank images are drawn")
    p.add_argument("--title", default=None, help="a line above the grid")
    p.add_argument("-b", "--batch-size", type=int, default=256, help="feature-extraction batch")
    p.add_argument("-j", "--workers", type=int, default=-1, help="data-loading processes "
                   "(-1: cores - 1 on CPU, up to 8 with CUDA)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=None,
                   help="autocast of the feature extraction (default: the pretraining run's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moco.eval.arguments import check_numbers
    from moco.eval.neighbours import NeighbourOptions, neighbour_grid

    check_numbers(batch_size=args.batch_size, workers=args.workers, image_size=args.image_size,
                  seed=args.seed)
    for name, s in _COUNTS.items():
        coerce(name, s, getattr(args, name), from_command_line)
    o = NeighbourOptions(queries=args.queries, k=args.k, bank_images=args.bank_images,
                         queries_from=args.queries_from, features=args.features,
                         image_size=args.image_size, batch_size=args.batch_size,
                         workers=args.workers, device=args.device, precision=args.precision,
                         seed=args.seed, progress=not args.no_progress, title=args.title)
    r = neighbour_grid(args.checkpoint, args.data, args.output, o)
    rate = r.retrieval.same_class_rate()
    same = f"; {rate:.0f}% of the neighbours share the query's class" if rate is not None else ""
    print(f"wrote {r.path}: {len(r.retrieval.queries)} queries ({r.queries_from}) x "
          f"{r.retrieval.neighbours.shape[1]} neighbours from a bank of "
          f"{len(r.retrieval.bank_source)} images ({r.features} features, "
          f"{r.feature_dim}-d){same}")
    return 0
