"""Cost per training step (memory and time, the MoCo v2 Table 3 analogue), in process and
in a fresh process."""

from __future__ import annotations

import pytest

from moco.ablation.step_cost import measure_isolated, measure_step_cost
from moco.engine.config import MocoConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("mechanism", ["moco", "end-to-end", "memory-bank"])
def test_measure_step_cost_in_process(mechanism: str) -> None:
    cfg = MocoConfig(arch="resnet18", image_size=32, batch_size=4, moco_k=16, bn_splits=2,
                     moco_dim=16, mechanism=mechanism, device="cpu", channels_last=False)
    r = measure_step_cost(cfg, num_samples=10, steps=1, warmup=0)
    assert "error" not in r, r
    assert r["time_per_step_s"] > 0 and r["peak_bytes"] > 0 and r["step_bytes"] >= 0
    assert r["dictionary_size"] == (3 if mechanism == "end-to-end" else 16)


def test_measure_step_cost_reports_errors_instead_of_raising() -> None:
    cfg = MocoConfig(arch="resnet18", image_size=32, batch_size=3, bn_splits=2, moco_k=16,
                     device="cpu", channels_last=False, shuffle_bn="split")
    r = measure_step_cost(cfg, num_samples=10, steps=1, warmup=0)
    assert "divisible" in r["error"]


@pytest.mark.slow
def test_isolated_cost_measurement_runs_in_a_fresh_process() -> None:
    cfg = MocoConfig(arch="resnet18", image_size=32, batch_size=4, moco_k=16, bn_splits=2,
                     moco_dim=16, mechanism="end-to-end", device="cpu", channels_last=False)
    r = measure_isolated(cfg, 10, steps=1, warmup=1)
    assert "error" not in r, r
    assert r["step_bytes"] >= 0 and r["peak_bytes"] > r["step_bytes"] and r["dictionary_size"] == 3
