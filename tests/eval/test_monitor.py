"""The training monitor (health report + online probe behind after_step / epoch_record): a
toy pretraining loop is bit-identical with and without it, its records hold the documented
keys, and its state resumes."""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moco.core.backbones import strip_head
from moco.core.model import MoCo
from moco.data.augment import pretrain_transform
from moco.data.recipes import CIFAR_MEAN, CIFAR_STD
from moco.data.source import ImageSource
from moco.eval.feature_tap import HeadInputTap
from moco.eval.monitor import SCALAR_KEYS, MonitorSettings, TrainingMonitor

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
K = 16


def encoder() -> nn.Module:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 12, 3, padding=1), bn=nn.BatchNorm2d(12), relu=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(12, 8)))


def images(labeled: bool = True, n: int = 40) -> ImageSource:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return ImageSource(array=arr, labels=[i % 3 for i in range(n)] if labeled else None,
                       classes=["a", "b", "c"] if labeled else None)


def toy_run(monitored: bool, labeled: bool = True) -> tuple[dict[str, Any], Any, list[dict[str, Any]]]:
    """Two epochs of three steps; between epochs an eval-mode forward of f_q (a kNN monitor on
    head features). Batches and indices come from torch's global generator."""
    torch.manual_seed(0)
    model = MoCo(encoder(), dim=8, k=K, m=0.9, t=0.2)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
    src = images(labeled)
    view = pretrain_transform("cifar-demo", 8, 0.2, CIFAR_MEAN, CIFAR_STD)
    mon = TrainingMonitor(model.encoder_q, src, view, CPU, MonitorSettings(probe_lr=0.5)) \
        if monitored else None
    history: list[dict[str, Any]] = []
    for epoch in range(2):
        model.train()
        for _ in range(3):
            im_q, im_k = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
            index = torch.randint(0, len(src), (8,))
            out = model(im_q, im_k)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            if mon is not None:
                mon.after_step(out.logits, index)
        model.eval()
        with torch.no_grad():
            model.encoder_q(torch.randn(4, 3, 8, 8))  # the kNN monitor (eval mode)
            query = strip_head(model.encoder_q)(torch.randn(6, 3, 8, 8))
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": float(out.loss.detach())}
        if mon is not None:
            record.update(mon.epoch_record(record["loss"], query, torch.arange(6) % 3))
        history.append(record)
    if mon is not None:
        mon.close()
    return {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state(), history


@pytest.mark.parametrize("labeled", [True, False])
def test_pretraining_is_bit_identical_with_and_without_the_monitor(labeled: bool) -> None:
    ref_state, ref_rng, _ = toy_run(False, labeled)
    state, rng, _ = toy_run(True, labeled)
    for k, v in ref_state.items():
        assert torch.equal(state[k], v), k
    assert torch.equal(rng, ref_rng)


def test_records_hold_the_monitor_keys() -> None:
    _, _, history = toy_run(True)
    rec = history[-1]
    assert rec["loss_chance"] == pytest.approx(math.log(K + 1))
    for key in SCALAR_KEYS:
        assert rec[key] is not None, key
    assert rec["health_dim"] == 8 and rec["health_feature_dim"] == 12 and rec["health_images"] == 40
    assert 0 <= rec["probe_top1"] <= 100 and 0 <= rec["probe_train_top1"] <= 100


def test_unlabeled_images_get_health_without_probe() -> None:
    _, _, history = toy_run(True, labeled=False)
    rec = history[-1]
    assert rec["health_rank"] is not None and rec["loss_chance"] is not None
    assert not any(k.startswith("probe") for k in rec)


def test_probe_is_off_without_features_of_its_width() -> None:
    torch.manual_seed(0)
    model = MoCo(encoder(), dim=8, k=K)
    mon = TrainingMonitor(model.encoder_q, images(), lambda img: torch.zeros(3, 8, 8), CPU,
                          MonitorSettings(health=False))
    rec = mon.epoch_record(1.0, torch.zeros(4, 99), torch.zeros(4, dtype=torch.long))
    assert rec["probe_top1"] is None and "health_rank" not in rec  # head features: no probe eval


def test_state_round_trips_through_a_checkpoint() -> None:
    torch.manual_seed(0)
    model = MoCo(encoder(), dim=8, k=K)
    src = images()
    mon = TrainingMonitor(model.encoder_q, src, lambda img: torch.zeros(3, 8, 8), CPU,
                          MonitorSettings(health=False))
    out = model(torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8))
    mon.after_step(out.logits, torch.arange(8))
    buf = io.BytesIO()
    torch.save(mon.state_dict(), buf)
    buf.seek(0)
    other = TrainingMonitor(model.encoder_q, src, lambda img: torch.zeros(3, 8, 8), CPU,
                            MonitorSettings(health=False))
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.chance == mon.chance == pytest.approx(math.log(K + 1))
    assert other.probe is not None and mon.probe is not None and other.probe.steps == 1
    for k, v in mon.probe.net.state_dict().items():
        assert torch.equal(other.probe.net.state_dict()[k], v)
    mon.close()
    other.close()


