"""load_backbone on every accepted layout, checkpoints of the original code as --resume, and
our checkpoints under the original's key logic (REFERENCE.md §6.2, §7, §8.2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from helpers import (
    TINY_FLAGS,
    demo_state_dict,
    original_encoder,
    original_lincls_load,
    original_state_dict,
    save_original_checkpoint,
)
from torch import nn

from moco.cli import main
from moco.eval.encoders import load_backbone, load_encoder
from moco.eval.features import extract_features
from moco.eval.pretrained import infer_arch
from moco.utils.checkpoint import CheckpointError, load_checkpoint

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _features(enc: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    enc = enc.eval()
    fc = enc.fc
    enc.fc = nn.Identity()
    try:
        with torch.no_grad():
            return enc(x)
    finally:
        enc.fc = fc


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, nn.Module]]:
    d = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, mlp in (("v1", False), ("v2", True)):
        enc = save_original_checkpoint(d / f"{name}.pth.tar", "resnet18", mlp=mlp)
        out[name] = (d / f"{name}.pth.tar", enc)
    return out


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_original_checkpoint_loads(ckpts: dict, name: str) -> None:
    path, enc = ckpts[name]
    model, info = load_backbone(path)
    assert (info.arch, info.layout, info.cifar_stem, info.feature_dim) == ("resnet18", "original", False, 512)
    assert info.head == ("mlp" if name == "v2" else "linear") and info.head_dim == 128
    assert info.epoch == 1 and info.image_size == 224
    assert not model.training and isinstance(model.fc, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(X), _features(enc), rtol=0, atol=0)
    head_model, head_info = load_backbone(path, keep_head=True)
    assert head_info.feature_dim == 128 and head_info.features == "head"
    with torch.no_grad():
        torch.testing.assert_close(head_model(X), enc.eval()(X), rtol=0, atol=0)


def test_demo_layout_loads(tmp_path: Path) -> None:
    enc = original_encoder("resnet18", cifar_stem=True)
    torch.save({"epoch": 200, "state_dict": demo_state_dict(enc)}, tmp_path / "model_last.pth")
    model, info = load_backbone(tmp_path / "model_last.pth")
    assert (info.arch, info.cifar_stem, info.layout, info.head) == ("resnet18", True, "demo", "linear")
    assert info.image_size == 32 and info.mean[0] == pytest.approx(0.4914)
    with torch.no_grad():
        torch.testing.assert_close(model(X), _features(enc), rtol=0, atol=0)


@pytest.mark.parametrize(("arch", "prefix"), [("resnet34", ""), ("resnet18", "module.")])
def test_bare_torchvision_state_dict(tmp_path: Path, arch: str, prefix: str) -> None:
    net = getattr(torchvision.models, arch)()
    torch.save({prefix + k: v for k, v in net.state_dict().items()}, tmp_path / "tv.pth")
    model, info = load_backbone(tmp_path / "tv.pth")
    assert (info.arch, info.layout, info.head) == (arch, "torchvision", None)
    with torch.no_grad():
        torch.testing.assert_close(model(X), _features(net), rtol=0, atol=0)


def test_arch_inferred_from_shapes(tmp_path: Path) -> None:
    save_original_checkpoint(tmp_path / "c.pth.tar", "resnet18", with_arch=False, with_optimizer=False)
    _, info = load_backbone(tmp_path / "c.pth.tar")
    assert info.arch == "resnet18"
    with torch.device("meta"):
        for arch in ("resnet50", "wide_resnet50_2", "resnext50_32x4d"):
            sd = getattr(torchvision.models, arch)().state_dict()
            assert infer_arch(sd) == arch


def test_wrong_arch_names_both(ckpts: dict, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="resnet18 checkpoint but --arch is resnet50"):
        load_backbone(ckpts["v1"][0], arch="resnet50")
    save_original_checkpoint(tmp_path / "c.pth.tar", "resnet18", with_arch=False, with_optimizer=False)
    with pytest.raises(CheckpointError, match="holds resnet18 weights .* --arch is resnet34"):
        load_backbone(tmp_path / "c.pth.tar", arch="resnet34")
    with pytest.raises(ValueError, match="unknown architecture 'vgg16'"):
        load_backbone(tmp_path / "c.pth.tar", arch="vgg16")


def test_bad_files(ckpts: dict, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a checkpoint: it was not written by torch.save"):
        load_backbone(text)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_backbone(tmp_path / "empty.pth")
    data = ckpts["v1"][0].read_bytes()
    cut = tmp_path / "cut.pth.tar"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_backbone(cut)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_backbone(tmp_path / "list.pth")
    torch.save({"state_dict": {"module.encoder_k.conv1.weight": torch.zeros(1)}}, tmp_path / "k.pth")
    with pytest.raises(CheckpointError, match="no encoder_q weights"):
        load_backbone(tmp_path / "k.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(tmp_path / "missing.pth.tar")
    bad_st = tmp_path / "x.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_backbone(bad_st)


def test_bad_file_through_cli(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "x.pth.tar").write_bytes(b"PK\x03\x04garbage")
    assert main(["knn", str(tiny_data), "--pretrained", str(tmp_path / "x.pth.tar")]) == 2
    err = capsys.readouterr().err
    assert "not a readable checkpoint" in err and "Traceback" not in err


def test_extract_features_preallocates_and_matches() -> None:
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    xs = torch.randn(5, 3, 32, 32)
    batches = [(xs[:2], torch.tensor([0, 1])), (xs[2:], torch.tensor([1, 1, 0]))]
    feats, labels = extract_features(net, batches, torch.device("cpu"), n=5)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(net.eval()(xs), dim=1)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)
    assert labels.tolist() == [0, 1, 1, 1, 0]
    with pytest.raises(ValueError, match="expected 6 images"):
        extract_features(net, batches, torch.device("cpu"), n=6)
    raw, _ = extract_features(net, batches, torch.device("cpu"), n=5, normalize=False,
                              dtype=torch.float16)
    assert raw.dtype == torch.float16
    torch.testing.assert_close(raw.float(), net(xs).detach(), rtol=2e-3, atol=2e-3)
    # Without n: the same features, gathered batch by batch.
    grown, same = extract_features(net, batches, torch.device("cpu"))
    assert torch.equal(grown, feats) and torch.equal(same, labels)


# ----- our checkpoints under the original code's logic --------------------------------------
def _tiny_pretrainer(data: Path, out: Path, *extra: str):
    import argparse

    from moco.cli.pretrain import add_parser, config_from_args
    from moco.engine.loop import Pretrainer

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pretrain", str(data), *TINY_FLAGS, "--knn-every", "0",
                              "--output", str(out), *extra])
    return Pretrainer(config_from_args(args), progress=False, log=lambda _m: None)


@pytest.mark.parametrize("mlp", [False, True])
def test_our_checkpoint_loads_with_original_key_logic(tiny_data: Path, tmp_path: Path, mlp: bool) -> None:
    trainer = _tiny_pretrainer(tiny_data, tmp_path / "run", *(["--mlp"] if mlp else []))
    ckpt = trainer.checkpoint_dict()
    assert {"epoch", "arch", "state_dict", "optimizer"} <= set(ckpt)
    # main_lincls.py: keep module.encoder_q but not .fc; exactly fc.weight/fc.bias missing
    model, msg = original_lincls_load(ckpt["state_dict"], "resnet18")
    assert not msg.unexpected_keys
    # main_moco.py --resume: a strict load into the DDP-wrapped original MoCo
    enc = original_encoder("resnet18", 128, mlp)
    ref = original_state_dict(enc, k=32)
    assert list(ckpt["state_dict"])[:2] == ["module.queue", "module.queue_ptr"]
    assert {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()} == \
        {k: tuple(v.shape) for k, v in ref.items()}
    # and our loader reads it back, with the run's preprocessing
    path = tmp_path / "ours.pth.tar"
    torch.save(ckpt, path)
    _, info = load_backbone(path)
    assert (info.layout, info.arch, info.image_size) == ("moco", "resnet18", 32)
    assert info.head == ("mlp" if mlp else "linear")
    _, info = load_encoder(path)  # default output: the run's kNN features (backbone)
    assert info.features == "backbone"


def test_original_checkpoint_as_pretrain_resume(tiny_data: Path, tmp_path: Path) -> None:
    ckpt_path = tmp_path / "checkpoint_0000.pth.tar"
    enc = save_original_checkpoint(ckpt_path, "resnet18", k=32, epoch=1)
    trainer = _tiny_pretrainer(tiny_data, tmp_path / "run", "--resume", str(ckpt_path))
    assert trainer.state.epoch == 1
    q_state = trainer.model.encoder_q.state_dict()
    for k, v in enc.state_dict().items():
        assert torch.equal(q_state[k], v), k
    original = load_checkpoint(ckpt_path)
    assert torch.equal(trainer.model.key_queue.queue, original["state_dict"]["module.queue"])
    n_q = len(list(trainer.model.encoder_q.parameters()))
    assert len(trainer.optimizer.state) == n_q  # f_q's momentum buffers, f_k's dropped
    trainer.runlog.close()
    # wrong architecture: a clear error, through the command
    other = tmp_path / "r34.pth.tar"
    save_original_checkpoint(other, "resnet34", with_optimizer=False)
    rc = main(["pretrain", str(tiny_data), *TINY_FLAGS, "--knn-every", "0", "--output",
               str(tmp_path / "run2"), "--resume", str(other)])
    assert rc == 2


@pytest.mark.slow
def test_original_checkpoint_resumes_training(tiny_data: Path, tmp_path: Path) -> None:
    ckpt_path = tmp_path / "checkpoint_0000.pth.tar"
    save_original_checkpoint(ckpt_path, "resnet18", k=32, epoch=1)
    out = tmp_path / "run"
    rc = main(["pretrain", str(tiny_data), *TINY_FLAGS, "--knn-every", "0", "--output", str(out),
               "--resume", str(ckpt_path)])
    assert rc == 0
    last = load_checkpoint(sorted(out.glob("checkpoint_*.pth.tar"))[-1])
    assert last["epoch"] == 2


# ----- projection heads rebuilt from their tensors -------------------------------------------
def _v3_projector(d: int, hidden: int, dim: int) -> nn.Sequential:
    """MoCo v3 §4's projector: Linear (no bias), BN, ReLU, Linear (no bias), BN without affine."""
    return nn.Sequential(nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, dim, bias=False), nn.BatchNorm1d(dim, affine=False))


