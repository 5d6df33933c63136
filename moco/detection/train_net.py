"""Fine-tune a MoCo backbone with detectron2: ``python -m moco.detection.train_net``.

The original MoCo release's ``detection/train_net.py``, as a module of this package: detectron2's
``DefaultTrainer`` with the ``Res5ROIHeadsExtraNorm`` head registered, COCO's evaluator for
``coco*`` test sets and PASCAL VOC's for ``voc*``. Flags are detectron2's
``default_argument_parser`` (``--config-file``, ``--num-gpus``, ``--num-machines``,
``--resume``, ``--eval-only``, then ``KEY VALUE`` overrides), e.g.::

    python -m moco.detection.train_net --config-file configs/detectron2/pascal_voc_R_50_C4_24k_moco.yaml \\
        --num-gpus 8 MODEL.WEIGHTS moco_r50.pkl

``moco detectron2-config CKPT`` prints this command for a checkpoint. Datasets are found the
detectron2 way: ``./datasets`` or ``$DETECTRON2_DATASETS`` (VOC2007, VOC2012, coco).
"""

from __future__ import annotations

import os
from typing import Any

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator

import moco.detection.roi_heads  # noqa: F401  (registers Res5ROIHeadsExtraNorm)


class Trainer(DefaultTrainer):
    """detectron2's trainer with the evaluator each test set needs."""

    @classmethod
    def build_evaluator(cls, cfg: Any, dataset_name: str, output_folder: str | None = None) -> Any:
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        if "coco" in dataset_name:
            return COCOEvaluator(dataset_name, cfg, True, output_folder)
        if "voc" in dataset_name:
            return PascalVOCDetectionEvaluator(dataset_name)
        raise ValueError(f"no evaluator for dataset {dataset_name!r} (expected a coco* or voc* set)")


def setup(args: Any) -> Any:
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args: Any) -> Any:
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli() -> None:
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    cli()
