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
from dataclasses import asdict, dataclass
from typing import Any

from moco.cli.declared import Progress, add_declared, given_values, split_values
from moco.eval.config import KnnConfig
from moco.utils.settings import setting


def __getattr__(name: str) -> Any:
    """``knn_evaluate`` and ``KnnResult``, the library's (:mod:`moco.eval.knn`), for code that
    imported them from here; imported on first use (``moco --help`` does not load torch)."""
    if name in ("knn_evaluate", "KnnResult"):
        from moco.eval import knn

        return getattr(knn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class KnnOutput:
    """Where ``moco knn`` also writes its result."""

    json: str | None = setting(None, "--json", group="run", metavar="FILE", role="runtime",
                               help="also write the result as JSON")


#: The declaration of every flag of ``moco knn``.
DECLARED = (KnnConfig, KnnOutput, Progress)


def add_parser(sub: Any) -> None:
    from moco.cli import COMMANDS

    p = sub.add_parser(
        "knn", help=COMMANDS["knn"],
        description="Weighted kNN classification (k neighbours, weights exp(sim/t)) of "
        "DATA/val (or DATA/test) against the features of DATA/train.",
    )
    add_declared(p, DECLARED)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moco.utils.paths import check_output, check_writable_parent

    values, flags = split_values(given_values(args, DECLARED), KnnConfig)
    cfg = KnnConfig(**values)
    json_out = flags.get("json")
    if json_out:  # checked before the features are computed, never over an input
        check_output(json_out, "--json", files={"the input checkpoint (--pretrained)":
                                                cfg.pretrained},
                     folders={"the data folder": cfg.data})
        check_writable_parent(json_out, "--json")
    from moco.eval.knn import knn_evaluate

    r = knn_evaluate(cfg, progress=not flags.get("no_progress", False))
    print(f"kNN (k={r.k}, t={r.t}, {r.features} features, {r.feature_dim}-d; bank {r.bank_size}, "
          f"queries {r.num_queries}): top-1 {r.top1:.2f}%  top-5 {r.top5:.2f}%  "
          f"(features {r.extract_seconds:.1f} s, kNN {r.knn_seconds:.1f} s)")
    if json_out:
        from moco.utils.atomic import atomic_write_text

        atomic_write_text(json_out, json.dumps(asdict(r), indent=2) + "\n")
    return 0
