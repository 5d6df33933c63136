"""The papers' wide ResNets: every layer k times wider than torchvision's ResNet (stem included),
parameter counts against MoCo v1 Table 1, feature widths, and the torchvision-style builder."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from moco.core.backbones import build_backbone, check_arch, count_parameters
from moco.core.errors import ConfigError
from moco.core.wide_resnet import WIDE_RESNETS, resnet50w2, wide_resnet

# MoCo v1 Table 1 (parameters of the encoder; the papers count the backbone, whose pooled
# features feed the 128-d head): R50 24M, RX50 (32x8d) 46M, R50w2x 94M, R50w4x 375M.
PAPER_PARAMS = {"resnet50": 24e6, "resnext50_32x8d": 46e6, "resnet50w2": 94e6, "resnet50w4": 375e6}


def _backbone_params(arch: str) -> int:
    with torch.device("meta"):  # no memory: a 375M model costs nothing to count
        net = build_backbone(arch).model
    return sum(p.numel() for n, p in net.named_parameters() if not n.startswith("fc."))


@pytest.mark.parametrize("arch", sorted(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(arch: str) -> None:
    n = _backbone_params(arch)
    paper = PAPER_PARAMS[arch]
    assert round(n / 1e6) == paper / 1e6  # the table's figures are rounded to 1M
    if arch in ("resnet50w2", "resnet50w4"):
        assert abs(n - paper) / paper < 0.01, n
        # with MoCo's 128-d v1 head as well (the encoder as pretrained): still within 1%
        head = _backbone_params(arch) + (4096 if arch == "resnet50w2" else 8192) * 128 + 128
        assert abs(head - paper) / paper < 0.01, head


def test_measured_counts() -> None:
    """The exact figures quoted in the docs."""
    assert _backbone_params("resnet50w2") == 93_907_072
    assert _backbone_params("resnet50w4") == 375_378_176
    assert _backbone_params("resnext50_32x8d") == 45_972_800


@pytest.mark.parametrize(("wide", "base", "k"), [("resnet50w2", "resnet50", 2),
                                                 ("resnet50w4", "resnet50", 4),
                                                 ("resnet18w2", "resnet18", 2),
                                                 ("resnet34w4", "resnet34", 4)])
def test_every_layer_is_k_times_wider_than_torchvision(wide: str, base: str, k: int) -> None:
    """Same tensor names as torchvision's ResNet; every dimension multiplied by k except the
    RGB input of conv1 and fc's output (the classes)."""
    with torch.device("meta"):
        w = wide_resnet(wide).state_dict()
        b = getattr(torchvision.models, base)().state_dict()
    assert list(w) == list(b)
    for name, t in b.items():
        want = [d * k for d in t.shape]
        if name == "conv1.weight":
            want[1] = 3
        if name.startswith("fc."):
            want[0] = t.shape[0]
        if t.dim() == 4:
            want[2:] = t.shape[2:]  # kernel sizes unchanged
        assert list(w[name].shape) == want, name


def test_feature_widths_and_stems() -> None:
    for arch, (stem, dim) in {"resnet50w2": (128, 4096), "resnet50w4": (256, 8192),
                              "resnet18w2": (128, 1024), "resnet34w4": (256, 2048),
                              "wide_resnet50_2": (64, 2048)}.items():
        with torch.device("meta"):
            b = build_backbone(arch)
        assert (b.model.conv1.out_channels, b.feature_dim) == (stem, dim), arch
    assert set(WIDE_RESNETS) == {f"resnet{d}w{k}" for d in (18, 34, 50) for k in (2, 4)}


def test_forward_and_init() -> None:
    torch.manual_seed(0)
    net = wide_resnet("resnet18w2", num_classes=10).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # the widened stem is initialised as torchvision's: kaiming fan_out, BN weight 1 / bias 0
    std = net.conv1.weight.std().item()
    assert abs(std - (2 / (128 * 49)) ** 0.5) < 0.1 * std
    assert torch.equal(net.bn1.weight, torch.ones(128)) and torch.equal(net.bn1.bias, torch.zeros(128))
    # the CIFAR stem keeps the widened width
    cifar = build_backbone("resnet18w2", cifar_stem=True).model
    assert (cifar.conv1.out_channels, cifar.conv1.kernel_size) == (128, (3, 3))
    assert isinstance(cifar.maxpool, nn.Identity)


def test_builder_has_the_1000_way_fc() -> None:
    with torch.device("meta"):
        n = count_parameters(resnet50w2())
    assert n == 93_907_072 + 4096 * 1000 + 1000  # the builder's default 1000-way fc


def test_unknown_architecture_lists_what_is_accepted() -> None:
    with pytest.raises(ConfigError, match=r"unknown architecture 'resnet50w3'.*resnet50w2.*timm:NAME"):
        check_arch("resnet50w3")
    with pytest.raises(ValueError, match="unknown wide ResNet"):
        wide_resnet("resnet50w3")
