"""``moco embed IMAGES --pretrained CKPT --out FILE``: one feature vector per image; the flags
are generated from :class:`moco.eval.config.EmbedConfig`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from moco.cli.declared import Progress, add_declared, given_values, split_values
from moco.eval.config import EmbedConfig
from moco.utils.settings import from_command_line

#: The declaration of every flag of ``moco embed``.
DECLARED = (EmbedConfig, Progress)


def add_parser(sub: Any) -> None:
    from moco.cli import COMMANDS

    p = sub.add_parser(
        "embed", help=COMMANDS["embed"],
        description="Run every image under IMAGES (recursively) through the pretrained encoder "
        "(resize + center crop, the pretraining normalisation) and save one feature vector per "
        "image with the list of files: FILE.npy + FILE.npy.json, or FILE.safetensors (tensor "
        "'embeddings', file list in the metadata). --plot MAP.png also draws their 2-D map.",
    )
    add_declared(p, DECLARED)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moco.eval.embed import embed_images

    values, flags = split_values(given_values(args, DECLARED), EmbedConfig)
    cfg = EmbedConfig(**values)
    cfg.validate(from_command_line)
    r = embed_images(cfg, progress=not flags.get("no_progress", False))
    for name in r.skipped:
        print(f"moco embed: warning: skipped unreadable image {name}", file=sys.stderr)
    n, d = r.embeddings_shape
    extra = f" (file list in {r.sidecar})" if r.sidecar else " (file list in the metadata)"
    print(f"wrote {r.path}: {n} x {d} embeddings{extra}")
    if r.plot is not None:
        print(f"wrote {r.plot}: their 2-D map ({(r.plot_method or '').upper()})")
    return 0
