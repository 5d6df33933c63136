"""``-a timm:NAME``: timm CNNs as MoCo backbones, timm ViTs as MoCo v3 backbones, SplitBatchNorm
on timm's BatchNormAct2d, and ``moco export --format timm`` loaded by
``timm.create_model(..., pretrained=True)``."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from timm.layers import BatchNormAct2d  # noqa: E402

from moco.core.backbones import BackboneOptions, build_backbone  # noqa: E402
from moco.core.errors import ConfigError  # noqa: E402
from moco.core.model import build_encoder  # noqa: E402
from moco.core.shuffle_bn import SplitBatchNorm, SplitBatchNormAct, convert_split_bn  # noqa: E402
from moco.core.timm_backbone import TimmBackbone, convert_sync_batchnorm, timm_state_dict  # noqa: E402

X = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(0))
# A small timm CNN whose norm layers are BatchNormAct2d (BN + activation in one module).
BN_ACT = "mobilenetv3_small_050"


def test_backbone_is_the_timm_model_without_its_classifier() -> None:
    torch.manual_seed(0)
    b = build_backbone("timm:resnet26d")
    assert isinstance(b.model, TimmBackbone) and b.feature_dim == 2048
    ref = timm.create_model("resnet26d")
    sd = b.model.body.state_dict()
    assert set(sd) == {k for k in ref.state_dict() if not k.startswith("fc.")}
    ref.load_state_dict({**sd, "fc.weight": ref.fc.weight, "fc.bias": ref.fc.bias})
    b.model.fc = nn.Identity()
    with torch.no_grad():
        want = ref.eval().forward_head(ref.forward_features(X), pre_logits=True)
        torch.testing.assert_close(b.model.eval()(X), want, rtol=0, atol=0)


def test_feature_width_after_a_pre_logits_stage() -> None:
    b = build_backbone(f"timm:{BN_ACT}")  # pool -> conv_head (1024) -> classifier
    assert b.feature_dim == 1024
    with torch.no_grad():
        assert b.model.body.eval()(X).shape == (4, 1024)


def test_errors() -> None:
    with pytest.raises(ConfigError, match="no BatchNorm layer"):
        build_backbone("timm:test_vit")
    with pytest.raises(ConfigError, match="timm has no model named 'resnet_nope'"):
        build_backbone("timm:resnet_nope")
    with pytest.raises(ConfigError, match="keeps its own"):
        build_backbone("timm:resnet26d", cifar_stem=True)


def test_a_timm_vit_is_a_mocov3_backbone() -> None:
    """Without BatchNorm it is refused for MoCo v1/v2 only (above); its features are the
    [CLS] token after the final norm, at the image size asked for, and the random patch
    projection applies to it."""
    from moco.core.mocov3 import MoCoV3Config, build_mocov3

    opts = BackboneOptions(require_batchnorm=False, image_size=32, stop_grad_conv1=True)
    torch.manual_seed(0)
    b = build_backbone("timm:test_vit", options=opts)
    body = b.model.body
    assert isinstance(b.model, TimmBackbone) and b.feature_dim == body.embed_dim == 64
    assert tuple(body.patch_embed.img_size) == (32, 32)
    assert not body.patch_embed.proj.weight.requires_grad and body.blocks[0].attn.qkv.weight.requires_grad
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = body.norm(body.blocks(body._pos_embed(body.patch_embed(x))))[:, 0]
        torch.testing.assert_close(body.eval()(x), want)
    model = build_mocov3("timm:test_vit", MoCoV3Config(dim=8, mlp_dim=16, t=0.2), opts)
    assert sum(isinstance(m, nn.Linear) for m in model.base_encoder.fc) == 3  # the ViT projector
    assert model(x, x).loss.ndim == 0
    with pytest.raises(ConfigError, match="patch size of timm:test_vit is part of its timm name"):
        build_backbone("timm:test_vit", options=BackboneOptions(require_batchnorm=False,
                                                                patch_size=8))


def test_missing_timm_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'momentum-contrast\[timm\]'"):
        build_backbone("timm:resnet26d")


def test_split_bn_keeps_the_activation_of_batchnormact() -> None:
    torch.manual_seed(0)
    net = build_backbone(f"timm:{BN_ACT}").model
    n_bnact = sum(isinstance(m, BatchNormAct2d) for m in net.modules())
    assert n_bnact > 10
    split = convert_split_bn(copy.deepcopy(net), 2)
    assert sum(isinstance(m, SplitBatchNormAct) for m in split.modules()) == n_bnact
    assert not any(isinstance(m, BatchNormAct2d) for m in split.modules())
    assert list(split.state_dict()) == list(net.state_dict())  # same names: exports unchanged
    with torch.no_grad():
        # eval: plain BN with the running statistics, then the activation
        torch.testing.assert_close(split.eval()(X), net.eval()(X), rtol=0, atol=0)
        # training: each strided sub-batch is normalised on its own, i.e. exactly the
        # unconverted network in training mode run on that sub-batch alone
        out = split.train()(X)
        for s in range(2):
            ref = copy.deepcopy(net).train()(X[s::2])
            torch.testing.assert_close(out[s::2], ref, rtol=1e-4, atol=1e-5)


def test_moco_encoder_of_a_timm_model_with_split_bn() -> None:
    enc = build_encoder(f"timm:{BN_ACT}", 16, mlp=True, cifar_stem=False, bn_splits=2)
    assert any(isinstance(m, SplitBatchNorm) for m in enc.modules())
    assert enc.fc[0].in_features == 1024
    assert enc.train()(X).shape == (4, 16)


def test_sync_batchnorm_keeps_the_activation() -> None:
    from timm.layers.norm_act import SyncBatchNormAct

    net = convert_sync_batchnorm(build_backbone(f"timm:{BN_ACT}").model)
    assert any(isinstance(m, SyncBatchNormAct) for m in net.modules())
    assert not any(type(m) is nn.SyncBatchNorm for m in net.modules())
    r = convert_sync_batchnorm(build_backbone("resnet18").model)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in r.modules()) == 20


def test_timm_state_dict_has_the_default_head_at_a_fresh_init() -> None:
    b = build_backbone("timm:resnet26d").model
    backbone = {k: v for k, v in b.state_dict().items() if not k.startswith("fc.")}
    sd, heads = timm_state_dict("timm:resnet26d", backbone, seed=3)
    assert heads == ["fc.weight", "fc.bias"]
    net = timm.create_model("resnet26d")
    net.load_state_dict(sd)  # strict
    torch.manual_seed(3)
    fresh = timm.create_model("resnet26d")
    assert torch.equal(sd["fc.weight"], fresh.fc.weight) and torch.equal(sd["fc.bias"], fresh.fc.bias)
    with pytest.raises(ConfigError, match="does not fit timm's resnet26d"):
        timm_state_dict("timm:resnet26d", {**backbone, "body.extra": torch.zeros(1)})
    with pytest.raises(ConfigError, match="timm has no model named resnet50w2"):
        timm_state_dict("resnet50w2", {})


def test_export_formats_for_timm_backbones(tmp_path: Path) -> None:
    from moco.core.heads import linear_head
    from moco.eval.export import export_checkpoint

    torch.manual_seed(0)
    net = build_backbone(f"timm:{BN_ACT}").model
    net.fc = linear_head(1024, 8)
    ckpt = tmp_path / "c.pth.tar"
    torch.save({"arch": f"timm:{BN_ACT}", "epoch": 1,
                "state_dict": {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}},
               ckpt)
    for fmt in ("torchvision", "detectron2"):
        with pytest.raises(ConfigError, match="--format timm"):
            export_checkpoint(ckpt, fmt, tmp_path / "x")
    r = export_checkpoint(ckpt, "timm", tmp_path / "m.safetensors")
    assert any("fresh initialisation" in n for n in r.notes)
    m = timm.create_model(BN_ACT, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "m.safetensors")))
    net.fc = nn.Identity()
    with torch.no_grad():
        want = net.eval()(X)
        got = m.eval().forward_head(m.forward_features(X), pre_logits=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
