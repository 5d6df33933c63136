"""detectron2 settings for an exported backbone, and the fine-tuning command (no detectron2 needed).

detectron2 builds its ResNet from ``MODEL.RESNETS``: ``DEPTH`` (blocks per stage),
``STEM_OUT_CHANNELS`` (the 7x7 conv), ``RES2_OUT_CHANNELS`` (output of the first stage, x2 per
stage), ``NUM_GROUPS`` x ``WIDTH_PER_GROUP`` (the 3x3 conv of the first stage's bottlenecks, x2
per stage). :func:`resnet_settings` reads them off our network, so a wide ResNet
(``resnet50w2``: stem 128, res2 512, width 128) or a ResNeXt gets the values that rebuild it
exactly; ``STRIDE_IN_1X1: False`` (torchvision puts the stride in the 3x3 conv) is in the
configs.

The configs (``moco/configs/detectron2/``) follow the original MoCo detection configs: Faster R-CNN
R50-C4 on VOC07+12 (24k iterations) and Mask R-CNN R50-C4 on COCO (1x, 2x), BN in every layer
(synchronised across GPUs), nothing frozen, the ``Res5ROIHeadsExtraNorm`` head, precise BN at
test time, RGB input normalised with the ImageNet mean/std x 255.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision.models.resnet import BasicBlock, Bottleneck

from moco.core.backbones import build_backbone
from moco.core.errors import Detectron2Error
from moco.core.timm_backbone import is_timm_arch

#: task -> config file in moco/configs/detectron2/
TASKS = {
    "voc": "pascal_voc_R_50_C4_24k_moco.yaml",
    "coco-1x": "coco_R_50_C4_1x_moco.yaml",
    "coco-2x": "coco_R_50_C4_2x_moco.yaml",
}
BASE_CONFIG = "Base-RCNN-C4-BN.yaml"

#: detectron2's defaults (detectron2/config/defaults.py) for the keys we may override.
RESNETS_DEFAULTS = {
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.NUM_GROUPS": 1,
    "MODEL.RESNETS.WIDTH_PER_GROUP": 64,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
}
#: what the configs set: the ImageNet mean/std of torchvision's preprocessing, x 255.
CONFIG_PIXEL_MEAN = (123.675, 116.280, 103.530)
CONFIG_PIXEL_STD = (58.395, 57.120, 57.375)

_DEPTHS: dict[tuple[str, tuple[int, ...]], int] = {
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
}



def resnet_settings(arch: str) -> dict[str, int]:
    """detectron2's ``MODEL.RESNETS`` values that rebuild ``arch`` (all five keys of
    :data:`RESNETS_DEFAULTS`). Raises :class:`Detectron2Error` for a network detectron2's
    ResNet cannot express (timm models)."""
    if is_timm_arch(arch):
        raise Detectron2Error(f"{arch}: detectron2's ResNet rebuilds torchvision-style ResNets only "
                              "(resnet50, resnet50w2, resnext50_32x4d, ...)")
    with torch.device("meta"):
        net = build_backbone(arch).model
    stages = [getattr(net, f"layer{i}") for i in (1, 2, 3, 4)]
    first = stages[0][0]
    kind = "bottleneck" if isinstance(first, Bottleneck) else "basic"
    depth = _DEPTHS.get((kind, tuple(len(s) for s in stages)))
    if depth is None or not isinstance(first, Bottleneck | BasicBlock):
        raise Detectron2Error(f"{arch}: no detectron2 DEPTH has its blocks per stage")
    stem = int(net.conv1.out_channels)  # type: ignore[union-attr,arg-type]
    if isinstance(first, Bottleneck):
        groups = int(first.conv2.groups)
        width = int(first.conv2.out_channels) // groups
        res2 = int(first.conv3.out_channels)
    else:
        groups, width, res2 = 1, 64, int(first.conv2.out_channels)
    return {"MODEL.RESNETS.DEPTH": depth, "MODEL.RESNETS.NUM_GROUPS": groups,
            "MODEL.RESNETS.WIDTH_PER_GROUP": width, "MODEL.RESNETS.STEM_OUT_CHANNELS": stem,
            "MODEL.RESNETS.RES2_OUT_CHANNELS": res2}


def c4_problem(arch: str, cifar_stem: bool = False) -> str | None:
    """Why ``arch`` cannot be fine-tuned with the R-C4 configs, or None when it can."""
    if cifar_stem:
        return (f"this {arch} has the CIFAR stem (3x3 conv1, no max-pool); detectron2's stem is "
                "the 7x7 conv + max-pool: pretrain with --cifar-stem false for detection")
    try:
        s = resnet_settings(arch)
    except Detectron2Error as e:
        return str(e)
    if s["MODEL.RESNETS.DEPTH"] in (18, 34):
        wide = s["MODEL.RESNETS.RES2_OUT_CHANNELS"] != 64
        return (f"{arch} is built of basic blocks: the C4 configs' ROI head (Res5ROIHeads) is a "
                "bottleneck res5 stage" + (", and detectron2 builds R18/R34 only with "
                "RES2_OUT_CHANNELS 64 (not this wide variant)" if wide else
                "; use it as the backbone of an FPN config instead"))
    return None


def resnet_overrides(arch: str) -> list[str]:
    """``KEY VALUE`` pairs (flattened) for the ``MODEL.RESNETS`` values that differ from
    detectron2's defaults: none for resnet50; STEM/RES2/WIDTH for resnet50w2."""
    out: list[str] = []
    for k, v in resnet_settings(arch).items():
        if RESNETS_DEFAULTS[k] != v:
            out += [k, str(v)]
    return out


