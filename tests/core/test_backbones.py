"""The backbone registry (moco.core.backbones): factories of the original form and factories
that take BackboneOptions, the options every network takes after its factory (CIFAR stem,
zero-initialised residual blocks), and the head found by name for the feature width."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from moco.core import backbones as B
from moco.core.errors import ConfigError


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, B.OptionsFactory]:
    """The registry, restored after the test."""
    reg = dict(B._REGISTRY)
    monkeypatch.setattr(B, "_REGISTRY", reg)
    return reg


def test_a_factory_of_the_original_form_still_registers(registry: dict) -> None:
    """``register_backbone(name, factory)`` with ``factory(norm_layer)``, as before options."""
    seen: list[object] = []

    def factory(norm_layer: B.NormLayer | None) -> nn.Module:
        seen.append(norm_layer)
        return torchvision.models.resnet18(num_classes=10)

    B.register_backbone("my_resnet", factory)
    b = B.build_backbone("my_resnet", cifar_stem=True)
    assert b.feature_dim == 512 and seen == [None]
    assert b.model.conv1.kernel_size == (3, 3) and isinstance(b.model.maxpool, nn.Identity)
    assert "my_resnet" in B.available_backbones()
    with pytest.raises(ConfigError, match="--patch-size is for the ViTs"):
        B.build_backbone("my_resnet", options=B.BackboneOptions(patch_size=8))


def test_a_factory_that_takes_options(registry: dict) -> None:
    got: list[B.BackboneOptions] = []

    def factory(o: B.BackboneOptions) -> nn.Module:
        got.append(o)
        net = nn.Sequential(nn.Flatten(), nn.Linear(3 * o.image_size ** 2, 7))  # type: ignore[operator]
        net.head = net[1]  # type: ignore[assignment]
        return net

    B.register_backbone("flat", factory, takes_options=True)
    opts = B.BackboneOptions(image_size=4, patch_size=2)
    assert B.build_backbone("flat", options=opts).feature_dim == 48
    assert got == [opts]


def test_zero_init_residual_zeroes_the_last_bn_of_every_block() -> None:
    for arch, block, last in (("resnet18", BasicBlock, "bn2"), ("resnet50", Bottleneck, "bn3"),
                              ("resnet18w2", BasicBlock, "bn2")):
        torch.manual_seed(0)
        net = B.build_backbone(arch, options=B.BackboneOptions(zero_init_residual=True)).model
        blocks = [m for m in net.modules() if isinstance(m, block)]
        assert blocks and all(not getattr(m, last).weight.any() for m in blocks)
        assert net.bn1.weight.all() and all(m.bn1.weight.all() for m in blocks)
        plain = B.build_backbone(arch).model
        assert all(getattr(m, last).weight.all() for m in plain.modules() if isinstance(m, block))
    # the same as torchvision's own option
    torch.manual_seed(0)
    ours = B.build_backbone("resnet50", options=B.BackboneOptions(zero_init_residual=True)).model
    torch.manual_seed(0)
    ref = torchvision.models.resnet50(zero_init_residual=True)
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k


def test_the_head_must_be_a_linear(registry: dict) -> None:
    B.register_backbone("odd", lambda norm_layer: nn.Sequential(nn.Conv2d(3, 3, 1)))
    with pytest.raises(ConfigError, match="has no head layer"):
        B.build_backbone("odd")
    net = torchvision.models.resnet18()
    net.fc = nn.Sequential(nn.Linear(512, 3))  # type: ignore[assignment]
    B.register_backbone("mlp_head", lambda norm_layer: net)
    with pytest.raises(ConfigError, match="must end in a Linear head"):
        B.build_backbone("mlp_head")


def test_accepted_names_mention_the_vits_and_timm() -> None:
    text = B.accepted_archs_text()
    assert "vit_small" in text and "timm:NAME" in text
    with pytest.raises(ConfigError, match="unknown architecture 'vit_huge'"):
        B.check_arch("vit_huge")
