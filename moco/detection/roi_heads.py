"""``Res5ROIHeadsExtraNorm``: detectron2's C4 ROI head with one more norm layer after res5.

MoCo v1 §4.2 (and its appendix) fine-tunes R50-C4 with BN in every layer and "an extra BN"
after the res5 stage of the ROI head, so that the per-region features are normalised like the
rest of the network. The norm's type is ``MODEL.RESNETS.NORM`` (the configs: naiveSyncBN), its
width the res5 output (2048 for ResNet-50, 4096 for resnet50w2).

Importing this module registers the head in detectron2's ``ROI_HEADS_REGISTRY`` (under
``MODEL.ROI_HEADS.NAME: "Res5ROIHeadsExtraNorm"``); it needs detectron2 installed. The norm is
added in ``__init__`` (not in ``_build_res5_block``), which works with current detectron2.
"""

from __future__ import annotations

from typing import Any

from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

__all__ = ["Res5ROIHeadsExtraNorm"]


class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """:class:`Res5ROIHeads` whose ``res5`` ends with ``norm`` (``MODEL.RESNETS.NORM`` over the
    res5 output channels): region features [R, C, 7, 7] -> res5 -> norm -> box/mask heads."""

    def __init__(self, cfg: Any, input_shape: Any) -> None:
        super().__init__(cfg, input_shape)
        self.res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, self.res5[-1].out_channels))


if "Res5ROIHeadsExtraNorm" not in ROI_HEADS_REGISTRY:
    ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)
