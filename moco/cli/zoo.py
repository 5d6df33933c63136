"""``moco zoo list|info|download``: the authors' released MoCo checkpoints by name."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "zoo", help="the authors' released MoCo v1/v2/v3 weights: list, describe, download",
        description="The MoCo checkpoints released by the papers' authors, by name. In Python: "
        "moco.load_pretrained(NAME) returns the ready backbone. Files go to $MOCO_CACHE/weights "
        "(else ~/.cache/moco/weights). The URLs and checksums are copied from the authors' "
        "READMEs and have not been checked against the files (marked unverified).",
    )
    cmds = p.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    ls = cmds.add_parser("list", help="the released weights with the authors' linear top-1")
    ls.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'mocov3*'")
    info = cmds.add_parser("info", help="everything known about one release")
    info.add_argument("name", metavar="NAME", help="a name from moco zoo list")
    dl = cmds.add_parser("download", help="download (or import a local copy) into the cache",
                         description="Download NAME into the cache (resumable: run it again "
                         "after an interruption), or, with --from, check a copy downloaded "
                         "elsewhere and put it in the cache.")
    dl.add_argument("name", metavar="NAME", help="a name from moco zoo list")
    dl.add_argument("--from", dest="source", metavar="FILE", default=None,
                    help="a local copy of the release (checked, then copied into the cache)")
    dl.add_argument("--mirror", default=None, metavar="URL|FOLDER",
                    help="a base URL or folder holding the file under its own name (default: "
                    "$MOCO_MIRROR, else the authors' URL)")
    dl.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _list(pattern: str) -> int:
    from moco.hub.registry import REGISTRY, list_weights

    names = list_weights(pattern)
    print(f"{'name':<24} {'method':<8} {'network':<22} {'epochs':>6} {'top-1':>6}  file")
    for n in names:
        w = REGISTRY[n]
        print(f"{n:<24} {w.method:<8} {w.arch:<22} {w.epochs:>6} {w.top1:>6.1f}  {w.filename}")
    print("top-1: ImageNet-1k linear classification (%) reported by the authors; every URL and "
          "checksum is copied from their READMEs, unverified (moco zoo info NAME)")
    return 0 if names else 1


def _info(name: str) -> int:
    from moco.hub.load import weights_path
    from moco.hub.registry import get_weights

    w = get_weights(name)
    path = weights_path(w)
    rows = [("name", w.name), ("method", w.method), ("paper", w.paper),
            ("network", w.arch + (f" {w.timm_args}" if w.timm_args else "")),
            ("epochs", str(w.epochs)), ("recipe", w.recipe),
            ("linear top-1", f"{w.top1}% ({w.top1_source})" + (
                f"; paper {w.paper_top1}%" if w.paper_top1 not in (None, w.top1) else "")),
            ("fine-tuned top-1", f"{w.finetune_top1}%" if w.finetune_top1 else "-"),
            ("layout", w.layout), ("url", w.url), ("checksum", w.checksum_text),
            ("verified", f"{w.verified} ({w.note})"), ("licence", w.licence),
            ("cache", f"{path} ({'present' if path.is_file() else 'not downloaded'})"),
            ("python", f"moco.load_pretrained({w.name!r})")]
    for k, v in rows:
        print(f"{k + ':':<18}{v}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from moco.hub.load import fetch_weights, weights_path
    from moco.hub.registry import get_weights
    from moco.utils.download import import_file

    w = get_weights(args.name)
    if args.source:
        path = import_file(args.source, weights_path(w), sha256=w.sha256, md5=w.md5)
    else:
        path = fetch_weights(w, mirror=args.mirror, progress=False if args.no_progress else None)
    print(f"{w.name}: {path} ({path.stat().st_size / 1e6:.1f} MB, checksum: {w.checksum_text})")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.zoo_command == "list":
        return _list(args.pattern)
    if args.zoo_command == "info":
        return _info(args.name)
    return _download(args)
