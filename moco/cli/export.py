"""``moco export CKPT --format torchvision|detectron2|safetensors|timm --out FILE``."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from moco.eval.export import EXPORT_FORMATS


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="export a pretrained encoder for torchvision, detectron2, safetensors or "
        "timm",
        description="Export the query encoder of a MoCo checkpoint (ours, the original "
        "main_moco.py's or the CIFAR demo's). torchvision: a state dict that "
        "torchvision.models.ARCH() loads with strict=False, only fc missing. detectron2: the "
        "pickle of the original convert-pretrain-to-detectron2.py (use with the MoCo detection "
        "configs: RGB input, ImageNet mean/std x255, STRIDE_IN_1X1 False; moco detectron2-config "
        "prints the training command). safetensors: the backbone weights with arch, stem and "
        "feature width in the metadata. timm: timm's names plus the default classifier at a fresh "
        "init, for timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay="
        "dict(file=FILE)) (a -a timm:NAME backbone, or a ResNet timm has under the same name; "
        ".safetensors when FILE ends so).",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint to export")
    p.add_argument("--format", "-f", dest="format", required=True,
                   choices=(*EXPORT_FORMATS, "hf"), help="output format (hf: a Hugging Face "
                   "Hub model folder, --out FOLDER: model.safetensors, config.json, README.md)")
    p.add_argument("--out", "-o", required=True, metavar="FILE",
                   help="file to write (a folder for --format hf)")
    p.add_argument("-a", "--arch", default=None,
                   help="expected architecture (default: read from the checkpoint)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the fresh classifier init of --format timm")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.format == "hf":
        from moco.cli.hub import export_hf

        return export_hf(args)
    from moco.eval.export import export_checkpoint
    from moco.utils.paths import check_output, check_writable_parent

    check_output(args.out, "--out", files={"the input checkpoint": args.checkpoint})
    check_writable_parent(args.out, "--out")

    r = export_checkpoint(args.checkpoint, args.format, args.out, arch=args.arch, seed=args.seed)
    for w in r.warnings:
        print(f"moco export: warning: {w}", file=sys.stderr)
    print(f"wrote {r.path}: {r.format}, {r.num_tensors} tensors, {r.info.describe()}")
    for note in r.notes:
        print(f"{r.format}: {note}")
    if r.format == "detectron2":
        print("detectron2: train with the MoCo configs (configs/detectron2: INPUT.FORMAT RGB, "
              "PIXEL_MEAN [123.675, 116.280, 103.530], PIXEL_STD [58.395, 57.120, 57.375], "
              f"RESNETS.STRIDE_IN_1X1 False) and MODEL.WEIGHTS {r.path}; the whole command: "
              f"moco detectron2-config {shlex.quote(str(args.checkpoint))} --weights "
              f"{shlex.quote(str(r.path))}")
    return 0
