"""``moco lincls DATA --pretrained CKPT``: the linear classification protocol (MoCo v1 §4.1),
flags named as the original ``main_lincls.py``; generated from
:class:`moco.eval.config.LinclsConfig`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from moco.cli.declared import Overwrite, Progress, add_declared, given_values, split_values
from moco.eval.config import LinclsConfig
from moco.utils.settings import from_command_line

#: The declaration of every flag of ``moco lincls``.
DECLARED = (LinclsConfig, Progress, Overwrite)


def add_parser(sub: Any) -> None:
    from moco.cli import COMMANDS

    p = sub.add_parser(
        "lincls", help=COMMANDS["lincls"],
        description="Train a linear classifier on the frozen features of a pretrained encoder "
        "(main_lincls.py): backbone frozen in eval mode, fc N(0,0.01), SGD lr 30 momentum 0.9 "
        "wd 0, batch 256, 100 epochs, lr x0.1 at 60 and 80. Reads DATA/train and DATA/val (or "
        "DATA/test). Writes OUTPUT/metrics.jsonl, checkpoint.pth.tar (last) and "
        "model_best.pth.tar. --fast trains on features computed once (no augmentation): much "
        "faster on a CPU. Many GPUs: torchrun --nproc_per_node N -m moco lincls ... (-b is the "
        "global batch; the result equals one process's). SIGTERM/SIGINT save the step reached "
        "and exit 0; --resume auto continues exactly.",
    )
    add_declared(p, DECLARED)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moco.eval.lincls import linear_classification
    from moco.eval.lincls_protocol import SanityCheckError

    values, flags = split_values(given_values(args, DECLARED), LinclsConfig)
    cfg = LinclsConfig(**values)
    cfg.validate(from_command_line)
    try:
        linear_classification(cfg, log=print, progress=not flags.get("no_progress", False),
                              overwrite=flags.get("overwrite", False))
    except SanityCheckError as e:
        print(f"moco lincls: sanity check FAILED: {e}", file=sys.stderr)
        return 1
    return 0
