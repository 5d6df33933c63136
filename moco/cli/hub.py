"""``moco hub push FOLDER REPO_ID``: upload a model folder to the Hugging Face Hub; and the
``hf`` format of ``moco export`` (a Hub model folder)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "hub", help="share a model folder on the Hugging Face Hub",
        description="Upload a folder written by 'moco export CKPT --format hf --out FOLDER' "
        "(model.safetensors, config.json, README.md) to a Hugging Face Hub model repository, "
        "created when missing. Needs huggingface_hub (pip install 'momentum-contrast[hub]') and "
        "a token (hf auth login, or HF_TOKEN). Anyone then loads it with "
        "moco.from_pretrained('REPO_ID') (or timm.create_model('hf-hub:REPO_ID', "
        "pretrained=True) for the networks timm has).",
    )
    cmds = p.add_subparsers(dest="hub_command", metavar="ACTION", required=True)
    push = cmds.add_parser("push", help="upload FOLDER to the Hub repository REPO_ID")
    push.add_argument("folder", metavar="FOLDER", help="a folder written by moco export --format hf")
    push.add_argument("repo_id", metavar="REPO_ID", help="owner/name of the model repository")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", default=None, help="branch to upload to (default: main)")
    push.add_argument("-m", "--message", default=None, help="commit message")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moco.hub.hf import push_to_hub

    url = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision,
                      commit_message=args.message)
    print(f"uploaded {args.folder} to {args.repo_id}: {url}")
    print(f"load it with: moco.from_pretrained({args.repo_id!r})")
    return 0


def export_hf(args: Any) -> int:
    """``moco export CKPT --format hf --out FOLDER``: the Hub model folder of CKPT."""
    from pathlib import Path

    from moco.hub.hf import save_for_hf
    from moco.utils.paths import check_output

    check_output(args.out, "--out", files={"the input checkpoint": args.checkpoint})
    if args.arch:
        print("moco export: warning: --arch is not used by --format hf (the architecture is "
              "read from the checkpoint)", file=sys.stderr)
    r = save_for_hf(args.checkpoint, args.out)
    i = r.info
    found = ", ".join(f"{f.evaluation} {f.top1:.2f}%" for f in r.summary.figures) or "none found"
    print(f"wrote {r.folder}: model.safetensors ({r.num_tensors} tensors, {i.arch}, "
          f"{i.feature_dim}-d features), config.json, README.md (the run's results: {found})")
    print(f"hf: load with moco.from_pretrained({str(Path(r.folder))!r})"
          + (f" or timm.create_model('local-dir:{r.folder}', pretrained=True)"
             if i.timm_compatible else ""))
    print(f"hf: share with: moco hub push {r.folder} OWNER/NAME (edit the licence in "
          "README.md first)")
    return 0
