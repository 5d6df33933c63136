"""The linear classification protocol (REFERENCE.md §8) on tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import make_image_folder, save_original_checkpoint

import moco.eval.lincls_protocol as lincls_protocol
from moco.cli import main
from moco.core.errors import RunError
from moco.eval.encoders import load_backbone
from moco.eval.lincls import LinclsConfig, linear_classification
from moco.eval.lincls_protocol import (
    SanityCheckError,
    build_linear_model,
    linear_optimizer,
    sanity_check,
)
from moco.eval.pretrained import describe_encoder, read_encoder
from moco.utils.checkpoint import load_checkpoint
from moco.utils.schedule import learning_rate

QUIET = {"log": lambda _m: None, "progress": False}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """2 classes x 6 images of 32 px, and an original-layout MoCo v2 resnet18 checkpoint."""
    d = tmp_path_factory.mktemp("lincls")
    data = make_image_folder(d / "data", classes=2, per_class=6, splits=("train", "val"))
    ckpt = d / "moco_v2.pth.tar"
    save_original_checkpoint(ckpt, "resnet18", mlp=True, with_optimizer=False)
    return data, ckpt


def _cfg(data: Path, ckpt: Path, out: Path, **kw: object) -> LinclsConfig:
    base: dict = {"epochs": 2, "batch_size": 4, "workers": 0, "device": "cpu", "image_size": 32}
    base.update(kw)
    return LinclsConfig(data=str(data), pretrained=str(ckpt), output=str(out), **base)


def test_setup_follows_main_lincls(setup: tuple[Path, Path]) -> None:
    _, ckpt = setup
    w = read_encoder(ckpt)
    info = describe_encoder(w)
    model = build_linear_model(info, w.backbone, num_classes=10, seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    assert model.fc.weight.shape == (10, 512)
    assert abs(float(model.fc.weight.detach().std()) - 0.01) < 0.002 and not model.fc.bias.any()
    opt = linear_optimizer(model, 30.0, 0.9, 0.0)
    g = opt.param_groups[0]
    assert (len(g["params"]), g["lr"], g["momentum"], g["weight_decay"]) == (2, 30.0, 0.9, 0.0)
    lrs = [learning_rate(30.0, e, 100, cos=False, milestones=[60, 80]) for e in (0, 59, 60, 79, 80, 99)]
    assert lrs == pytest.approx([30, 30, 3, 3, 0.3, 0.3])


def test_tiny_run_changes_only_fc(setup: tuple[Path, Path], tmp_path: Path) -> None:
    data, ckpt = setup
    out = tmp_path / "run"
    result = linear_classification(_cfg(data, ckpt, out), **QUIET)
    assert (out / "checkpoint.pth.tar").is_file() and (out / "model_best.pth.tar").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all({"acc1", "acc5", "loss", "lr", "best_acc1"} <= set(r) for r in records)
    assert records[-1]["acc5"] == 100.0  # 2 classes
    assert result.best_acc1 == max(r["acc1"] for r in records)

    last = load_checkpoint(out / "checkpoint.pth.tar")
    assert {"epoch", "arch", "state_dict", "best_acc1", "optimizer"} <= set(last)
    assert last["epoch"] == 2 and last["arch"] == "resnet18"
    assert all(k.startswith("module.") for k in last["state_dict"])
    assert len(last["optimizer"]["param_groups"][0]["params"]) == 2
    # the backbone is bit-identical to the pretrained encoder, BN statistics included
    pre = read_encoder(ckpt).backbone
    state = {k[len("module."):]: v for k, v in last["state_dict"].items()}
    for k, v in pre.items():
        assert torch.equal(state[k], v), k
    # only fc moved away from its initialisation
    init = build_linear_model(describe_encoder(read_encoder(ckpt)), pre, 2, seed=0)
    assert not torch.equal(state["fc.weight"], init.fc.weight)
    # the original main_lincls.py --resume: a DDP-wrapped torchvision model loads it strictly
    net = torchvision.models.resnet18(num_classes=2)
    net.load_state_dict(state)
    # and the linear checkpoint is itself a pretrained backbone for knn / export / embed
    model, info = load_backbone(out / "model_best.pth.tar")
    ref, _ = load_backbone(ckpt)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    assert info.layout == "torchvision" and info.image_size == 32  # the run's preprocessing


def test_sanity_check_catches_changed_backbone(setup: tuple[Path, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data, ckpt = setup
    w = read_encoder(ckpt)
    model = build_linear_model(describe_encoder(w), w.backbone, 2)
    sanity_check(model.state_dict(), ckpt)  # unchanged: passes
    with torch.no_grad():
        model.layer3[1].bn2.running_mean[0] += 1e-6
    with pytest.raises(SanityCheckError, match=r"layer3\.1\.bn2\.running_mean"):
        sanity_check(model.state_dict(), ckpt)
    # A training loop that forgets eval(): BN statistics drift, the check after epoch 1 fails.
    monkeypatch.setattr(lincls_protocol, "set_frozen_mode", lambda m: m.train())
    with pytest.raises(SanityCheckError, match="running_mean|num_batches_tracked"):
        linear_classification(_cfg(data, ckpt, tmp_path / "bad", epochs=1), **QUIET)
    rc = main(["lincls", str(data), "--pretrained", str(ckpt), "--epochs", "1", "-b", "4", "-j",
               "0", "--device", "cpu", "--output", str(tmp_path / "bad2"), "--no-progress",
               "--image-size", "32"])
    assert rc == 1


def test_fast_mode(setup: tuple[Path, Path], tmp_path: Path) -> None:
    data, ckpt = setup
    out = tmp_path / "fast"
    result = linear_classification(_cfg(data, ckpt, out, epochs=3, fast=True), **QUIET)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and all(r["fast"] for r in records)
    last = load_checkpoint(out / "checkpoint.pth.tar")
    pre = read_encoder(ckpt).backbone
    for k, v in pre.items():
        assert torch.equal(last["state_dict"][f"module.{k}"], v), k
    # its accuracy is the full model's on the val images: evaluate the checkpoint the slow way
    ev = linear_classification(LinclsConfig(data=str(data), resume=str(out / "checkpoint.pth.tar"),
                                            evaluate=True, workers=0, device="cpu", image_size=32),
                             **QUIET)
    assert ev.last is not None and ev.last["acc1"] == pytest.approx(records[-1]["acc1"])
    assert result.best_acc1 == max(r["acc1"] for r in records)


def test_resume_evaluate_and_refusals(setup: tuple[Path, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    data, ckpt = setup
    out = tmp_path / "run"
    base = ["lincls", str(data), "--pretrained", str(ckpt), "-b", "4", "-j", "0", "--device",
            "cpu", "--output", str(out), "--no-progress", "--fast", "--image-size", "32"]
    assert main([*base, "--epochs", "1"]) == 0
    assert main([*base, "--epochs", "1"]) == 2  # the folder holds a run
    assert "already holds" in capsys.readouterr().err
    assert main([*base, "--epochs", "2", "--resume", str(out / "checkpoint.pth.tar")]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert load_checkpoint(out / "checkpoint.pth.tar")["epoch"] == 2
    capsys.readouterr()
    assert main(["lincls", str(data), "-e", "--resume", str(out / "checkpoint.pth.tar"), "-j", "0",
                 "--device", "cpu", "--no-progress", "--image-size", "32"]) == 0
    assert f"Acc@1 {records[-1]['acc1']:.3f}" in capsys.readouterr().out
    assert main(["lincls", str(data), "-e", "--pretrained", str(ckpt)]) == 2
    assert "--evaluate needs --resume" in capsys.readouterr().err
    assert main(["lincls", str(data), "--resume", str(ckpt), "--output", str(tmp_path / "x")]) == 2
    assert "not a linear-classification checkpoint" in capsys.readouterr().err


def test_needs_labeled_val(setup: tuple[Path, Path], tmp_path: Path,
                           capsys: pytest.CaptureFixture) -> None:
    _, ckpt = setup
    data = make_image_folder(tmp_path / "d", classes=2, per_class=2, splits=("train",))
    assert main(["lincls", str(data), "--pretrained", str(ckpt), "--output", str(tmp_path / "o")]) == 2
    assert "no labeled val/ or test/" in capsys.readouterr().err


@pytest.mark.slow
def test_full_mode_cifar_stem(tmp_path: Path) -> None:
    """Augmented training at 32 px on a CIFAR-stem (demo-like) encoder, a few epochs."""
    data = make_image_folder(tmp_path / "data", classes=3, per_class=8, splits=("train", "test"))
    ckpt = tmp_path / "c.pth.tar"
    save_original_checkpoint(ckpt, "resnet18", cifar_stem=True, with_optimizer=False)
    out = tmp_path / "run"
    res = linear_classification(_cfg(data, ckpt, out, epochs=3, batch_size=8, cos=True), **QUIET)
    assert len(res.history) == 3 and res.history[-1]["lr"] < res.history[0]["lr"]


# ----- evaluation checks before it writes -------------------------------------------------------

def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_with_another_pretrained_refuses_before_writing(setup: tuple[Path, Path],
                                                                tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    data, ckpt = setup
    out = tmp_path / "run"
    linear_classification(_cfg(data, ckpt, out, epochs=1, fast=True), **QUIET)
    other = tmp_path / "other.pth.tar"
    save_original_checkpoint(other, "resnet18", mlp=True, with_optimizer=False, seed=1)
    before = _files(out)
    base = ["lincls", str(data), "-b", "4", "-j", "0", "--device", "cpu", "--output", str(out),
            "--no-progress", "--fast", "--image-size", "32", "--epochs", "2", "--resume", "auto"]
    assert main([*base, "--pretrained", str(other)]) == 2
    err = capsys.readouterr().err
    assert str(other) in err and str(ckpt.absolute()) in err and err.count("\n") == 1, err
    assert _files(out) == before  # nothing trained, nothing written
    # the same encoder by another path (a link), or none at all: the run continues
    link = tmp_path / "link.pth.tar"
    link.symlink_to(ckpt)
    assert main([*base, "--pretrained", str(link)]) == 0
    assert load_checkpoint(out / "checkpoint.pth.tar")["epoch"] == 2
    assert main([*base[:-4], "--epochs", "3", "--resume", "auto"]) == 0


def test_evaluate_compares_the_checkpoint_classes_with_the_data(setup: tuple[Path, Path],
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture
                                                                 ) -> None:
    data, ckpt = setup
    out = tmp_path / "run"
    linear_classification(_cfg(data, ckpt, out, epochs=1, fast=True), **QUIET)
    other = make_image_folder(tmp_path / "other", classes=2, per_class=2,
                              splits=("train", "val"))
    for split in ("train", "val"):  # the same number of classes, other names
        (other / split / "class_1").rename(other / split / "dogs")
    before = _files(out)
    ev = ["lincls", "-e", "--resume", str(out / "checkpoint.pth.tar"), "-j", "0", "--device",
          "cpu", "--no-progress", "--image-size", "32"]
    assert main([*ev[:1], str(other), *ev[1:]]) == 2
    err = capsys.readouterr().err
    assert "classes are not the ones" in err and "'class_1'" in err and "'dogs'" in err, err
    assert _files(out) == before
    assert main([*ev[:1], str(data), *ev[1:]]) == 0  # its own data: evaluated


def test_a_diverging_classifier_is_named_with_what_to_change(setup: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    """The ImageNet recipe's lr 30 blows the classifier up on small data: the loss climbs far
    above its chance level ln(C); the run says so and what to change (not silently)."""
    from moco.eval.lincls_protocol import divergence_warning

    assert divergence_warning(0.69, 2, 30.0, False) is None  # at chance: learning or not yet
    msg = divergence_warning(2.5e4, 2, 30.0, False)
    assert msg is not None and "\n" not in msg and "diverging at --lr 30 (main_lincls" in msg
    assert "lower --lr (e.g. 1)" in msg and "--fast" in msg
    data, ckpt = setup
    lines: list[str] = []
    try:
        linear_classification(_cfg(data, ckpt, tmp_path / "hot", lr=3e4, fast=True, epochs=2),
                              log=lines.append, progress=False)
    except RunError as e:  # it may go all the way to inf/NaN: that is stopped and named too
        lines.append(str(e))
    assert any(line.startswith("warning: ") and "diverging" in line for line in lines), lines
    calm: list[str] = []
    linear_classification(_cfg(data, ckpt, tmp_path / "calm", lr=1e-3, fast=True),
                          log=calm.append, progress=False)
    assert not any(line.startswith("warning: ") for line in calm), calm