@pytest.mark.parametrize("kind", ["v1", "v2", "v3"])
def test_head_rebuilt_from_its_tensors(kind: str) -> None:
    from moco.core.heads import linear_head, mlp_head
    from moco.eval.encoders import head_from_state

    torch.manual_seed(0)
    head = {"v1": lambda: linear_head(16, 8), "v2": lambda: mlp_head(16, 8),
            "v3": lambda: _v3_projector(16, 32, 8)}[kind]()
    for m in head.modules():
        if isinstance(m, nn.BatchNorm1d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    state = {f"head.{k}": v for k, v in head.state_dict().items()}
    state["blocks.0.w"] = torch.zeros(1)  # not the head's
    rebuilt = head_from_state(state, "head")
    rebuilt.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")},
                            strict=True)
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in head.modules()]
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), head.eval()(x), rtol=0, atol=0)


# ----- MoCo v3 checkpoints (main_moco.py of v3: base encoder, momentum encoder, predictor) ------
def _v3_lincls_load(state_dict: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    """``main_lincls.py`` of MoCo v3 (§4): keep ``module.base_encoder.*`` up to before the
    head (``fc`` for ResNets, ``head`` for ViTs), prefix removed."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("module.base_encoder") and not k.startswith(f"module.base_encoder.{head}"):
            out[k[len("module.base_encoder."):]] = v
    return out


def _vit_features(enc: nn.Module, x: torch.Tensor, heads: int | None = None) -> torch.Tensor:
    """The [CLS] features of a copy of the ViT ``enc`` (optionally with another head count)."""
    from timm.models.vision_transformer import VisionTransformer

    ref = VisionTransformer(img_size=enc.patch_embed.img_size, patch_size=enc.patch_embed.patch_size,
                            embed_dim=enc.embed_dim, depth=len(enc.blocks),
                            num_heads=heads or enc.blocks[0].attn.num_heads, num_classes=0)
    ref.load_state_dict({k: v for k, v in enc.state_dict().items() if not k.startswith("head.")})
    with torch.no_grad():
        return ref.eval()(x)


@pytest.fixture(scope="module")
def v3_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, nn.Module]]:
    """Small files in the v3 layouts: a ResNet-18 and a 384-d (ViT-S width) 2-block ViT on 32 px
    with 12 heads, their projectors 64 wide."""
    pytest.importorskip("timm")
    from helpers import mocov3_resnet, mocov3_vit, save_mocov3_checkpoint

    d = tmp_path_factory.mktemp("v3")
    r18 = mocov3_resnet("resnet18", hidden=64, dim=16)
    save_mocov3_checkpoint(d / "r18.pth.tar", r18, "resnet18", hidden=64, dim=16)
    vit = mocov3_vit(depth=2, patch=8, img=32, hidden=64, dim=16)
    save_mocov3_checkpoint(d / "vit.pth.tar", vit, "vit_small", vit=True, hidden=64, dim=16)
    return {"resnet": (d / "r18.pth.tar", r18), "vit": (d / "vit.pth.tar", vit)}


def test_mocov3_resnet_checkpoint_loads(v3_files: dict) -> None:
    path, enc = v3_files["resnet"]
    model, info = load_backbone(path)
    assert (info.arch, info.layout, info.feature_dim, info.cifar_stem) == ("resnet18", "mocov3", 512, False)
    assert (info.head, info.head_dim, info.epoch) == ("mlp", 16, 100)
    with torch.no_grad():
        torch.testing.assert_close(model(X), _features(enc), rtol=0, atol=0)
    head_model, head_info = load_backbone(path, keep_head=True)
    assert head_info.feature_dim == 16
    with torch.no_grad():  # the projector's output (fc.4: BN without affine)
        torch.testing.assert_close(head_model(X), enc.eval()(X), rtol=0, atol=0)


def test_mocov3_vit_checkpoint_loads_with_its_12_heads(v3_files: dict) -> None:
    path, enc = v3_files["vit"]
    model, info = load_backbone(path)
    assert (info.arch, info.layout, info.feature_dim, info.image_size) == ("vit_small", "mocov3", 384, 32)
    assert info.head == "mlp" and info.head_dim == 16
    assert "12 heads" in info.describe() and "patch 8" in info.describe()
    with torch.no_grad():
        got = model(X)
    torch.testing.assert_close(got, _vit_features(enc, X), rtol=0, atol=0)
    assert not torch.allclose(got, _vit_features(enc, X, heads=6))  # the heads matter
    head_model, _ = load_backbone(path, keep_head=True)
    with torch.no_grad():
        torch.testing.assert_close(head_model(X), enc.eval()(X), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_mocov3_linear_model_keeps_the_base_encoder_minus_head(v3_files: dict, kind: str) -> None:
    from moco.eval.lincls_protocol import build_linear_model, sanity_check
    from moco.eval.pretrained import describe_encoder, read_encoder

    path, _ = v3_files[kind]
    w = read_encoder(path)
    info = describe_encoder(w, None, path)
    model = build_linear_model(info, w.backbone, num_classes=10)
    head = "fc" if kind == "resnet" else "head"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{head}.weight", f"{head}.bias"}
    assert model.get_submodule(head).weight.shape == (10, info.backbone_dim)
    ref = _v3_lincls_load(load_checkpoint(path)["state_dict"], head)
    state = model.state_dict()
    assert set(state) - set(ref) == {f"{head}.weight", f"{head}.bias"} and set(ref) <= set(state)
    assert all(torch.equal(state[k], v) for k, v in ref.items())
    sanity_check(state, path)  # the classifier slot is skipped, the rest is the checkpoint's
    state[next(iter(ref))] = state[next(iter(ref))] + 1
    with pytest.raises(RuntimeError, match="differ from the pretrained checkpoint"):
        sanity_check(state, path)


@pytest.mark.parametrize("kind", ["r-50-100ep", "vit-s-300ep"])
def test_mocov3_released_layouts_at_full_size(kind: str, tmp_path: Path) -> None:
    """The authors' releases' keys and shapes (ResNet-50: fc.0 [4096, 2048], fc.4 BN without
    affine; ViT-S/16: 384-d, 12 blocks, head the 3-layer projector), every tensor stride-0."""
    pytest.importorskip("timm")
    from helpers import mocov3_resnet, mocov3_vit, save_mocov3_checkpoint

    path = tmp_path / f"{kind}.pth.tar"
    if kind == "r-50-100ep":
        with torch.device("meta"):
            enc = mocov3_resnet("resnet50")
        sd = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in enc.state_dict().items()}
        assert sd["fc.0.weight"].shape == (4096, 2048) and "fc.0.bias" not in sd
        assert sd["fc.3.weight"].shape == (256, 4096) and "fc.4.weight" not in sd
    else:
        with torch.device("meta"):
            enc = mocov3_vit()
        sd = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in enc.state_dict().items()}
        assert sd["head.0.weight"].shape == (4096, 384) and sd["head.6.weight"].shape == (256, 4096)
    holder = nn.Module()
    holder.state_dict = lambda: sd  # type: ignore[method-assign]
    save_mocov3_checkpoint(path, holder, "resnet50" if kind == "r-50-100ep" else "vit_small",
                           vit=kind != "r-50-100ep", shapes_only=True)
    model, info = load_backbone(path)
    want = ("resnet50", 2048, 224) if kind == "r-50-100ep" else ("vit_small", 384, 224)
    assert (info.arch, info.feature_dim, info.image_size, info.layout) == (*want, "mocov3")
    assert info.head == "mlp" and info.head_dim == 256
    if kind == "vit-s-300ep":  # MoCo v3's ViT-S (registered, or rebuilt from the tensors)
        assert model.blocks[0].attn.num_heads == 12 and model.patch_embed.patch_size == (16, 16)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 224 if kind != "r-50-100ep" else 64, 224 if kind != "r-50-100ep" else 64))
    assert out.shape == (1, info.feature_dim)


def test_bare_timm_vit_state_dicts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A timm ViT's own state dict: the heads from -a timm:NAME, else assumed (D / 64) with a
    warning; -a naming a ResNet is refused."""
    timm = pytest.importorskip("timm")
    net = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, tmp_path / "vit.pth")
    model, info = load_backbone(tmp_path / "vit.pth", arch="timm:vit_tiny_patch16_224")
    assert (info.arch, info.layout, info.feature_dim, info.head) == ("timm:vit_tiny_patch16_224", "vit", 192, None)
    net.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(model(X), net.eval()(X), rtol=0, atol=0)
    with caplog.at_level("WARNING"):
        _, info = load_backbone(tmp_path / "vit.pth")
    assert info.arch == "vit" and '"num_heads": 3' in (info.vit or "")
    assert "does not record the number of attention heads" in caplog.text
    with pytest.raises(CheckpointError, match="holds a Vision Transformer, not a resnet50"):
        load_backbone(tmp_path / "vit.pth", arch="resnet50")
    with pytest.raises(CheckpointError, match="width 192 .*not a vit_small"):
        load_backbone(tmp_path / "vit.pth", arch="vit_small")


