"""``moco export CKPT --format torchvision|detectron2|safetensors|timm|hf --out FILE``; the flags
are generated from :class:`ExportSettings`. The formats of :mod:`moco.eval.export` are written
there; ``hf`` (a Hugging Face Hub model folder) lives above evaluation, in :mod:`moco.hub`, and
is dispatched here."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from typing import Any

from moco.cli.declared import add_declared, given_values
from moco.eval.export import EXPORT_FORMATS
from moco.utils import common_settings as common
from moco.utils.settings import REQUIRED, check_fields, from_parameters, setting


@dataclass
class ExportSettings:
    """The settings of ``moco export``."""

    checkpoint: str = setting(REQUIRED, "checkpoint", group="export", metavar="CKPT",
                              role="data", help="checkpoint to export")
    format: str = setting(REQUIRED, "--format", "-f", group="export",
                          choices=(*EXPORT_FORMATS, "hf"), help="output format (hf: a Hugging "
                          "Face Hub model folder, --out FOLDER: model.safetensors, config.json, "
                          "README.md)")
    out: str = setting(REQUIRED, "--out", "-o", group="export", metavar="FILE", role="runtime",
                       help="file to write (a folder for --format hf)")
    arch: str | None = setting(None, "-a", "--arch", group="export",
                               default_text="read from the checkpoint",
                               help="expected architecture")
    seed: int = common.seed(group="export",
                            help="seed of the fresh classifier init of --format timm")

    def __post_init__(self) -> None:
        check_fields(self, from_parameters("ExportSettings"))


#: The declaration of every flag of ``moco export``.
DECLARED = (ExportSettings,)


def add_parser(sub: Any) -> None:
    from moco.cli import COMMANDS

    p = sub.add_parser(
        "export", help=COMMANDS["export"],
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
    add_declared(p, DECLARED)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moco.eval.export import export_checkpoint
    from moco.utils.paths import check_output, check_writable_parent

    cfg = ExportSettings(**given_values(args, DECLARED))
    if cfg.format == "hf":
        from moco.cli.hub import export_hf

        return export_hf(cfg)
    check_output(cfg.out, "--out", files={"the input checkpoint": cfg.checkpoint})
    check_writable_parent(cfg.out, "--out")

    r = export_checkpoint(cfg.checkpoint, cfg.format, cfg.out, arch=cfg.arch, seed=cfg.seed)
    for w in r.warnings:
        print(f"moco export: warning: {w}", file=sys.stderr)
    print(f"wrote {r.path}: {r.format}, {r.num_tensors} tensors, {r.info.describe()}")
    for note in r.notes:
        print(f"{r.format}: {note}")
    if r.format == "detectron2":
        print("detectron2: train with the MoCo configs (moco/configs/detectron2: INPUT.FORMAT RGB, "
              "PIXEL_MEAN [123.675, 116.280, 103.530], PIXEL_STD [58.395, 57.120, 57.375], "
              f"RESNETS.STRIDE_IN_1X1 False) and MODEL.WEIGHTS {r.path}; the whole command: "
              f"moco detectron2-config {shlex.quote(cfg.checkpoint)} --weights "
              f"{shlex.quote(str(r.path))}")
    return 0
