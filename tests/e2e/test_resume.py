"""Exact resume: a run stopped after any step and resumed ends bit-for-bit where an
uninterrupted run ends (weights of both encoders, queue and pointer, BN buffers, SGD momentum,
key-shuffle RNG, counters), and writes the same metrics.jsonl (timings aside)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    _real_step,
    assert_same_final_state,
    final_state,
    make_cfg,
    metrics,
    sigterm_after,
    train,
)

import moco.engine.loop as train_mod
from moco.data.source import DataError
from moco.engine.loop import Pretrainer
from moco.engine.rundir import list_checkpoints
from moco.utils.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stopped_twice_then_resumed_is_bit_exact(tiny_data: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Stops after step 4 (the last step of epoch 1, before the epoch is closed) and after
    step 6 (mid epoch 2), each by a real SIGTERM; kNN and metrics.jsonl included."""
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    train(make_cfg(tiny_data, ref_dir))

    sigterm_after(monkeypatch, 4)
    r1 = train(make_cfg(tiny_data, run_dir))
    assert r1.stopped_early and r1.checkpoint.name == "checkpoint_0000_step000004.pth.tar"
    assert metrics(run_dir) == []  # epoch 1 not closed yet
    sigterm_after(monkeypatch, 2)
    r2 = train(make_cfg(tiny_data, run_dir, "--resume", "auto"))
    assert r2.stopped_early and r2.checkpoint.name == "checkpoint_0001_step000002.pth.tar"
    mid = load_checkpoint(r2.checkpoint)["moco"]
    assert (mid["epoch_step"], mid["global_step"]) == (2, 6)
    monkeypatch.setattr(train_mod, "train_step", _real_step)
    r3 = train(make_cfg(tiny_data, run_dir, "--resume", "auto"))
    assert not r3.stopped_early

    assert_same_final_state(final_state(ref_dir), final_state(run_dir))
    assert metrics(run_dir) == metrics(ref_dir)
    assert [r["epoch"] for r in metrics(run_dir)] == [1, 2]


def loader_flags(tmp_path: Path, loader: str) -> list[str]:
    """``--loader`` through a config file (works whether or not the flag exists)."""
    path = tmp_path / f"loader-{loader}.yaml"
    path.write_text(f"loader: {loader}\n")
    return ["--config", str(path)]


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["pil", "tensor"])
def test_resume_from_every_step_is_bit_exact(tiny_data: Path, tmp_path: Path, loader: str) -> None:
    """--save-every-steps 1 --keep-last 0: resuming from the checkpoint of any step (mid-epoch
    and epoch ends) ends bit-for-bit at the uninterrupted run's final state and metrics."""
    ref_dir = tmp_path / "ref"
    train(make_cfg(tiny_data, ref_dir, "--save-every-steps", "1", "--keep-last", "0",
                   "--knn-every", "0", *loader_flags(tmp_path, loader)))
    ckpts = list_checkpoints(ref_dir)
    assert len(ckpts) == 8  # 2 epochs x 4 steps: 3 mid-epoch + 1 end per epoch
    ref = final_state(ref_dir)
    for ckpt in ckpts[:-1]:
        run_dir = tmp_path / f"from_{ckpt.name.split('.')[0]}"
        run_dir.mkdir()
        shutil.copy(ckpt, run_dir / ckpt.name)
        shutil.copy(ref_dir / "metrics.jsonl", run_dir / "metrics.jsonl")  # trimmed on resume
        train(make_cfg(tiny_data, run_dir, "--knn-every", "0", *loader_flags(tmp_path, loader),
                       "--resume", str(run_dir / ckpt.name)))
        assert_same_final_state(ref, final_state(run_dir))
        assert metrics(run_dir) == metrics(ref_dir), ckpt.name
        shutil.rmtree(run_dir)  # ~0.4 GB of checkpoints per resumed run


