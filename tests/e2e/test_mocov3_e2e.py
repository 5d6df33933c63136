"""MoCo v3 end to end, for a ResNet-18 and a 2-block ViT-Tiny with 8-px patches, at 32 px:
two epochs of pretraining (LARS / AdamW, warmup-cosine, the cosine momentum), stopped
mid-epoch by a real SIGTERM and resumed bit for bit against an uninterrupted run; then the
run's checkpoint read as the authors' releases are (the base encoder without its projector):
``moco.load_backbone``, the hub's v3 reader, kNN (the same figure as the run's monitor), the
linear protocol for an epoch, every export format that applies, embeddings; and two gloo
processes against one with the global batch, through the whole pretraining run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    _real_step,
    assert_same_final_state,
    final_state,
    make_cfg,
    metrics,
    sigterm_after,
    spawn,
    train,
)

import moco
import moco.core.backbones as backbones
import moco.core.vit as vit
import moco.engine.loop as train_mod
from moco.core.backbones import BackboneOptions, strip_head
from moco.engine.build import build_model
from moco.utils.distributed import DistContext

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

#: A ViT-Tiny of 2 blocks (width 192, 3 heads), registered for these tests only.
VIT2 = "vit_2block"
COMMON = ["--mechanism", "mocov3", "--moco-dim", "16", "--mlp-dim", "32", "--moco-m", "0.99",
          "--moco-m-cos", "--lr-scale", "linear", "--lr-schedule", "warmup-cosine",
          "--warmup-epochs", "1"]
FLAGS = {
    "resnet18": [*COMMON, "-a", "resnet18", "--optimizer", "lars", "--lr", "0.6", "--wd", "1e-6",
                 "--moco-t", "1.0"],
    "vit": [*COMMON, "-a", VIT2, "--patch-size", "8", "--stop-grad-conv1", "--optimizer", "adamw",
            "--lr", "1.5e-4", "--wd", "0.1", "--moco-t", "0.2"],
}
EXPORTS = {"resnet18": ["torchvision", "detectron2", "safetensors", "timm"],
           "vit": ["safetensors", "timm", "deit"]}


def _vit2(options: BackboneOptions) -> torch.nn.Module:
    return vit.vision_transformer(VIT2, options.image_size, options.patch_size)


@pytest.fixture(autouse=True)
def vit_2block(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("timm")
    monkeypatch.setitem(vit.VIT_SIZES, VIT2, vit.ViTSize(192, 2, 3))
    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))
    backbones.register_backbone(VIT2, _vit2, takes_options=True)


def _cfg(data: Path, out: Path, kind: str, *extra: str) -> Any:
    return make_cfg(data, out, *FLAGS[kind], *extra)


@pytest.mark.parametrize("kind", ["resnet18", "vit"])
def test_trains_resumes_bit_exactly_evaluates_and_exports(
        kind: str, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = train(_cfg(tiny_data, ref_dir, kind))
    sigterm_after(monkeypatch, 6)  # mid epoch 2 (4 steps an epoch)
    assert train(_cfg(tiny_data, run_dir, kind)).stopped_early
    monkeypatch.setattr(train_mod, "train_step", _real_step)
    train(_cfg(tiny_data, run_dir, kind, "--resume", "auto"))
    assert_same_final_state(final_state(ref_dir), final_state(run_dir))
    assert metrics(run_dir) == metrics(ref_dir)
    assert [r["epoch"] for r in metrics(run_dir)] == [1, 2]
    _reads_like_a_release(ref.checkpoint, _cfg(tiny_data, ref_dir, kind), kind)
    _evaluates(ref.checkpoint, tiny_data, tmp_path, ref.history[-1]["knn_top1"])
    _exports(ref.checkpoint, tmp_path, kind)


def _reads_like_a_release(ckpt: Path, cfg: Any, kind: str) -> None:
    """load_backbone gives the trained base encoder without its projector ([CLS] for a ViT),
    as the hub's reader of the authors' v3 files does."""
    from moco.hub.v3 import read_v3_backbone
    from moco.utils.checkpoint import load_checkpoint

    model = build_model(cfg, torch.device("cpu"))
    model.load_state_dict(model.state_from_checkpoint(load_checkpoint(ckpt)["state_dict"]))
    want = strip_head(model.base_encoder).eval()
    loaded, info = moco.load_backbone(ckpt)
    assert info.layout == "moco" and info.head == "mlp" and info.head_dim == 16
    assert info.feature_dim == (512 if kind == "resnet18" else 192)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want(x))
    hub = read_v3_backbone(ckpt)
    assert hub.state.keys() == loaded.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in hub.state.items())


def _evaluates(ckpt: Path, data: Path, tmp_path: Path, monitor_top1: float) -> None:
    knn = moco.knn_evaluate(data, ckpt, k=5, workers=0, device="cpu", progress=False)
    assert knn.top1 == pytest.approx(monitor_top1)  # the monitor's features are the [CLS] / pooled
    lin = moco.linear_classification(moco.LinclsConfig(
        data=str(data), pretrained=str(ckpt), output=str(tmp_path / "lincls"), epochs=1,
        batch_size=8, workers=0, device="cpu", image_size=32), log=lambda _m: None, progress=False)
    assert lin.last is not None and 0.0 <= lin.last["acc1"] <= 100.0
    emb = moco.embed_images(data / "test", ckpt, tmp_path / "emb.npy", workers=0, device="cpu",
                            progress=False)
    assert np.load(emb.path).shape[0] == 32


def _exports(ckpt: Path, tmp_path: Path, kind: str) -> None:
    for fmt in EXPORTS[kind]:
        suffix = ".pkl" if fmt == "detectron2" else ".safetensors" if fmt == "safetensors" else ".pth"
        out = tmp_path / f"export-{fmt}{suffix}"
        result = moco.export_checkpoint(ckpt, fmt, out)
        assert out.is_file() and result.num_tensors > 0, fmt
    # the safetensors export reads back as the same encoder
    a, _ = moco.load_backbone(ckpt)
    b, _ = moco.load_backbone(tmp_path / "export-safetensors.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


# ----- two processes = one process with the global batch, through the whole run ------------------
def _pretrain_worker(ctx: DistContext, data: str, out: str) -> dict[str, torch.Tensor]:
    from moco.engine.loop import Pretrainer

    torch.set_num_threads(1)
    cfg = make_cfg(Path(data), Path(out), *FLAGS["resnet18"], "--epochs", "1", "--knn-every", "0",
                   "--lr", "0.05")
    result = Pretrainer(cfg, log=lambda _m: None, dist=ctx).run()
    from moco.utils.checkpoint import load_checkpoint

    return load_checkpoint(result.checkpoint)["state_dict"] if ctx.is_main else {}


def test_two_processes_train_what_one_trains_with_the_global_batch(tiny_data: Path,
                                                                  tmp_path: Path) -> None:
    """The same global batches (the loader's order and views do not depend on the process
    count), BatchNorm synchronised, keys all-gathered: an epoch on 2 gloo processes x 4 images
    ends where 1 process x 8 ends, within float32 rounding."""
    (tmp_path / "spawn").mkdir()
    two = spawn(_pretrain_worker, tmp_path / "spawn", str(tiny_data), str(tmp_path / "two"),
                wait_s=300)[0]
    cfg = make_cfg(tiny_data, tmp_path / "one", *FLAGS["resnet18"], "--epochs", "1",
                   "--knn-every", "0", "--lr", "0.05")
    one = final_state(train(cfg).checkpoint.parent)["state_dict"]
    assert two.keys() == one.keys()
    for k, v in one.items():
        if v.is_floating_point():
            torch.testing.assert_close(two[k], v, rtol=1e-3, atol=1e-4, msg=k)
        else:
            assert torch.equal(two[k], v), k
