"""The linear protocol of MoCo v3 (MoCo v3 §4; its ``main_lincls.py``): the ``mocov3`` preset,
the base lr of the architecture scaled by the batch, and a ViT's classifier in its ``head``
slot (the frozen [CLS] features), on hand-built checkpoints in the authors' v3 layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_image_folder, mocov3_resnet, mocov3_vit, save_mocov3_checkpoint

from moco.core.errors import ConfigError
from moco.eval.config import LINCLS_PRESETS
from moco.eval.lincls import LinclsConfig, LinearClassification, linear_classification
from moco.utils.checkpoint import load_checkpoint

QUIET = {"log": lambda _m: None, "progress": False}


@pytest.fixture(scope="module")
def v3_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """2 classes x 6 images of 32 px; a v3 ResNet-18 and a 2-block ViT (patch 8, 32 px)."""
    pytest.importorskip("timm")
    d = tmp_path_factory.mktemp("lincls-v3")
    out = {"data": make_image_folder(d / "data", classes=2, per_class=6, splits=("train", "val"))}
    save_mocov3_checkpoint(d / "r18.pth.tar", mocov3_resnet("resnet18", hidden=64, dim=16),
                           "resnet18", hidden=64, dim=16)
    save_mocov3_checkpoint(d / "vit.pth.tar", mocov3_vit(depth=2, patch=8, img=32, hidden=64,
                                                         dim=16),
                           "vit_small", vit=True, hidden=64, dim=16)
    out.update(r18=d / "r18.pth.tar", vit=d / "vit.pth.tar")
    return out


def test_the_mocov3_preset_is_the_papers_protocol() -> None:
    cfg = LinclsConfig(data="d", pretrained="c", preset="mocov3")
    assert (cfg.epochs, cfg.batch_size, cfg.cos, cfg.momentum, cfg.wd) == (90, 1024, True, 0.9, 0.0)
    assert (cfg.lr, cfg.lr_scale) == (None, "linear")
    assert cfg.effective_lr(vit=False) == pytest.approx(0.1 * 1024 / 256)
    assert cfg.effective_lr(vit=True) == pytest.approx(3.0 * 1024 / 256)
    given = LinclsConfig(data="d", pretrained="c", preset="mocov3", epochs=5, lr=0.5)
    assert (given.epochs, given.batch_size, given.effective_lr(vit=True)) == (5, 1024, 2.0)
    plain = LinclsConfig(data="d", pretrained="c")  # main_lincls.py of v1/v2, unchanged
    assert (plain.lr, plain.lr_scale, plain.epochs) == (30.0, "none", 100)
    assert plain.effective_lr(vit=True) == 30.0
    with pytest.raises(ConfigError, match="--preset to be one of mocov3, got 'v9'"):
        LinclsConfig(data="d", pretrained="c", preset="v9")
    assert set(LINCLS_PRESETS) == {"mocov3"}


def test_the_command_line_takes_the_preset(v3_setup: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from moco.cli import main

    out = tmp_path / "r18"
    rc = main(["lincls", str(v3_setup["data"]), "--pretrained", str(v3_setup["r18"]), "--preset",
               "mocov3", "--epochs", "1", "-b", "4", "-j", "0", "--image-size", "32", "--fast",
               "--output", str(out), "--no-progress"])
    assert rc == 0
    said = capsys.readouterr().out
    assert "lr 0.0015625 = base 0.1 x 4 / 256" in said
    ckpt = load_checkpoint(out / "checkpoint.pth.tar")
    assert ckpt["moco"]["config"]["preset"] == "mocov3"
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 * 4 / 256)


def test_a_vit_trains_its_classifier_in_the_head_slot(v3_setup: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """The frozen ViT's [CLS] features into ``head`` (the projector removed), trained by the
    engine (not --fast), base lr 3 x batch / 256; the sanity check passes."""
    cfg = LinclsConfig(data=str(v3_setup["data"]), pretrained=str(v3_setup["vit"]),
                       output=str(tmp_path / "vit"), preset="mocov3", epochs=1, batch_size=4,
                       workers=0, device="cpu", image_size=32)
    run = LinearClassification(cfg, **QUIET)
    assert run.vit and run.lr == pytest.approx(3.0 * 4 / 256)
    head = run.model.head
    assert isinstance(head, torch.nn.Linear) and head.weight.shape == (2, 384)
    trainable = [n for n, p in run.model.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(run.engine.backbone(x), run.model.forward_features(x)[:, 0])
    assert run.model.head is head  # the head slot is restored after the features
    result = run.run()
    assert result.last is not None and result.last["epoch"] == 1
    state = load_checkpoint(tmp_path / "vit" / "checkpoint.pth.tar")["state_dict"]
    assert {"module.head.weight", "module.head.bias"} <= set(state)


def test_a_vit_in_fast_mode(v3_setup: dict[str, Path], tmp_path: Path) -> None:
    cfg = LinclsConfig(data=str(v3_setup["data"]), pretrained=str(v3_setup["vit"]),
                       output=str(tmp_path / "fast"), epochs=1, batch_size=4, workers=0,
                       device="cpu", image_size=32, fast=True, lr=1.0)
    result = linear_classification(cfg, **QUIET)
    assert result.last is not None and 0.0 <= result.last["acc1"] <= 100.0
