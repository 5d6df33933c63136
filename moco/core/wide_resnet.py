"""Wide ResNets as in the MoCo and CPC papers: every layer k times wider, stem included.

MoCo v1 (He et al., CVPR 2020, Table 1 and §4.1) reports R50w2x (94M parameters) and R50w4x
(375M) after CPC v2 (Hénaff et al. 2019), whose wide ResNets follow Kolesnikov et al.
(2019, "Revisiting self-supervised visual representation learning"): the number of channels
of *every* convolution is multiplied by k, the 7x7 stem conv included. So ResNet-50 w2x has a
128-channel stem, bottleneck widths 128/256/512/1024, block outputs 512/1024/2048/4096 and
4096-d pooled features; w4x has a 256-channel stem and 8192-d features.

This is not torchvision's ``wide_resnet50_2`` (Zagoruyko & Komodakis' WRN as used by
torchvision): that one widens only the bottleneck's 3x3 conv and keeps 2048-d features
(68.9M parameters).

The networks are torchvision's own :class:`~torchvision.models.resnet.ResNet`,
:class:`~torchvision.models.resnet.Bottleneck` and :class:`~torchvision.models.resnet.BasicBlock`
with every stage's ``planes`` multiplied by k, so the state-dict names are torchvision's
(``conv1.weight``, ``layer1.0.conv1.weight``, ..., ``fc.weight``) and an exported backbone
loads with::

    from moco.core.wide_resnet import resnet50w2
    net = resnet50w2()                                  # 1000-way fc, random weights
    net.load_state_dict(torch.load("r50w2_moco.pth", weights_only=True), strict=False)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from moco.core.errors import ConfigError

# name -> (block, blocks per stage, width multiplier k)
WIDE_RESNETS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], list[int], int]] = {
    "resnet18w2": (BasicBlock, [2, 2, 2, 2], 2),
    "resnet18w4": (BasicBlock, [2, 2, 2, 2], 4),
    "resnet34w2": (BasicBlock, [3, 4, 6, 3], 2),
    "resnet34w4": (BasicBlock, [3, 4, 6, 3], 4),
    "resnet50w2": (Bottleneck, [3, 4, 6, 3], 2),
    "resnet50w4": (Bottleneck, [3, 4, 6, 3], 4),
}


class WideResNet(ResNet):  # type: ignore[misc]  # torchvision's classes are untyped
    """torchvision's ResNet with every layer ``width`` times wider (stem, bottlenecks, block
    outputs, ``fc`` input): input [B,3,H,W] -> logits [B, num_classes]; pooled features
    [B, 512 * expansion * width]."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], width: int,
                 num_classes: int = 1000, norm_layer: Callable[..., nn.Module] | None = None,
                 **kwargs: Any) -> None:
        if width < 1:
            raise ConfigError(f"width must be >= 1, got {width}")
        self.width = width
        super().__init__(block, layers, num_classes=num_classes, norm_layer=norm_layer, **kwargs)
        # torchvision's __init__ builds a 64-channel stem and a 512*expansion fc; widen both and
        # initialise them as it does (kaiming fan_out for the conv, BN weight 1 / bias 0).
        stem = 64 * width
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = self._norm_layer(stem)
        if isinstance(self.bn1, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.constant_(self.bn1.weight, 1)
            nn.init.constant_(self.bn1.bias, 0)
        self.fc = nn.Linear(512 * block.expansion * width, num_classes)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int,
                    stride: int = 1, dilate: bool = False) -> nn.Sequential:
        if planes == 64:  # layer1: its input is the widened stem
            self.inplanes = 64 * self.width
        layer: nn.Sequential = super()._make_layer(block, planes * self.width, blocks, stride,
                                                   dilate)
        return layer


def wide_resnet(name: str, **kwargs: Any) -> WideResNet:
    """The wide ResNet ``name`` (a key of :data:`WIDE_RESNETS`) with random weights."""
    if name not in WIDE_RESNETS:
        raise ConfigError(f"unknown wide ResNet {name!r}; choose one of {', '.join(WIDE_RESNETS)}")
    block, layers, width = WIDE_RESNETS[name]
    return WideResNet(block, layers, width, **kwargs)


def resnet50w2(**kwargs: Any) -> WideResNet:
    """ResNet-50 w2x (MoCo v1 Table 1: 94M parameters): 128-channel stem, 4096-d features."""
    return wide_resnet("resnet50w2", **kwargs)


def resnet50w4(**kwargs: Any) -> WideResNet:
    """ResNet-50 w4x (MoCo v1 Table 1: 375M parameters): 256-channel stem, 8192-d features."""
    return wide_resnet("resnet50w4", **kwargs)


def resnet18w2(**kwargs: Any) -> WideResNet:
    return wide_resnet("resnet18w2", **kwargs)


def resnet18w4(**kwargs: Any) -> WideResNet:
    return wide_resnet("resnet18w4", **kwargs)


def resnet34w2(**kwargs: Any) -> WideResNet:
    return wide_resnet("resnet34w2", **kwargs)


def resnet34w4(**kwargs: Any) -> WideResNet:
    return wide_resnet("resnet34w4", **kwargs)
