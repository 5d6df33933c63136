"""MoCo v3's ViTs (moco.core.vit): sizes and parameter counts against timm's own models, the
fixed 2-D sin-cos position embedding against its formula, the initialisation's statistics,
the random patch projection, the [CLS] features and the authors' checkpoint key names."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from moco.core.backbones import (  # noqa: E402
    BackboneOptions,
    available_backbones,
    build_backbone,
    count_parameters,
    head_name,
    strip_head,
)
from moco.core.errors import ConfigError  # noqa: E402
from moco.core.mocov3 import MoCoV3Config, build_mocov3  # noqa: E402
from moco.core.vit import (  # noqa: E402
    freeze_patch_projection,
    is_vision_transformer,
    sincos_position_embedding,
    vision_transformer,
)


def _vit(name: str, **kw: object) -> nn.Module:
    torch.manual_seed(0)
    return build_backbone(name, options=BackboneOptions(**kw)).model  # type: ignore[arg-type]


# ----- sizes -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("ours", "timms", "dim", "heads"), [
    ("vit_tiny", "vit_tiny_patch16_224", 192, 3),
    ("vit_small", "vit_small_patch16_224", 384, 12),
    ("vit_base", "vit_base_patch16_224", 768, 12)])
def test_sizes_and_parameter_counts_match_timm(ours: str, timms: str, dim: int, heads: int) -> None:
    """Without head: ViT-S/16 21.67M (timm's count; DeiT-S's 6 heads have the same tensors)."""
    with torch.device("meta"):
        net = build_backbone(ours).model
        ref = timm.create_model(timms, num_classes=0)
    assert len(net.blocks) == 12 and net.embed_dim == dim
    assert all(b.attn.num_heads == heads for b in net.blocks)
    assert net.blocks[0].mlp.fc1.out_features == 4 * dim and net.blocks[0].attn.qkv.bias is not None
    assert all(m.eps == 1e-6 for m in net.modules() if isinstance(m, nn.LayerNorm))
    assert count_parameters(strip_head(net)) == count_parameters(ref)
    if ours == "vit_small":
        assert count_parameters(ref) == 21_665_664


def test_registered_as_backbones() -> None:
    assert {"vit_tiny", "vit_small", "vit_base"} <= set(available_backbones())
    net = _vit("vit_tiny", image_size=32, patch_size=4)
    assert tuple(net.patch_embed.grid_size) == (8, 8) and net.pos_embed.shape == (1, 65, 192)
    assert head_name(net) == "head" and is_vision_transformer(net)
    with pytest.raises(ConfigError, match="must divide the image size 32"):
        _vit("vit_tiny", image_size=32, patch_size=5)
    with pytest.raises(ConfigError, match="conv1 of ResNets"):
        build_backbone("vit_tiny", cifar_stem=True)
    with pytest.raises(ConfigError, match="unknown ViT"):
        vision_transformer("vit_huge")


def test_missing_timm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in ("timm", "timm.models", "timm.models.vision_transformer"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ConfigError, match=r"pip install 'momentum-contrast\[timm\]'"):
        build_backbone("vit_small")


# ----- position embedding --------------------------------------------------------------------------
def naive_sincos(h: int, w: int, dim: int) -> torch.Tensor:
    """[1 + h·w, dim]: zeros for [CLS]; patch (r, c), row by row, gets sin(r·ω_i), cos(r·ω_i),
    sin(c·ω_i), cos(c·ω_i) in four blocks of dim/4, ω_i = 10000^(-i/(dim/4))."""
    q = dim // 4
    out = [[0.0] * dim]
    for r in range(h):
        for c in range(w):
            omega = [10000 ** (-i / q) for i in range(q)]
            out.append([math.sin(r * o) for o in omega] + [math.cos(r * o) for o in omega]
                       + [math.sin(c * o) for o in omega] + [math.cos(c * o) for o in omega])
    return torch.tensor(out, dtype=torch.float64)


def test_position_embedding_is_the_fixed_sincos() -> None:
    net = _vit("vit_tiny", image_size=48, patch_size=8)  # 6 x 6 patches
    pos = net.pos_embed
    assert isinstance(pos, nn.Parameter) and not pos.requires_grad
    torch.testing.assert_close(pos[0].double(), naive_sincos(6, 6, 192), rtol=0, atol=1e-6)
    torch.testing.assert_close(sincos_position_embedding((2, 3), 8)[0].double(),
                               naive_sincos(2, 3, 8), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="divisible by 4"):
        sincos_position_embedding((2, 2), 6)


# ----- initialisation ------------------------------------------------------------------------------
def _uniform_std(bound: float) -> float:
    return bound / math.sqrt(3)


def test_initialisation_statistics() -> None:
    net = _vit("vit_small")
    d = 384
    for blk in net.blocks[:3]:
        qkv = blk.attn.qkv.weight.detach()
        bound = math.sqrt(6 / (d + d))  # each of q, k, v is a [d, d] matrix
        assert qkv.abs().max() <= bound and qkv.abs().max() > math.sqrt(6 / (3 * d + d))
        for part in qkv.split(d):
            assert float(part.std()) == pytest.approx(_uniform_std(bound), rel=0.02)
        for lin in (blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
            fan_out, fan_in = lin.weight.shape
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert lin.weight.abs().max() <= bound
            assert float(lin.weight.detach().std()) == pytest.approx(_uniform_std(bound), rel=0.02)
        for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
            assert not lin.bias.any()
        assert bool((blk.norm1.weight == 1).all()) and not blk.norm1.bias.any()
    proj = net.patch_embed.proj.weight.detach()
    bound = math.sqrt(6 / (3 * 16 * 16 + d))
    assert proj.abs().max() <= bound
    assert float(proj.std()) == pytest.approx(_uniform_std(bound), rel=0.02)
    assert not net.patch_embed.proj.bias.any()
    cls = net.cls_token.detach()
    assert 0 < float(cls.abs().max()) < 1e-5 and float(cls.std()) == pytest.approx(1e-6, rel=0.3)


# ----- random patch projection, features -----------------------------------------------------------
def test_stop_grad_conv1_freezes_the_patch_projection_only() -> None:
    net = _vit("vit_tiny", image_size=32, patch_size=8, stop_grad_conv1=True)
    before = net.patch_embed.proj.weight.detach().clone()
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    proj = net.patch_embed.proj
    assert proj.weight.grad is None and proj.bias.grad is None and not proj.weight.requires_grad
    assert net.pos_embed.grad is None
    trained = [(n, p) for n, p in net.named_parameters()
               if not n.startswith("patch_embed.") and n != "pos_embed"]
    assert all(p.grad is not None for _, p in trained), [n for n, p in trained if p.grad is None]
    assert torch.equal(proj.weight, before)
    plain = _vit("vit_tiny", image_size=32, patch_size=8)
    assert plain.patch_embed.proj.weight.requires_grad
    with pytest.raises(ConfigError, match="for Vision Transformers"):
        freeze_patch_projection(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="for Vision Transformers"):
        build_backbone("resnet18", options=BackboneOptions(stop_grad_conv1=True))


def test_features_are_the_cls_token_after_the_final_norm() -> None:
    net = _vit("vit_tiny", image_size=32, patch_size=4).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = strip_head(net)(x)
        tokens = net.norm(net.blocks(net._pos_embed(net.patch_embed(x))))
    assert feats.shape == (3, 192)
    torch.testing.assert_close(feats, tokens[:, 0])


# ----- checkpoint keys ---------------------------------------------------------------------------
def authors_vit_keys(depth: int) -> list[str]:
    """A ViT base encoder's keys in the authors' checkpoints, after ``module.base_encoder.``
    (timm's VisionTransformer names), without the head."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        keys += [f"blocks.{i}.{k}" for k in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
            "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
            "mlp.fc2.weight", "mlp.fc2.bias")]
    return keys + ["norm.weight", "norm.bias"]


