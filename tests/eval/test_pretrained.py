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