def test_mocov3_vit_through_knn_and_embed(v3_files: dict, tiny_data: Path, tmp_path: Path) -> None:
    import json

    import numpy as np

    path, enc = v3_files["vit"]
    out = tmp_path / "knn.json"
    assert main(["knn", str(tiny_data), "--pretrained", str(path), "--k", "5", "-j", "0",
                 "--device", "cpu", "--json", str(out)]) == 0
    assert 0 <= json.loads(out.read_text())["top1"] <= 100
    emb = tmp_path / "emb.npy"
    assert main(["embed", str(tiny_data / "test"), "--pretrained", str(path), "--out", str(emb),
                 "-j", "0", "--device", "cpu", "--no-progress"]) == 0
    assert np.load(emb).shape == (32, 384)


# ----- a backbone of your own, and the preprocessing a loaded model expects ----------------
class _TinyNet(nn.Module):
    """A registered backbone that is not a ResNet: no conv1/layer1, a 3x3 stem, head ``fc``."""

    def __init__(self, norm_layer: type[nn.Module] | None = None) -> None:
        super().__init__()
        norm = norm_layer or nn.BatchNorm2d
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), norm(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def test_registered_backbone_through_knn_embed_and_export(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretrained through the library, then loaded by the name the checkpoint records."""
    import numpy as np

    import moco.core.backbones as backbones
    from moco import MocoConfig, embed_images, export_checkpoint, knn_evaluate, pretrain

    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))  # undone after
    backbones.register_backbone("tinynet", lambda norm: _TinyNet(norm))
    run = tmp_path / "run"
    cfg = MocoConfig(data=str(tiny_data), arch="tinynet", image_size=32, batch_size=8, moco_k=32,
                     bn_splits=2, epochs=1, workers=0, knn_every=0, channels_last=False,
                     output=str(run))
    pretrain(cfg, progress=False, log=lambda _m: None)
    (ckpt,) = sorted(run.glob("checkpoint_*.pth.tar"))
    model, info = load_backbone(ckpt, arch="tinynet", device="cpu")
    assert (info.arch, info.feature_dim, info.cifar_stem, info.image_size) == ("tinynet", 8, False, 32)
    with torch.no_grad():
        ref = model(X)
    r = knn_evaluate(tiny_data, ckpt, k=5, workers=0, device="cpu", progress=False)
    assert 0 <= r.top1 <= 100 and r.feature_dim == 8
    emb = embed_images(tiny_data / "test", ckpt, tmp_path / "e.npy", workers=0, device="cpu",
                       progress=False)
    assert np.load(emb.path).shape == (32, 8)
    st = export_checkpoint(ckpt, "safetensors", tmp_path / "t.safetensors")
    st_model, st_info = load_backbone(st.path, device=torch.device("cpu"))
    assert st_info.arch == "tinynet"
    with torch.no_grad():
        torch.testing.assert_close(st_model(X), ref, rtol=0, atol=0)
    tv = export_checkpoint(ckpt, "torchvision", tmp_path / "t.pth")
    net = _TinyNet()
    msg = net.load_state_dict(torch.load(tv.path, weights_only=True), strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"} and not msg.unexpected_keys


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "P+transparency", "I;16"])
def test_transforms_take_any_image_mode(ckpts: dict, tmp_path: Path, mode: str) -> None:
    import numpy as np
    from PIL import Image

    from moco.data.source import to_rgb

    _, info = load_backbone(ckpts["v1"][0])
    info.image_size = 40
    preprocess = info.transforms()
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8))
    if mode == "P+transparency":
        img = rgb.convert("P")
        img.info["transparency"] = 0
    elif mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (50, 60), dtype=np.uint16))
    else:
        img = rgb.convert(mode)
    x = preprocess(img)
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32
    # the reference: RGB by PIL, resize 40 (short side), center crop 40, normalise
    ref_img = to_rgb(img).resize((48, 40), Image.Resampling.BILINEAR).crop((4, 0, 44, 40))
    arr = torch.from_numpy(np.asarray(ref_img, dtype=np.float32) / 255).permute(2, 0, 1)
    ref = (arr - torch.tensor(info.mean)[:, None, None]) / torch.tensor(info.std)[:, None, None]
    torch.testing.assert_close(x, ref, rtol=0, atol=0.02)
    path = tmp_path / "img.png" if mode != "CMYK" else tmp_path / "img.jpg"
    if mode != "P+transparency":
        img.save(path)
        assert preprocess(path).shape == (3, 40, 40)
    model, _ = load_backbone(ckpts["v1"][0])
    with torch.no_grad():
        assert model(x[None]).shape == (1, 512)
    assert "Normalize" in repr(preprocess) and "RGB" in repr(preprocess)
