"""The training monitor in every run (moco.engine.monitoring): the health signals and the
online probe in metrics.jsonl, TensorBoard, the log line and the plot; a collapsed run is
warned about and a healthy one is not; the pretraining is bit-identical with and without the
monitor; a stopped run resumes the probe exactly; each method declares its chance level."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from helpers import (
    _real_step,
    assert_same_final_state,
    assert_same_tensors,
    final_state,
    make_cfg,
    make_image_folder,
    metrics,
    sigterm_after,
    train,
)
from torch import nn

import moco.engine.loop as train_mod
from moco.core import backbones
from moco.core.methods import method_spec
from moco.engine.config import MocoConfig
from moco.engine.loop import Pretrainer
from moco.eval.health import RECORD_KEYS
from moco.eval.monitor import SCALAR_KEYS

pytestmark = pytest.mark.usefixtures("one_thread")

MONITOR_KEYS = ("loss_chance", *RECORD_KEYS, "probe_loss", "probe_train_top1", "probe_top1")
WARNING_KINDS = ("warning: collapsed", "warning: collapsing", "warning: stuck",
                 "warning: too easy")
#: A healthy tiny run: the CIFAR stem at 32 px (the ImageNet stem's 1x1 last feature map,
#: normalised over sub-batches of 4 images, collapses within a few steps at lr 0.03).
HEALTHY = ("--cifar-stem",)


def run_logged(cfg: MocoConfig) -> tuple[Any, list[str]]:
    logs: list[str] = []
    result = Pretrainer(cfg, log=logs.append, progress=False).run()
    return result, logs


def monitor_warnings(logs: list[str]) -> list[str]:
    return [m for m in logs if m.startswith(WARNING_KINDS)]


def _constant_resnet18(norm_layer: Any) -> nn.Module:
    """A ResNet-18 whose output does not depend on its input (the input is zeroed)."""
    net = torchvision.models.resnet18(norm_layer=norm_layer)
    net.register_forward_pre_hook(lambda module, args: (args[0] * 0,))
    return net


# ----- warnings: collapsed or not ----------------------------------------------------------------

def test_a_collapsed_run_is_warned_about_once(tiny_data: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An encoder whose output ignores its input: every image gets the same embedding."""
    monkeypatch.setitem(backbones._REGISTRY, "constant-resnet18", None)
    backbones.register_backbone("constant-resnet18", _constant_resnet18)
    _, logs = run_logged(make_cfg(tiny_data, tmp_path / "run", *HEALTHY, "-a",
                                  "constant-resnet18"))
    said = monitor_warnings(logs)
    assert len(said) == 1, said  # named when it appears, not again at epoch 2
    assert said[0].startswith("warning: collapsed at epoch 1: the embeddings of different "
                              "images are (nearly) the same: std x sqrt(d) 0.000")
    assert "a learning rate too high" in said[0] and "--moco-t" in said[0]
    epoch_1 = next(i for i, m in enumerate(logs) if m.startswith("epoch 1/2"))
    assert logs[epoch_1 + 1] is said[0]  # right after the epoch's line
    rec = metrics(tmp_path / "run")[-1]
    assert rec["health_std_ratio"] == pytest.approx(0, abs=1e-6) and rec["health_rank"] < 1.5


def test_a_healthy_tiny_run_is_not_warned_about(tiny_data: Path, tmp_path: Path) -> None:
    _, logs = run_logged(make_cfg(tiny_data, tmp_path / "run", *HEALTHY))
    assert monitor_warnings(logs) == []
    line = next(m for m in logs if m.startswith("epoch 2/2"))
    rec = metrics(tmp_path / "run")[-1]
    assert f"loss {rec['loss']:.4f} (chance {math.log(33):.3f})" in line
    assert (f"rank {rec['health_rank']:.1f}, std ratio {rec['health_std_ratio']:.2f}, probe "
            f"top-1 {rec['probe_top1']:.2f}%") in line


def test_the_monitor_knows_the_planned_epochs_for_its_patience(tiny_data: Path,
                                                              tmp_path: Path) -> None:
    """The kNN warning's patience is a share of the run's planned epochs (diagnose's
    ``epochs``): the run hands its --epochs to the monitor."""
    trainer = Pretrainer(make_cfg(tiny_data, tmp_path / "run", "--epochs", "40"), log=print)
    try:
        monitor = trainer.parts.monitor.monitor
        assert monitor is not None and monitor.settings.epochs == 40
    finally:
        trainer.close()


# ----- what is recorded ------------------------------------------------------------------------