def pixel_overrides(mean: Sequence[float], std: Sequence[float]) -> list[str]:
    """``MODEL.PIXEL_MEAN/STD`` overrides when the pretraining normalised with other constants
    than the configs' ImageNet mean/std (x 255, to 3 decimals)."""
    m = [round(255 * x, 3) for x in mean]
    s = [round(255 * x, 3) for x in std]
    same = all(abs(a - b) < 1e-3 for a, b in zip(m, CONFIG_PIXEL_MEAN, strict=True)) and all(
        abs(a - b) < 1e-3 for a, b in zip(s, CONFIG_PIXEL_STD, strict=True))
    if same:
        return []
    return ["MODEL.PIXEL_MEAN", f"[{', '.join(map(str, m))}]",
            "MODEL.PIXEL_STD", f"[{', '.join(map(str, s))}]"]


def config_dir() -> Path | None:
    """``moco/configs/detectron2``, installed with the package (package data), or None when
    it is missing (a damaged installation)."""
    d = Path(__file__).resolve().parents[1] / "configs" / "detectron2"
    return d if (d / BASE_CONFIG).is_file() else None


def training_command(config_file: str | Path, weights: str | Path, arch: str, *,
                     num_gpus: int = 8, output_dir: str | Path | None = None,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     python: str = "python") -> list[str]:
    """The argv that fine-tunes ``weights`` (a ``moco export --format detectron2`` pickle) with
    ``config_file``: ``python -m moco.detection.train_net --config-file CFG --num-gpus N
    MODEL.WEIGHTS W [MODEL.RESNETS.* for a wider/other ResNet] [MODEL.PIXEL_* when the
    pretraining used other mean/std] [OUTPUT_DIR D]``."""
    if num_gpus < 1:
        raise Detectron2Error(f"--num-gpus must be >= 1, got {num_gpus}")
    argv = [python, "-m", "moco.detection.train_net", "--config-file", str(config_file),
            "--num-gpus", str(num_gpus), "MODEL.WEIGHTS", str(weights), *resnet_overrides(arch)]
    if mean is not None and std is not None:
        argv += pixel_overrides(mean, std)
    if output_dir is not None:
        argv += ["OUTPUT_DIR", str(output_dir)]
    return argv


def shell_line(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)
