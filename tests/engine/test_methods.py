"""Pretraining methods, optimizers and lr schedules registered by name: a method written in a
file outside the package trains through the public API, the command line lists it, and the
engine holds no list of the methods' names."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import moco
import moco.core.methods as methods
import moco.engine.optimizers as optimizers
from moco.core.method_base import StepOutput
from moco.engine.build import build_optimizer, step_lr
from moco.engine.config import MocoConfig
from moco.utils.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]

TOY = '''
"""A method outside the package: an online encoder pulled towards an EMA target (no negatives,
no logits), with its own momentum schedule and a metric of its own."""
import copy

import torch
import torch.nn.functional as F

import moco

SEEN = []  # (progress in epochs, total epochs) of every momentum the loop asked for


class Schedule:
    def __call__(self, epochs, total_epochs):
        SEEN.append((epochs, total_epochs))
        return 0.5


class Toy(moco.PretrainingMethod):
    encoder_attr = "online"
    momentum_schedule = Schedule()

    def __init__(self, encoder):
        super().__init__()
        self.online = encoder
        self.target = copy.deepcopy(encoder).requires_grad_(False)

    def forward(self, im_q, im_k, shuffle=None, index=None):
        with torch.no_grad():
            for p_t, p_o in zip(self.target.parameters(), self.online.parameters()):
                p_t.mul_(self.m).add_(p_o.detach(), alpha=1 - self.m)
        z = F.normalize(self.online(im_q).float(), dim=1)
        with torch.no_grad():
            t = F.normalize(self.target(im_k).float(), dim=1)
        cos = (z * t).sum(dim=1).mean()
        return moco.StepOutput(loss=2 - 2 * cos, metrics={"cos": cos.detach()})


@moco.register_method("toy", title="toy", help="online/target cosine, no negatives",
                      dictionary=lambda s, images: f"target momentum by schedule")
def build_toy(settings, encoder, num_samples):
    return Toy(encoder)
'''


@pytest.fixture
def scratch_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test land in copies of the registries, dropped after it."""
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    monkeypatch.setattr(optimizers, "_OPTIMIZERS", dict(optimizers._OPTIMIZERS))
    monkeypatch.setattr(optimizers, "_LR_SCHEDULES", dict(optimizers._LR_SCHEDULES))