def test_every_epoch_records_the_signals_and_the_probe(tiny_data: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(make_cfg(tiny_data, out, *HEALTHY))
    records = metrics(out)
    for rec in records:
        assert all(rec.get(k) is not None for k in MONITOR_KEYS), rec
        assert rec["loss_chance"] == pytest.approx(math.log(32 + 1))  # MoCo: ln(K + 1)
        assert (rec["health_images"], rec["health_dim"], rec["health_feature_dim"]) == (32, 128, 512)
    tb = EventAccumulator(str(out / "tb"))
    tb.Reload()
    tags = set(tb.Tags()["scalars"])
    assert {f"epoch/{k}" for k in SCALAR_KEYS} <= tags
    assert [e.value for e in tb.Scalars("epoch/probe_top1")] == pytest.approx(
        [r["probe_top1"] for r in records])
    assert (out / "plot.png").stat().st_size > 0


def test_the_probe_evaluates_on_head_features_runs_too(tiny_data: Path, tmp_path: Path) -> None:
    """--knn-features head: the probe's held-out features are the head's inputs of the kNN's
    own pass, and the kNN figure is the one without the probe."""
    head = ("--knn-features", "head", *HEALTHY)
    train(make_cfg(tiny_data, tmp_path / "with", *head))
    train(make_cfg(tiny_data, tmp_path / "without", *head, "--probe", "off"))
    with_probe, without = metrics(tmp_path / "with"), metrics(tmp_path / "without")
    assert all(r["probe_top1"] is not None for r in with_probe)
    assert [r["knn_top1"] for r in with_probe] == [r["knn_top1"] for r in without]
    assert not any(k.startswith("probe") for r in without for k in r)


def test_unlabeled_images_get_the_health_signals_without_a_probe(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", splits=("train",))
    flat = tmp_path / "flat" / "train"
    flat.mkdir(parents=True)
    for i, png in enumerate(sorted((data / "train").rglob("*.png"))):
        png.rename(flat / f"{i:03d}.png")
    _, logs = run_logged(make_cfg(tmp_path / "flat", tmp_path / "run", *HEALTHY, "--probe", "on"))
    assert any("--probe on: the training images are unlabeled" in m for m in logs)
    rec = metrics(tmp_path / "run")[-1]
    assert rec["health_rank"] is not None and rec["loss_chance"] is not None
    assert not any(k.startswith("probe") for k in rec)


def test_health_and_probe_can_be_turned_off(tiny_data: Path, tmp_path: Path) -> None:
    train(make_cfg(tiny_data, tmp_path / "run", *HEALTHY, "--health", "false", "--probe", "off"))
    rec = metrics(tmp_path / "run")[-1]
    assert rec["loss_chance"] == pytest.approx(math.log(33))  # the chance level stays
    assert not any(k.startswith(("health", "probe")) for k in rec)


# ----- it changes nothing, and resumes exactly ------------------------------------------------

@pytest.mark.parametrize("mechanism", ["moco", "end-to-end"])
def test_pretraining_is_bit_identical_with_and_without_the_monitor(tiny_data: Path,
                                                                   tmp_path: Path,
                                                                   mechanism: str) -> None:
    """Two epochs through the real loop: the same weights, buffers, SGD state and losses
    (end-to-end: the query encoder runs twice a step, the probe reads the first)."""
    flags = (*HEALTHY, "--mechanism", mechanism)
    train(make_cfg(tiny_data, tmp_path / "on", *flags))
    train(make_cfg(tiny_data, tmp_path / "off", *flags, "--health", "false", "--probe", "off"))
    assert_same_final_state(final_state(tmp_path / "off"), final_state(tmp_path / "on"))
    on, off = metrics(tmp_path / "on"), metrics(tmp_path / "off")
    assert [(r["loss"], r["acc1"], r["knn_top1"]) for r in on] == [
        (r["loss"], r["acc1"], r["knn_top1"]) for r in off]
    assert on[-1]["probe_top1"] is not None and "probe_top1" not in off[-1]


def test_a_stopped_run_resumes_the_probe_exactly(tiny_data: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped mid-epoch 2 (a real SIGTERM after step 6 of 8) and resumed: the same weights,
    probe state and metrics (health, probe, kNN) as the uninterrupted run."""
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    train(make_cfg(tiny_data, ref_dir, *HEALTHY))
    sigterm_after(monkeypatch, 6)
    stopped = train(make_cfg(tiny_data, run_dir, *HEALTHY))
    assert stopped.stopped_early
    saved = torch.load(stopped.checkpoint, weights_only=True)["moco"]["monitor"]
    assert saved["probe"]["steps"] == 6 and saved["probe"]["sums"][2] == 2 * 8  # epoch 2's
    monkeypatch.setattr(train_mod, "train_step", _real_step)
    train(make_cfg(tiny_data, run_dir, *HEALTHY, "--resume", "auto"))
    ref, got = final_state(ref_dir), final_state(run_dir)
    assert_same_final_state(ref, got)
    assert_same_tensors(ref["moco"]["monitor"], got["moco"]["monitor"], "monitor")
    assert metrics(run_dir) == metrics(ref_dir)
    assert metrics(run_dir)[-1]["probe_top1"] is not None


# ----- the chance level of each method ----------------------------------------------------------

@pytest.mark.parametrize(("settings", "batch", "expected"), [
    ({"mechanism": "moco", "moco_k": 4096}, 256, math.log(4097)),
    ({"mechanism": "moco", "moco_k": 4096, "symmetric": True}, 256, 2 * math.log(4097)),
    ({"mechanism": "memory-bank", "moco_k": 4096}, 256, math.log(4097)),
    ({"mechanism": "end-to-end", "batch_size": 512}, 128, math.log(128)),  # one of 4 processes
    # MoCo v3: two terms of 2τ·ln(keys of all 4 processes)
    ({"mechanism": "mocov3", "moco_t": 0.2}, 128, 2 * 2 * 0.2 * math.log(4 * 128)),
])
def test_each_method_declares_its_chance_level(settings: dict[str, Any], batch: int,
                                               expected: float) -> None:
    cfg = MocoConfig(**settings)
    assert method_spec(cfg.mechanism).chance(cfg, batch, 4) == pytest.approx(expected)
