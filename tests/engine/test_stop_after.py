"""--stop-after-epochs and --time-limit: a run trains part of its schedule, saves, stops, and
--resume auto continues to the same end as an uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_final_state, final_state, make_cfg, metrics, train

import moco.engine.loop as train_mod

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stop_after_epochs_then_resume_equals_uninterrupted(tiny_data, tmp_path) -> None:
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    train(make_cfg(tiny_data, ref_dir, "--epochs", "3"))
    r1 = train(make_cfg(tiny_data, run_dir, "--epochs", "3", "--stop-after-epochs", "1"))
    assert r1.stopped_early and r1.checkpoint.name == "checkpoint_0000.pth.tar"
    assert [r["epoch"] for r in metrics(run_dir)] == [1]
    # The lr of epoch 1 is the 3-epoch schedule's, not a 1-epoch schedule's.
    assert metrics(run_dir)[0]["lr"] == metrics(ref_dir)[0]["lr"]
    r2 = train(make_cfg(tiny_data, run_dir, "--epochs", "3", "--resume", "auto"))
    assert not r2.stopped_early
    assert_same_final_state(final_state(ref_dir), final_state(run_dir))
    assert metrics(run_dir) == metrics(ref_dir)


def test_time_limit_stops_before_an_epoch_that_would_not_fit(tiny_data, tmp_path, monkeypatch) -> None:
    """A clock where every epoch takes 10 minutes: with --time-limit 25, two epochs fit (20 min)
    and a third would end at 30, so the run stops after epoch 2 of 4."""
    clock = {"t": 0.0}
    real_epoch = train_mod.Pretrainer._train_epoch

    def epoch(self, stop):  # type: ignore[no-untyped-def]
        real_epoch(self, stop)
        clock["t"] += 600.0

    monkeypatch.setattr(train_mod.Pretrainer, "_train_epoch", epoch)
    monkeypatch.setattr(train_mod.time, "perf_counter", lambda: clock["t"])
    r = train(make_cfg(tiny_data, tmp_path / "run", "--epochs", "4", "--time-limit", "25"))
    assert r.stopped_early
    assert [m["epoch"] for m in metrics(tmp_path / "run")] == [1, 2]


@pytest.mark.parametrize("flag,value", [("--stop-after-epochs", "-1"), ("--time-limit", "-2"),
                                        ("--time-limit", "inf")])
def test_bad_budget_is_refused(tiny_data, tmp_path, flag, value) -> None:
    with pytest.raises(ValueError, match=flag):
        make_cfg(tiny_data, tmp_path / "run", flag, value).validate()


def test_no_budget_trains_everything(tiny_data, tmp_path) -> None:
    r = train(make_cfg(tiny_data, tmp_path / "run", "--stop-after-epochs", "0"))
    assert not r.stopped_early and torch.isfinite(torch.tensor(metrics(tmp_path / "run")[-1]["loss"]))
