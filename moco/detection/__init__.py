"""Detection transfer with detectron2, as the original MoCo release ships it (MoCo v1 §4.2).

* :mod:`moco.detection.settings`: which detectron2 ``MODEL.RESNETS.*`` values describe a
  backbone, the configs in ``configs/detectron2/`` and the exact training command (no
  detectron2 needed);
* :mod:`moco.detection.weights`: whether a file is a detectron2 export (read without running
  code from it) and whether it is older than its checkpoint;
* :mod:`moco.detection.roi_heads`: the ``Res5ROIHeadsExtraNorm`` ROI head (imports detectron2);
* :mod:`moco.detection.train_net`: the fine-tuning script (imports detectron2).

The weights come from ``moco export --format detectron2`` (:mod:`moco.eval.export`).
"""
