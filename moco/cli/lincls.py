"""``moco lincls DATA --pretrained CKPT``: the linear classification protocol (MoCo v1 §4.1),
flags named as the original ``main_lincls.py``."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "lincls", help="linear classification on frozen features (the paper's protocol)",
        description="Train a linear classifier on the frozen features of a pretrained encoder "
        "(main_lincls.py): backbone frozen in eval mode, fc N(0,0.01), SGD lr 30 momentum 0.9 "
        "wd 0, batch 256, 100 epochs, lr x0.1 at 60 and 80. Reads DATA/train and DATA/val (or "
        "DATA/test). Writes OUTPUT/metrics.jsonl, checkpoint.pth.tar (last) and "
        "model_best.pth.tar. --fast trains on features computed once (no augmentation): much "
        "faster on a CPU. Many GPUs: torchrun --nproc_per_node N -m moco lincls ... (-b is the "
        "global batch; the result equals one process's). SIGTERM/SIGINT save the step reached "
        "and exit 0; --resume auto continues exactly.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("data", metavar="DATA", help="dataset folder with labeled train/ and val/ or "
                   "test/ (or a torchvision CIFAR python folder)")
    p.add_argument("--pretrained", default="", metavar="CKPT",
                   help="MoCo checkpoint (ours, main_moco.py's or the CIFAR demo's)")
    p.add_argument("-a", "--arch", default=None, help="expected architecture (default: from CKPT)")
    p.add_argument("--epochs", type=int, default=100, help="number of epochs")
    p.add_argument("-b", "--batch-size", type=int, default=256, help="batch size")
    p.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=30.0,
                   help="initial learning rate")
    p.add_argument("--schedule", type=int, nargs="*", default=[60, 80],
                   help="epochs at which the lr is multiplied by 0.1 (ignored with --cos)")
    p.add_argument("--cos", action="store_true", help="cosine lr schedule instead of steps")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--wd", "--weight-decay", dest="wd", type=float, default=0.0, help="weight decay")
    p.add_argument("-e", "--evaluate", action="store_true",
                   help="only evaluate the model of --resume on the val split")
    p.add_argument("--resume", default="", metavar="PATH|auto",
                   help="continue from a checkpoint.pth.tar written by moco lincls; auto: from "
                   "OUTPUT/checkpoint.pth.tar when it exists, else start from --pretrained")
    p.add_argument("--fast", action="store_true",
                   help="compute the frozen features once (no augmentation) and train the linear "
                   "layer on them: same optimizer and schedule, much faster on CPUs")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size (default: the pretraining run's, else 32 for a CIFAR stem, 224)")
    p.add_argument("-j", "--workers", type=int, default=-1, help="data-loading processes "
                   "(-1: cores - 1 on CPU, up to 8 with CUDA)")
    p.add_argument("--seed", type=int, default=0, help="seed for the fc init, order and augmentation")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="the frozen backbone's forward: bf16 autocast, or fp32 (the original's "
                   "numerics); auto = bf16 on a GPU that supports it, fp32 on the CPU. fc, its loss "
                   "and update are always fp32")
    p.add_argument("--dist-timeout", type=float, default=30.0, metavar="MIN",
                   help="under torchrun: minutes a process waits for the others before failing")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--output", default="runs/lincls", help="run folder")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moco.eval.arguments import check_numbers
    from moco.eval.lincls import LinclsConfig, linear_classification
    from moco.eval.lincls_protocol import SanityCheckError

    check_numbers(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                  momentum=args.momentum, wd=args.wd, workers=args.workers, seed=args.seed,
                  image_size=args.image_size, schedule=args.schedule)
    cfg = LinclsConfig(
        data=args.data, pretrained=args.pretrained, arch=args.arch, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, schedule=list(args.schedule), cos=args.cos,
        momentum=args.momentum, wd=args.wd, workers=args.workers, seed=args.seed,
        device=args.device, output=args.output, resume=args.resume, evaluate=args.evaluate,
        fast=args.fast, image_size=args.image_size, overwrite=args.overwrite,
        precision=args.precision, dist_timeout=args.dist_timeout,
    )
    try:
        linear_classification(cfg, log=print, progress=not args.no_progress)
    except SanityCheckError as e:
        print(f"moco lincls: sanity check FAILED: {e}", file=sys.stderr)
        return 1
    return 0
