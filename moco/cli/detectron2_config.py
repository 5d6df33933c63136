"""``moco detectron2-config CKPT``: the commands that fine-tune a checkpoint with detectron2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from moco.detection.settings import TASKS


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "detectron2-config", help="print the detectron2 fine-tuning command for a checkpoint",
        description="Print the commands that transfer CKPT to detection as the MoCo papers do "
        "(R50-C4 with BN everywhere and the extra norm after res5): the export to detectron2's "
        "format (when --weights does not exist yet or is older than CKPT) and the training command with the config of "
        "--task from configs/detectron2 and the MODEL.RESNETS values of CKPT's architecture "
        "(e.g. STEM_OUT_CHANNELS 128, RES2_OUT_CHANNELS 512, WIDTH_PER_GROUP 128 for resnet50w2). "
        "Needs detectron2 only to run the printed training command.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="MoCo checkpoint (any that moco export reads)")
    p.add_argument("--task", choices=sorted(TASKS), default="voc",
                   help="voc: Faster R-CNN on VOC07+12, 24k iterations; coco-1x / coco-2x: Mask "
                   "R-CNN on COCO, 90k / 180k iterations (default: voc)")
    p.add_argument("--weights", metavar="FILE.pkl", default=None,
                   help="the detectron2 export (default: CKPT's name with _detectron2.pkl); an "
                   "existing file must be one, and is exported again when older than CKPT")
    p.add_argument("--num-gpus", type=int, default=8, help="GPUs on this machine (default: 8, "
                   "the papers' 16 images per batch at 2 per GPU)")
    p.add_argument("--output-dir", default=None, help="detectron2's OUTPUT_DIR (default: its own)")
    p.add_argument("--config-dir", default=None, metavar="DIR",
                   help="folder of the configs (default: moco/configs/detectron2, installed with moco)")
    p.add_argument("-a", "--arch", default=None, help="expected architecture (default: from CKPT)")
    p.set_defaults(run=run)


def default_weights(ckpt: Path) -> Path:
    """``runs/x/checkpoint_0199.pth.tar`` -> ``runs/x/checkpoint_0199_detectron2.pkl``."""
    name = ckpt.name
    for suffix in (".pth.tar", ".safetensors", ".pth", ".pt", ".tar"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return ckpt.with_name(f"{name}_detectron2.pkl")


def commands(args: argparse.Namespace) -> tuple[list[list[str]], str]:
    """The argvs to run (export if needed, then training) and a one-line description."""
    from moco.detection.settings import (
        Detectron2Error,
        c4_problem,
        config_dir,
        resnet_overrides,
        training_command,
    )
    from moco.detection.weights import check_detectron2_weights, is_stale
    from moco.eval.pretrained import describe_encoder, read_encoder

    ckpt = Path(args.checkpoint)
    info = describe_encoder(read_encoder(ckpt), args.arch, ckpt)
    problem = c4_problem(info.arch, info.cifar_stem)
    if problem is not None:
        raise Detectron2Error(f"{ckpt}: {problem}")
    folder = Path(args.config_dir) if args.config_dir else config_dir()
    if folder is None:
        raise Detectron2Error("moco/configs/detectron2 is missing from this installation: "
                              "reinstall momentum-contrast, or pass --config-dir with the folder "
                              "from the moco source repository")
    config = folder / TASKS[args.task]
    if not config.is_file():
        raise Detectron2Error(f"{config} does not exist: --config-dir must hold {TASKS[args.task]}")
    weights = Path(args.weights) if args.weights else default_weights(ckpt)
    out: list[list[str]] = []
    stale = weights.exists() and is_stale(weights, ckpt)
    if weights.exists():
        check_detectron2_weights(weights)
    if not weights.exists() or stale:
        out.append(["moco", "export", str(ckpt), "--format", "detectron2", "--out", str(weights)])
    out.append(training_command(config.resolve(), weights, info.arch, num_gpus=args.num_gpus,
                                output_dir=args.output_dir, mean=info.mean, std=info.std))
    extra = resnet_overrides(info.arch)
    desc = (f"{info.arch} ({' '.join(extra) if extra else 'detectron2 default ResNet-50'}), "
            f"task {args.task}: {config.name}")
    if stale:
        desc += f"; {weights} is older than the checkpoint: exported again"
    return out, desc


def run(args: argparse.Namespace) -> int:
    from moco.detection.settings import shell_line

    argvs, desc = commands(args)
    print(f"# detectron2 fine-tuning of {args.checkpoint}: {desc}")
    print("# needs detectron2 (see its install guide) and the datasets under ./datasets or "
          "$DETECTRON2_DATASETS", file=sys.stderr)
    for argv in argvs:
        print(shell_line(argv))
    return 0
