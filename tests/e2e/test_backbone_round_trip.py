"""Wide ResNets and timm CNNs through the whole tool: a tiny pretrain -> knn -> lincls ->
export (each format the architecture supports, loaded by its consumer) -> embed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from moco.cli import main
from moco.eval.encoders import load_backbone

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
ARCHS = [
    "resnet18w2",
    pytest.param("resnet50w2", marks=pytest.mark.slow),  # 94M parameters: ~1 min on 2 cores
    "timm:resnet26d",  # plain BatchNorm2d
    "timm:mobilenetv3_small_050",  # timm's BatchNormAct2d
]


def _needs_timm(arch: str) -> None:
    if arch.startswith("timm:"):
        pytest.importorskip("timm")


def _features(net: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(X)


@pytest.mark.parametrize("arch", ARCHS)
def test_pretrain_knn_lincls_export_embed(arch: str, tiny_data: Path, tmp_path: Path) -> None:
    _needs_timm(arch)
    run = tmp_path / "run"
    assert main(["pretrain", str(tiny_data), "-a", arch, "--cifar-stem", "false",
                 "--image-size", "32", "-b", "8", "--moco-k", "32", "--bn-splits", "2",
                 "--epochs", "1", "--workers", "0", "--no-progress", "--knn-k", "5",
                 "--knn-every", "0", "--channels-last", "false", "--mlp",
                 "--output", str(run)]) == 0
    (ckpt,) = sorted(run.glob("checkpoint_*.pth.tar"))
    model, info = load_backbone(ckpt)
    assert info.arch == arch and not info.cifar_stem
    dim = info.feature_dim
    ref = _features(model)
    assert ref.shape == (2, dim)

    # kNN over the backbone features
    out = tmp_path / "knn.json"
    assert main(["knn", str(tiny_data), "--pretrained", str(ckpt), "--k", "5", "-j", "0",
                 "--device", "cpu", "--features", "backbone", "--json", str(out)]) == 0
    knn = json.loads(out.read_text())
    assert 0 <= knn["top1"] <= 100

    # linear classification, the full protocol (frozen backbone, sanity check) for one epoch
    lin = tmp_path / "lincls"
    assert main(["lincls", str(tiny_data), "--pretrained", str(ckpt), "--epochs", "1", "-b", "8",
                 "--lr", "0.1", "-j", "0", "--device", "cpu", "--no-progress",
                 "--output", str(lin)]) == 0
    rec = json.loads((lin / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["epoch"] == 1 and 0 <= rec["acc1"] <= 100
    # the lincls checkpoint is itself a backbone file with the same features
    lin_model, lin_info = load_backbone(lin / "checkpoint.pth.tar")
    assert lin_info.arch == arch
    torch.testing.assert_close(_features(lin_model), ref, rtol=0, atol=0)

    # exports, each loaded by its consumer, giving the same features
    st = tmp_path / "b.safetensors"
    assert main(["export", str(ckpt), "-f", "safetensors", "-o", str(st)]) == 0
    torch.testing.assert_close(_features(load_backbone(st)[0]), ref, rtol=0, atol=0)
    if arch.startswith("timm:"):
        import timm

        tf = tmp_path / "timm.pth"
        assert main(["export", str(ckpt), "-f", "timm", "-o", str(tf)]) == 0
        name = arch[len("timm:"):]
        net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tf)))
        with torch.no_grad():
            got = net.eval().forward_head(net.forward_features(X), pre_logits=True)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    else:
        from moco.core import wide_resnet

        tv = tmp_path / "tv.pth"
        assert main(["export", str(ckpt), "-f", "torchvision", "-o", str(tv)]) == 0
        net = getattr(wide_resnet, arch)()
        msg = net.load_state_dict(torch.load(tv, weights_only=True), strict=False)
        assert set(msg.missing_keys) == {"fc.weight", "fc.bias"} and not msg.unexpected_keys
        net.fc = nn.Identity()
        torch.testing.assert_close(_features(net), ref, rtol=0, atol=0)

    # embeddings of every image
    emb = tmp_path / "emb.npy"
    assert main(["embed", str(tiny_data / "test"), "--pretrained", str(ckpt), "--out", str(emb),
                 "-j", "0", "--device", "cpu", "--no-progress", "-b", "8"]) == 0
    assert np.load(emb).shape == (32, dim)
