"""``moco embed IMAGES --pretrained CKPT --out FILE``: one feature vector per image."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "embed", help="features of every image in a folder, as .npy or .safetensors",
        description="Run every image under IMAGES (recursively) through the pretrained encoder "
        "(resize + center crop, the pretraining normalisation) and save one feature vector per "
        "image with the list of files: FILE.npy + FILE.npy.json, or FILE.safetensors (tensor "
        "'embeddings', file list in the metadata).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("images", metavar="IMAGES", help="folder of images (searched recursively), "
                   "one image, or tar shards (a .tar file or a folder of them, e.g. OUT/val of "
                   "moco shard; rows named SHARD.tar:KEY.jpg)")
    p.add_argument("--pretrained", required=True, metavar="CKPT", help="checkpoint")
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="output .npy or .safetensors")
    p.add_argument("-a", "--arch", default=None, help="expected architecture (default: from CKPT)")
    p.add_argument("--features", choices=("backbone", "head"), default="backbone",
                   help="pooled backbone features or the projection head's output")
    p.add_argument("--normalize", action="store_true", help="L2-normalise each vector")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size (default: the pretraining run's, else 32 for a CIFAR stem, 224)")
    p.add_argument("-b", "--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("-j", "--workers", type=int, default=-1, help="data-loading processes "
                   "(-1: cores - 1 on CPU, up to 8 with CUDA)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed in the "
                   "output) instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moco.eval.arguments import check_numbers
    from moco.eval.embed import embed_images

    check_numbers(batch_size=args.batch_size, workers=args.workers, image_size=args.image_size)
    r = embed_images(args.images, args.pretrained, args.out, arch=args.arch,
                     features=args.features, image_size=args.image_size,
                     batch_size=args.batch_size, workers=args.workers, device=args.device,
                     normalize=args.normalize, skip_bad=args.skip_bad,
                     progress=not args.no_progress)
    for name in r.skipped:
        print(f"moco embed: warning: skipped unreadable image {name}", file=sys.stderr)
    n, d = r.embeddings_shape
    extra = f" (file list in {r.sidecar})" if r.sidecar else " (file list in the metadata)"
    print(f"wrote {r.path}: {n} x {d} embeddings{extra}")
    return 0