def import_file(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----- a method from a file outside the package ------------------------------------------------

@pytest.mark.usefixtures("one_thread", "scratch_registries")
def test_a_method_from_outside_the_package_trains_through_the_public_api(
        tiny_data: Path, tmp_path: Path) -> None:
    assert "toy" not in moco.available_methods()
    (tmp_path / "plugin").mkdir()
    path = tmp_path / "plugin" / "toy_method.py"
    path.write_text(TOY)
    toy = import_file(path)
    assert moco.available_methods()[-1] == "toy"
    cfg = moco.build_config(overrides={
        "data": str(tiny_data), "output": str(tmp_path / "run"), "method": "toy",
        "arch": "resnet18", "image_size": 32, "batch_size": 16, "epochs": 1, "bn_splits": 2,
        "moco_k": 32, "workers": 0, "knn_k": 5, "channels_last": False})
    logs: list[str] = []
    result = moco.pretrain(cfg, log=logs.append)
    # 32 images, batch 16: two steps, each after the loop set the momentum for its progress.
    assert result.history[-1]["step"] == 2
    assert toy.SEEN[-2:] == [(0.0, 1), (0.5, 1)]
    assert next(m for m in logs if "pretraining:" in m).startswith("toy pretraining: resnet18")
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["acc1"] is None and -1.0 <= line["cos"] <= 1.0 and line["knn_top1"] is not None
    assert list(line)[-1] == "cos"  # the method's metrics after the standard keys
    assert not any("pretext acc@1" in m for m in logs if m.startswith("epoch 1/1"))
    state = load_checkpoint(result.checkpoint)["state_dict"]
    assert any(k.startswith("module.online.") for k in state)
    assert any(k.startswith("module.target.") for k in state)


def toy_cfg(data: Path, out: Path, **more: Any) -> Any:
    return moco.build_config(overrides={
        "data": str(data), "output": str(out), "method": "toy", "arch": "resnet18",
        "image_size": 32, "batch_size": 16, "epochs": 2, "bn_splits": 2, "moco_k": 32,
        "workers": 0, "knn_every": 0, "channels_last": False, **more})


@pytest.mark.usefixtures("one_thread", "scratch_registries")
def test_a_registered_method_resumes_bit_exactly_and_only_as_itself(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped mid-epoch 2 and resumed: the same weights (its own checkpoint layout) and the
    same metrics.jsonl, its own metric included (its partial sums are in the checkpoint)."""
    from helpers import _real_step, final_state, metrics, sigterm_after

    import moco.engine.loop as train_mod

    path = tmp_path / "toy_method.py"
    path.write_text(TOY)
    import_file(path)
    moco.pretrain(toy_cfg(tiny_data, tmp_path / "ref"), log=lambda _m: None)
    sigterm_after(monkeypatch, 3)
    assert moco.pretrain(toy_cfg(tiny_data, tmp_path / "run"), log=lambda _m: None).stopped_early
    mid = load_checkpoint(next((tmp_path / "run").glob("checkpoint_*step*.pth.tar")))
    assert set(mid["moco"]["partial"]["metric_sums"]) == {"cos"}
    monkeypatch.setattr(train_mod, "train_step", _real_step)
    with pytest.raises(moco.CheckpointError, match="trained with --mechanism toy, not moco"):
        moco.pretrain(toy_cfg(tiny_data, tmp_path / "run", method="moco", resume="auto"))
    moco.pretrain(toy_cfg(tiny_data, tmp_path / "run", resume="auto"), log=lambda _m: None)
    ref, got = final_state(tmp_path / "ref"), final_state(tmp_path / "run")
    assert ref["state_dict"].keys() == got["state_dict"].keys()
    assert all(torch.equal(v, got["state_dict"][k]) for k, v in ref["state_dict"].items())
    assert metrics(tmp_path / "run") == metrics(tmp_path / "ref")
    assert [m["epoch"] for m in metrics(tmp_path / "run")] == [1, 2]


@pytest.mark.usefixtures("scratch_registries")
def test_the_command_line_lists_and_accepts_a_registered_method(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moco.cli import build_parser
    from moco.cli.pretrain import config_from_args

    @moco.register_method("toy-cli", title="toy")
    def build(settings: Any, encoder: nn.Module, num_samples: int | None) -> Any:
        raise AssertionError("not built here")

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "--help"])
    help_text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "{moco,end-to-end,memory-bank,mocov3,toy-cli}" in help_text and "--method" in help_text
    for flag in ("--mechanism", "--method"):
        args = parser.parse_args(["pretrain", str(tmp_path), flag, "toy-cli"])
        assert config_from_args(args).mechanism == "toy-cli"


def test_listing_the_methods_loads_no_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys, moco; print(moco.available_methods()); "
         "from moco.engine.config import MocoConfig; MocoConfig(mechanism='memory-bank'); "
         "print('torch' in sys.modules)"],
        capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split("\n")[:2] == ["('moco', 'end-to-end', 'memory-bank', 'mocov3')",
                                           "False"]


# ----- the registry ----------------------------------------------------------------------------

def test_an_unknown_method_is_refused_naming_the_registered_ones() -> None:
    with pytest.raises(moco.ConfigError,
                       match="one of moco, end-to-end, memory-bank, mocov3, got 'nope'"):
        methods.method_spec("nope")
    with pytest.raises(moco.ConfigError, match="expected --mechanism to be one of moco, end-to-end"):
        MocoConfig(mechanism="nope")
    assert moco.build_config(overrides={"method": "end-to-end"}).mechanism == "end-to-end"


@pytest.mark.usefixtures("scratch_registries")
def test_registration_checks_the_name_and_what_the_builder_returns() -> None:
    with pytest.raises(moco.ConfigError, match="non-empty text"):
        moco.register_method(" toy")
    with pytest.raises(moco.ConfigError, match="must be callable"):
        moco.register_method("toy", 3)  # type: ignore[call-overload]
    moco.register_method("linear", lambda s, enc, n: nn.Linear(2, 2))
    with pytest.raises(moco.ConfigError, match="returned a Linear, not a moco.PretrainingMethod"):
        methods.build_method("linear", MocoConfig(), nn.Linear(2, 2))


def test_the_built_in_methods_declare_what_the_run_asks() -> None:
    cfg = MocoConfig(moco_k=4096, batch_size=256, moco_dim=128)
    spec = methods.method_spec("moco")
    assert spec.title == "MoCo" and spec.has_queue and spec.dictionary(cfg, 10) == "K 4096, m 0.999"
    assert spec.memory(cfg, None) == [("the queue (--moco-k 4096 x --moco-dim 128 float32)",
                                       4096 * 128 * 4, "lower --moco-k or --moco-dim")]
    bank = methods.method_spec("memory-bank")
    assert not bank.has_queue and bank.memory(cfg, None) == []
    assert bank.memory(cfg, 50)[0][1] == 50 * 128 * 4
    assert methods.method_spec("end-to-end").dictionary(cfg, 10) == \
        "dictionary = the batch's other 255 keys"


def test_step_output_needs_only_a_loss() -> None:
    out = StepOutput(torch.tensor(1.0))
    assert out.accuracy() is None and out.metrics == {}
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    assert float(StepOutput(torch.tensor(1.0), logits).accuracy()) == 50.0  # positive in column 0
    labels = torch.tensor([1, 0])
    assert float(StepOutput(torch.tensor(1.0), logits, labels).accuracy()) == 100.0


def test_the_engine_holds_no_list_of_method_names() -> None:
    """Every method-specific choice goes through the registry: no comparison of the method's
    name in the engine or the core."""
    pattern = re.compile(r"mechanism\s*(==|!=|in\b)|isinstance\([^)]*(EndToEnd|MemoryBank)")
    found = [f"{p.relative_to(REPO)}:{i}" for folder in ("moco/engine", "moco/core")
             for p in sorted((REPO / folder).glob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found


# ----- optimizers and lr schedules by name -------------------------------------------------------

@pytest.mark.usefixtures("scratch_registries")
def test_an_optimizer_and_an_lr_schedule_are_picked_by_name() -> None:
    seen: list[list[dict[str, Any]]] = []

    @optimizers.register_optimizer("plain")
    def plain(groups: list[dict[str, Any]], cfg: Any) -> torch.optim.Optimizer:
        seen.append(groups)
        return torch.optim.SGD(groups, lr=cfg.effective_lr)

    @optimizers.register_lr_schedule("per-step")
    def per_step(cfg: Any, epoch: int, step: int, steps: int) -> float:
        return cfg.lr * (epoch * steps + step + 1)

    cfg = MocoConfig(optimizer="plain", lr_schedule="per-step", lr=0.5)
    model = moco.MoCo(nn.Sequential(nn.Flatten(), nn.Linear(12, 8)), dim=8, k=16)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0
    assert [id(p) for p in seen[0][0]["params"]] == [id(p) for p in model.encoder_q.parameters()]
    assert [step_lr(cfg, 1, t, 4) for t in range(2)] == [2.5, 3.0]
    # auto: the original's schedules, by --cos
    assert step_lr(MocoConfig(lr=0.03, epochs=200, cos=True), 100, 0, 4) == pytest.approx(0.015)
    assert step_lr(MocoConfig(lr=0.03, epochs=200), 120, 0, 4) == pytest.approx(0.003)
    with pytest.raises(moco.ConfigError,
                       match="expected --optimizer to be one of sgd, lars, adamw, plain"):
        MocoConfig(optimizer="nope")
