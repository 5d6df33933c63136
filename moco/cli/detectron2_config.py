"""``moco detectron2-config CKPT``: the commands that fine-tune a checkpoint with detectron2."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moco.cli.declared import add_declared, given_values
from moco.detection.settings import TASKS
from moco.utils.settings import REQUIRED, check_fields, from_parameters, setting


@dataclass
class Detectron2ConfigSettings:
    """The settings of ``moco detectron2-config``."""

    checkpoint: str = setting(REQUIRED, "checkpoint", group="detectron2", metavar="CKPT",
                              role="data", help="MoCo checkpoint (any that moco export reads)")
    task: str = setting("voc", "--task", group="detectron2", choices=tuple(sorted(TASKS)),
                        role="runtime", help="voc: Faster R-CNN on VOC07+12, 24k iterations; "
                        "coco-1x / coco-2x: Mask R-CNN on COCO, 90k / 180k iterations")
    weights: str = setting("", "--weights", group="detectron2", metavar="FILE.pkl",
                           role="runtime", default_text="CKPT's name with _detectron2.pkl",
                           help="the detectron2 export; an existing file must be one, and is "
                           "exported again when older than CKPT")
    num_gpus: int = setting(8, "--num-gpus", group="detectron2", min=1, role="runtime",
                            help="GPUs on this machine (8: the papers' 16 images per batch at "
                            "2 per GPU)")
    output_dir: str = setting("", "--output-dir", group="detectron2", metavar="DIR",
                              role="runtime", default_text="detectron2's own",
                              help="detectron2's OUTPUT_DIR")
    config_dir: str = setting("", "--config-dir", group="detectron2", metavar="DIR",
                              role="runtime",
                              default_text="moco/configs/detectron2, installed with moco",
                              help="folder of the configs")
    arch: str | None = setting(None, "-a", "--arch", group="detectron2",
                               default_text="from CKPT", help="expected architecture")

    def __post_init__(self) -> None:
        check_fields(self, from_parameters("Detectron2ConfigSettings"))


#: The declaration of every flag of ``moco detectron2-config``.
DECLARED = (Detectron2ConfigSettings,)


def add_parser(sub: Any) -> None:
    from moco.cli import COMMANDS

    p = sub.add_parser(
        "detectron2-config", help=COMMANDS["detectron2_config"],
        description="Print the commands that transfer CKPT to detection as the MoCo papers do "
        "(R50-C4 with BN everywhere and the extra norm after res5): the export to detectron2's "
        "format (when --weights does not exist yet or is older than CKPT) and the training "
        "command with the config of --task from configs/detectron2 and the MODEL.RESNETS "
        "values of CKPT's architecture (e.g. STEM_OUT_CHANNELS 128, RES2_OUT_CHANNELS 512, "
        "WIDTH_PER_GROUP 128 for resnet50w2). Needs detectron2 only to run the printed "
        "training command.",
    )
    add_declared(p, DECLARED)
    p.set_defaults(run=run)


def default_weights(ckpt: Path) -> Path:
    """``runs/x/checkpoint_0199.pth.tar`` -> ``runs/x/checkpoint_0199_detectron2.pkl``."""
    name = ckpt.name
    for suffix in (".pth.tar", ".safetensors", ".pth", ".pt", ".tar"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return ckpt.with_name(f"{name}_detectron2.pkl")


def commands(cfg: Detectron2ConfigSettings) -> tuple[list[list[str]], str]:
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

    ckpt = Path(cfg.checkpoint)
    info = describe_encoder(read_encoder(ckpt), cfg.arch, ckpt)
    problem = c4_problem(info.arch, info.cifar_stem)
    if problem is not None:
        raise Detectron2Error(f"{ckpt}: {problem}")
    folder = Path(cfg.config_dir) if cfg.config_dir else config_dir()
    if folder is None:
        raise Detectron2Error("moco/configs/detectron2 is missing from this installation: "
                              "reinstall momentum-contrast, or pass --config-dir with the folder "
                              "from the moco source repository")
    config = folder / TASKS[cfg.task]
    if not config.is_file():
        raise Detectron2Error(f"{config} does not exist: --config-dir must hold {TASKS[cfg.task]}")
    weights = Path(cfg.weights) if cfg.weights else default_weights(ckpt)
    out: list[list[str]] = []
    stale = weights.exists() and is_stale(weights, ckpt)
    if weights.exists():
        check_detectron2_weights(weights)
    if not weights.exists() or stale:
        out.append(["moco", "export", str(ckpt), "--format", "detectron2", "--out", str(weights)])
    out.append(training_command(config.resolve(), weights, info.arch, num_gpus=cfg.num_gpus,
                                output_dir=cfg.output_dir or None, mean=info.mean, std=info.std))
    extra = resnet_overrides(info.arch)
    desc = (f"{info.arch} ({' '.join(extra) if extra else 'detectron2 default ResNet-50'}), "
            f"task {cfg.task}: {config.name}")
    if stale:
        desc += f"; {weights} is older than the checkpoint: exported again"
    return out, desc


def run(args: argparse.Namespace) -> int:
    from moco.detection.settings import shell_line

    cfg = Detectron2ConfigSettings(**given_values(args, DECLARED))
    argvs, desc = commands(cfg)
    print(f"# detectron2 fine-tuning of {cfg.checkpoint}: {desc}")
    print("# needs detectron2 (see its install guide) and the datasets under ./datasets or "
          "$DETECTRON2_DATASETS", file=sys.stderr)
    for argv in argvs:
        print(shell_line(argv))
    return 0