def test_warnings_read_the_history() -> None:
    torch.manual_seed(0)
    model = MoCo(encoder(), dim=8, k=K)
    mon = TrainingMonitor(model.encoder_q, images(), lambda img: torch.zeros(3, 8, 8), CPU,
                          MonitorSettings(health=False, probe=False))
    h = [{"epoch": e, "loss": 2.83, "loss_chance": math.log(K + 1)} for e in (1, 2, 3)]
    assert [w.split(" ")[0] for w in mon.warnings(h)] == ["stuck"]
    assert mon.tap is None and mon.probe is None


class _Reads(TorchDispatchMode):
    """Counts reads of tensor values into Python (what would make a host wait for a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_after_step_reads_nothing_back_on_labeled_images() -> None:
    torch.manual_seed(0)
    model = MoCo(encoder(), dim=8, k=K)
    mon = TrainingMonitor(model.encoder_q, images(), lambda img: torch.zeros(3, 8, 8), CPU,
                          MonitorSettings(health=False))
    mon.chance = 1.0
    assert mon.all_labeled
    for step in range(2):  # the first step creates the optimizer's momentum buffers
        model(torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8))
        with _Reads() as mode:
            mon.after_step(None, torch.arange(8))
        assert mode.reads == 0, step
    assert mon.probe is not None and mon.probe.steps == 2
    mon.close()


def test_the_probe_sees_the_features_of_a_compiled_encoder() -> None:
    """``--compile``: the tap's hook is traced with the encoder (dynamo; the eager backend
    here, inductor's code generation is not what is tested) and records the same features."""
    torch.manual_seed(0)
    enc = encoder()
    enc.compile(backend="eager")
    tap = HeadInputTap(enc, training_only=True)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(2):
        enc(x)
        with torch.no_grad():
            expected = enc.flat(enc.pool(enc.relu(enc.bn(enc.conv(x)))))
        got = tap.take()
        assert got is not None and torch.allclose(got, expected, atol=1e-6)
    enc.eval()
    enc(x)
    assert tap.take() is None  # eval-mode forwards are not the probe's
    tap.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_monitor_on_cuda_under_bf16_autocast() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = MoCo(encoder(), dim=8, k=K).to(dev)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
    view = pretrain_transform("cifar-demo", 8, 0.2, CIFAR_MEAN, CIFAR_STD)
    mon = TrainingMonitor(model.encoder_q, images(), view, dev)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(torch.randn(8, 3, 8, 8, device=dev), torch.randn(8, 3, 8, 8, device=dev))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        mon.after_step(out.logits, torch.randint(0, 40, (8,), device=dev))
    with torch.no_grad():
        query = strip_head(model.encoder_q).eval()(torch.randn(6, 3, 8, 8, device=dev))
    rec = mon.epoch_record(1.0, query, torch.arange(6, device=dev) % 3,
                           autocast_dtype=torch.bfloat16)
    for key in SCALAR_KEYS:
        assert rec[key] is not None and math.isfinite(rec[key]), key
    assert mon.probe is not None and mon.probe.steps == 3
    mon.close()
