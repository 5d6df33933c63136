"""``moco neighbours CKPT DATA -o grid.png``: what the encoder finds similar, as a picture.

A few query images, each followed by its k nearest images of a bank (DATA's train split) with
the cosine similarity under each, through the kNN protocol's features
(:mod:`moco.eval.neighbours`). The flags are generated from
:class:`moco.eval.config.NeighboursConfig` and :class:`NeighboursFiles`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from moco.cli.declared import Progress, add_declared, given_values, split_values
from moco.eval.config import NeighboursConfig
from moco.utils.settings import REQUIRED, setting


@dataclass
class NeighboursFiles:
    """What ``moco neighbours`` reads and writes."""

    checkpoint: str = setting(REQUIRED, "checkpoint", group="files", metavar="CKPT", role="data",
                              help="checkpoint (ours, the original main_moco.py's, the CIFAR-10 "
                              "notebook's, a safetensors export)")
    data: str = setting(REQUIRED, "data", group="files", metavar="DATA", role="data",
                        help="what moco pretrain reads: train/ (and val/ or test/), a folder of "
                        "images, a CIFAR python folder or tar shards")
    output: str = setting(REQUIRED, "-o", "--output", group="files", metavar="FILE",
                          role="runtime", help="the grid (.png)")


#: The declaration of every flag of ``moco neighbours``.
DECLARED = (NeighboursFiles, NeighboursConfig, Progress)


def add_parser(sub: Any) -> None:
    from moco.cli import COMMANDS

    p = sub.add_parser(
        "neighbours", help=COMMANDS["neighbours"],
        description="Draw QUERIES query images, each followed by its K nearest images of DATA's "
        "training split (cosine similarity of the L2-normalised features, as the kNN monitor; "
        "the similarity under each image; green / red frames: same / other class than the "
        "query when DATA is labeled). The queries come from DATA/val or DATA/test when there "
        "is one, else from the bank, where each query's first neighbour is itself (1.00).",
    )
    add_declared(p, DECLARED)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moco.eval.neighbours import neighbour_grid

    values, flags = split_values(given_values(args, DECLARED), NeighboursConfig)
    files = NeighboursFiles(**{k: flags.pop(k) for k in ("checkpoint", "data", "output")})
    cfg = NeighboursConfig(**values)
    r = neighbour_grid(files.checkpoint, files.data, files.output, cfg,
                       progress=not flags.get("no_progress", False))
    rate = r.retrieval.same_class_rate()
    same = f"; {rate:.0f}% of the neighbours share the query's class" if rate is not None else ""
    print(f"wrote {r.path}: {len(r.retrieval.queries)} queries ({r.queries_from}) x "
          f"{r.retrieval.neighbours.shape[1]} neighbours from a bank of "
          f"{len(r.retrieval.bank_source)} images ({r.features} features, "
          f"{r.feature_dim}-d){same}")
    return 0
