"""The typed ``moco`` entry of a pretraining checkpoint (moco.engine.run_state.MocoEntry): the
same keys on disk, in the same order, as the untyped dict written before (checkpoints are
unchanged), and a missing key read with the default a resume always used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY_FLAGS

from moco.cli import build_parser
from moco.cli.pretrain import config_from_args
from moco.engine.loop import Pretrainer
from moco.engine.run_state import CHECKPOINT_FORMAT, MocoEntry, TrainState
from moco.utils.checkpoint import load_checkpoint

# The entry as the loop wrote it before it was typed (moco/train.py's checkpoint_dict).
ON_DISK_KEYS = ["format", "config", "epoch_step", "global_step", "partial", "knn_random_init",
                "shuffle_rng", "scaler", "rng", "bad_images", "loader"]


def hand_built() -> dict[str, object]:
    return {
        "format": 1, "config": {"arch": "resnet18", "lr": 0.03}, "epoch_step": 3,
        "global_step": 11, "partial": {"loss_sum": 12.5, "acc_sum": 40.0, "seconds": 2.25},
        "knn_random_init": 37.5, "shuffle_rng": torch.Generator().manual_seed(3).get_state(),
        "scaler": None, "rng": {"python": (3, (1, 2), None)}, "bad_images": [4, 9],
        "loader": {"shard": 2},
    }


def test_an_entry_round_trips_key_for_key() -> None:
    d = hand_built()
    out = MocoEntry.from_dict(d).to_dict()
    assert list(out) == ON_DISK_KEYS
    assert {k: v for k, v in out.items() if k != "shuffle_rng"} == {
        k: v for k, v in d.items() if k != "shuffle_rng"}
    assert torch.equal(out["shuffle_rng"], d["shuffle_rng"])  # type: ignore[arg-type]


def test_a_missing_entry_reads_as_the_start_of_a_run() -> None:
    """The original's checkpoints have no ``moco`` entry; older ones may lack keys."""
    e = MocoEntry.from_dict({})
    assert (e.epoch_step, e.global_step, e.loss_sum, e.acc_sum, e.seconds) == (0, 0, 0.0, 0.0, 0.0)
    assert e.shuffle_rng is None and e.scaler is None and e.rng is None and e.config is None
    assert e.bad_images == [] and e.loader == {} and e.format == 1
    assert MocoEntry.from_dict("not a dict").global_step == 0
    s = TrainState(epoch=9, global_step=5)
    MocoEntry.from_dict({"epoch_step": 2, "global_step": 7}).restore(s, 3)
    assert (s.epoch, s.epoch_step, s.global_step) == (3, 2, 7)


@pytest.mark.usefixtures("one_thread")
def test_a_saved_checkpoint_has_the_same_entry(tiny_data: Path, tmp_path: Path) -> None:
    cfg = config_from_args(build_parser().parse_args(
        ["pretrain", str(tiny_data), *TINY_FLAGS, "--output", str(tmp_path / "r"),
         "--epochs", "1", "--knn-every", "0"]))
    result = Pretrainer(cfg, log=lambda _m: None, progress=False).run()
    ckpt = load_checkpoint(result.checkpoint)
    assert list(ckpt) == ["epoch", "arch", "state_dict", "optimizer", "moco"]
    entry = ckpt["moco"]
    # ... then the size of the training set it was trained on (resume knows its data) and,
    # last, the training monitor's state (its online probe)
    assert list(entry) == [*ON_DISK_KEYS, "data", "monitor"]
    assert entry["format"] == CHECKPOINT_FORMAT
    assert entry["data"] == {"images": 32, "classes": 2}
    assert entry["monitor"]["probe"]["steps"] == 4
    assert list(entry["partial"]) == ["loss_sum", "acc_sum", "seconds"]
    assert entry["config"] == cfg.to_dict() and entry["global_step"] == 4  # 32 images / batch 8
    assert MocoEntry.from_dict(entry).global_step == 4


def test_a_methods_own_metric_sums_are_kept_only_when_there_are_some() -> None:
    """A method that logs metrics of its own (StepOutput.metrics) keeps their partial sums in
    ``partial`` for an exact mid-epoch resume; MoCo's entry stays as it was."""
    s = TrainState(epoch_step=2, global_step=6, loss_sum=3.0, metric_sums={"cos": 1.25})
    entry = MocoEntry.of(s).to_dict()
    assert entry["partial"]["metric_sums"] == {"cos": 1.25}
    back = TrainState()
    MocoEntry.from_dict(entry).restore(back, 1)
    assert back.metric_sums == {"cos": 1.25} and back.metric_sums is not s.metric_sums
    assert list(MocoEntry.from_dict(hand_built()).to_dict()["partial"]) == [
        "loss_sum", "acc_sum", "seconds"]