def test_checkpoint_holds_the_whole_training_state(tiny_data: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What a mid-epoch checkpoint carries, and that resuming restores each piece."""
    out = tmp_path / "run"
    sigterm_after(monkeypatch, 3)
    r = train(make_cfg(tiny_data, out, "--knn-every", "0", "--on-bad-image", "skip"))
    ckpt = load_checkpoint(r.checkpoint)
    assert ckpt["arch"] == "resnet18" and ckpt["epoch"] == 0
    keys = ckpt["state_dict"].keys()
    assert {"module.queue", "module.queue_ptr"} <= set(keys)
    assert any(k.startswith("module.encoder_k.") for k in keys)
    assert int(ckpt["state_dict"]["module.queue_ptr"]) == 3 * 8 % 32
    assert len(ckpt["optimizer"]["state"]) > 0 and all(
        "momentum_buffer" in v for v in ckpt["optimizer"]["state"].values())
    ours = ckpt["moco"]
    assert (ours["epoch_step"], ours["global_step"]) == (3, 3)
    assert ours["partial"]["loss_sum"] > 0 and ours["config"]["on_bad_image"] == "skip"
    assert set(ours["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert ours["bad_images"] == []

    monkeypatch.setattr(train_mod, "train_step", _real_step)
    p = Pretrainer(make_cfg(tiny_data, out, "--knn-every", "0", "--resume", "auto"),
                   log=lambda _m: None, progress=False)
    s = p.state
    assert (s.epoch, s.epoch_step, s.global_step) == (0, 3, 3)
    assert s.loss_sum == ours["partial"]["loss_sum"] and s.acc_sum == ours["partial"]["acc_sum"]
    assert torch.equal(p.shuffle_rng.get_state(), ours["shuffle_rng"])
    assert torch.equal(torch.get_rng_state(), ours["rng"]["torch"])
    assert p.cfg.on_bad_image == "skip"  # from the run folder's config.yaml
    p.runlog.close()


@pytest.mark.slow
def test_resume_exact_with_plain_bn_mlp_symmetric_v2_cosine_and_workers(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Other state: plain BN (num_batches_tracked), MLP head, symmetric loss (two key sets per
    step), aug+ (blur), cosine lr; resumed with a DataLoader worker where the reference had
    none (augmentations are seeded per sample, not per worker)."""
    flags = ["--shuffle-bn", "none", "--bn-splits", "1", "--mlp", "--symmetric", "--aug", "v2", "--cos",
             "--moco-k", "48", "--knn-every", "0", *loader_flags(tmp_path, "pil")]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    train(make_cfg(tiny_data, ref_dir, *flags))
    sigterm_after(monkeypatch, 5)
    assert train(make_cfg(tiny_data, run_dir, *flags)).stopped_early
    monkeypatch.setattr(train_mod, "train_step", _real_step)
    train(make_cfg(tiny_data, run_dir, *flags, "--workers", "1", "--resume", "auto"))
    ref = final_state(ref_dir)
    assert any(k.endswith("num_batches_tracked") and int(v) == 16  # 2 forwards x 8 steps
               for k, v in ref["state_dict"].items())
    assert_same_final_state(ref, final_state(run_dir))
    assert metrics(run_dir) == metrics(ref_dir)


# ----- resume knows its data ------------------------------------------------------------------

def test_resume_on_other_data_warns_and_says_how_to_start_fresh(tiny_data: Path,
                                                                tmp_path: Path) -> None:
    """The checkpoint records how many images and classes it was trained on; --resume auto
    on a folder with other counts continues, saying so and how to start fresh instead."""
    from helpers import make_image_folder

    out = tmp_path / "run"
    train(make_cfg(tiny_data, out, "--knn-every", "0", "--stop-after-epochs", "1"))
    assert load_checkpoint(list_checkpoints(out)[-1])["moco"]["data"] == {"images": 32,
                                                                         "classes": 2}
    other = make_image_folder(tmp_path / "other", classes=3, per_class=8, seed=1)
    logs: list[str] = []
    Pretrainer(make_cfg(other, out, "--knn-every", "0", "--resume", "auto"), log=logs.append,
               progress=False).run()
    said = [m for m in logs if "was trained on" in m]
    assert len(said) == 1, logs
    assert (said[0].startswith("warning: ") and "was trained on 32 images of 2 classes" in said[0]
            and f"{other} has 24 images of 3 classes" in said[0]
            and "--overwrite" in said[0] and "another --output" in said[0])
    assert any(m.startswith("warning: the checkpoint's online probe was trained for other "
                            "classes") for m in logs)  # 3 classes now: a new probe
    # The same data: nothing to say.
    logs.clear()
    Pretrainer(make_cfg(other, out, "--knn-every", "0", "--epochs", "3", "--resume", "auto"),
               log=logs.append, progress=False).run()
    assert not any("was trained on" in m for m in logs)


def test_a_cut_last_line_of_metrics_is_recovered_on_resume(tiny_data: Path, tmp_path: Path) -> None:
    """A metrics.jsonl whose last line was cut (a kill mid-write where the rename is not
    atomic) is read without that line, said so, and rewritten whole by the resumed run."""
    ref_dir, out = tmp_path / "ref", tmp_path / "run"
    train(make_cfg(tiny_data, ref_dir, "--knn-every", "0"))
    train(make_cfg(tiny_data, out, "--knn-every", "0", "--stop-after-epochs", "1"))
    path = out / "metrics.jsonl"
    path.write_text(path.read_text() + '{"epoch": 2, "step": 8, "loss": 6.1')
    logs: list[str] = []
    Pretrainer(make_cfg(tiny_data, out, "--knn-every", "0", "--resume", "auto"),
               log=logs.append, progress=False).run()
    assert any(f"{path}: line 2 is not a complete record" in m for m in logs), logs
    assert metrics(out) == metrics(ref_dir)


def test_a_cut_metrics_line_of_a_saved_epoch_is_named(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(make_cfg(tiny_data, out, "--knn-every", "0", "--stop-after-epochs", "1"))
    path = out / "metrics.jsonl"
    path.write_bytes(path.read_bytes()[:40] + b"\0" * 30)  # a zero-filled tail
    logs: list[str] = []
    p = Pretrainer(make_cfg(tiny_data, out, "--knn-every", "0", "--resume", "auto"),
                   log=logs.append, progress=False)
    assert p.state.history == [] and not path.read_text()
    assert any("line 1 is not a complete record" in m for m in logs), logs
    p.close()


def test_resume_auto_from_another_working_directory(tiny_data: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A run started with relative DATA and --output, resumed from another folder (a requeued
    job) with only --output RUN --resume auto: config.yaml's absolute paths find the data."""
    from helpers import TINY_FLAGS

    from moco.cli import build_parser
    from moco.cli.pretrain import config_from_args

    here, there = tiny_data.parent, tmp_path / "elsewhere"
    there.mkdir()
    monkeypatch.chdir(here)
    train(make_cfg(Path(tiny_data.name), Path("runs/a"), "--knn-every", "0",
                   "--stop-after-epochs", "1"))
    monkeypatch.chdir(there)
    run = here / "runs" / "a"
    args = build_parser().parse_args(["pretrain", "--output", str(run), "--resume", "auto",
                                      "--workers", "0", "--no-progress"])
    cfg = config_from_args(args)
    assert cfg.data == str(tiny_data)
    result = train(cfg)
    assert [r["epoch"] for r in metrics(run)] == [1, 2] and not result.stopped_early
    # The data moved away: the error names the saved configuration it came from.
    tiny_data.rename(here / "moved")
    with pytest.raises(DataError, match=rf"DATA from {re.escape(str(run / 'config.yaml'))}"):
        train(config_from_args(build_parser().parse_args(
            ["pretrain", "--output", str(run), "--resume", "auto", "--epochs", "3",
             *TINY_FLAGS[-4:]])))
