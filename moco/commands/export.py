"""``moco export CKPT --format torchvision|detectron2|safetensors --out FILE``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from moco.export import EXPORT_FORMATS


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="export a pretrained encoder for torchvision, detectron2 or safetensors",
        description="Export the query encoder of a MoCo checkpoint (ours, the original "
        "main_moco.py's or the CIFAR demo's). torchvision: a state dict that "
        "torchvision.models.ARCH() loads with strict=False, only fc missing. detectron2: the "
        "pickle of the original convert-pretrain-to-detectron2.py (use with the MoCo detection "
        "configs: RGB input, ImageNet mean/std x255, STRIDE_IN_1X1 False). safetensors: the "
        "backbone weights with arch, stem and feature width in the metadata.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint to export")
    p.add_argument("--format", "-f", dest="format", required=True, choices=EXPORT_FORMATS,
                   help="output format")
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="file to write")
    p.add_argument("-a", "--arch", default=None,
                   help="expected architecture (default: read from the checkpoint)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moco.export import export_checkpoint

    r = export_checkpoint(args.checkpoint, args.format, args.out, arch=args.arch)
    for w in r.warnings:
        print(f"moco export: warning: {w}", file=sys.stderr)
    print(f"wrote {r.path}: {r.format}, {r.num_tensors} tensors, {r.info.describe()}")
    if r.format == "detectron2":
        print("detectron2: train with the MoCo configs (INPUT.FORMAT RGB, PIXEL_MEAN "
              "[123.675, 116.280, 103.530], PIXEL_STD [58.395, 57.120, 57.375], "
              f"RESNETS.STRIDE_IN_1X1 False) and MODEL.WEIGHTS {r.path}")
    return 0