def _bn_keys(prefix: str, affine: bool) -> list[str]:
    stats = [f"{prefix}.running_mean", f"{prefix}.running_var", f"{prefix}.num_batches_tracked"]
    return ([f"{prefix}.weight", f"{prefix}.bias"] if affine else []) + stats


def test_keys_map_one_to_one_onto_the_authors_vit_checkpoints() -> None:
    with torch.device("meta"):
        model = build_mocov3("vit_small", MoCoV3Config(t=0.2),
                             BackboneOptions(stop_grad_conv1=True, require_batchnorm=False))
    projector = (["head.0.weight", *_bn_keys("head.1", True), "head.3.weight",
                  *_bn_keys("head.4", True), "head.6.weight", *_bn_keys("head.7", False)])
    predictor = ["0.weight", *_bn_keys("1", True), "3.weight", *_bn_keys("4", False)]
    encoder = authors_vit_keys(12) + projector
    want = ([f"base_encoder.{k}" for k in encoder] + [f"momentum_encoder.{k}" for k in encoder]
            + [f"predictor.{k}" for k in predictor])
    assert sorted(model.state_dict()) == sorted(want)
    sd = model.state_dict()
    assert sd["base_encoder.head.0.weight"].shape == (4096, 384)
    assert sd["base_encoder.head.6.weight"].shape == (256, 4096)
    assert sd["predictor.0.weight"].shape == (4096, 256)
