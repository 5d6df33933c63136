"""``moco lincls`` on several processes (2 gloo processes on the CPU, as torchrun starts them),
bf16 autocast of the frozen backbone, and the guarantees of a resumable run: a signal saves the
step reached and exits 0, ``--resume auto`` continues to the uninterrupted run's result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_image_folder, run_cli, save_original_checkpoint, spawn

from moco.core.errors import MocoError
from moco.eval import lincls_data
from moco.eval.lincls import LinclsConfig, LinearClassification
from moco.eval.lincls_engine import LinearEngine
from moco.eval.lincls_state import atomic_copy
from moco.utils.checkpoint import load_checkpoint
from moco.utils.distributed import DistContext

QUIET: dict[str, Any] = {"log": lambda _m: None, "progress": False}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """18 train images (a batch of 17 leaves a last batch of 1: one process gets none) and 18
    val images; a CIFAR-stem resnet18 checkpoint in the original layout."""
    d = tmp_path_factory.mktemp("lincls_dist")
    data = make_image_folder(d / "data", classes=2, per_class=9, splits=("train", "val"))
    ckpt = d / "moco.pth.tar"
    save_original_checkpoint(ckpt, "resnet18", cifar_stem=True, with_optimizer=False)
    return data, ckpt


def _cfg(data: Path, ckpt: Path, out: Path, **kw: Any) -> dict[str, Any]:
    base = {"data": str(data), "pretrained": str(ckpt), "output": str(out), "epochs": 2,
            "batch_size": 17, "lr": 1.0, "workers": 0, "device": "cpu", "image_size": 32}
    base.update(kw)
    return base


def _run(ctx: DistContext | None, cfg: dict[str, Any], stop_at_step: int = 0) -> dict[str, Any]:
    """One process's run; with ``stop_at_step`` rank 0 sends itself SIGTERM during that step
    (counted over the whole run), as a scheduler would."""
    run = LinearClassification(LinclsConfig(**cfg), ctx=ctx, **QUIET)
    if stop_at_step and run.dist.is_main:
        real, calls = run.engine.step, [0]

        def step(*a: Any) -> Any:
            calls[0] += 1
            if calls[0] == stop_at_step:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*a)

        run.engine.step = step  # type: ignore[method-assign]
    res = run.run()
    return {"weight": run.engine.fc.weight.detach().clone(), "bias": run.engine.fc.bias.detach().clone(),
            "history": res.history, "stopped_by": res.stopped_by}


def _worker(ctx: DistContext, cfg: dict[str, Any], stop_at_step: int = 0) -> dict[str, Any]:
    torch.set_num_threads(1)
    return _run(ctx, cfg, stop_at_step)


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    torch.testing.assert_close(a["weight"], b["weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["bias"], b["bias"], rtol=1e-5, atol=1e-6)
    assert [h["acc1"] for h in a["history"]] == [h["acc1"] for h in b["history"]]
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert ha["loss"] == pytest.approx(hb["loss"], rel=1e-5)


# ----- batches ------------------------------------------------------------------------------
def test_batches_split_without_changing_the_global_batch() -> None:
    assert [list(lincls_data.contiguous_part(5, r, 2)) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [len(lincls_data.contiguous_part(1, r, 3)) for r in range(3)] == [1, 0, 0]
    one = list(lincls_data.StepBatches(18, 17, seed=3, epoch=1))
    two = [list(lincls_data.StepBatches(18, 17, seed=3, epoch=1, rank=r, world_size=2))
           for r in range(2)]
    assert [len(b) for b in one] == [17, 1] and [len(b) for b in two[1]] == [8, 0]
    assert [a + b for a, b in zip(*two, strict=True)] == one  # rank 0's part, then rank 1's
    resumed = list(lincls_data.StepBatches(18, 17, seed=3, epoch=1, start_step=1))
    assert resumed == one[1:]
    # the cached features: each process owns i % world == rank, every image exactly once
    idx = torch.tensor([5, 2, 9, 4, 7])
    mine = [idx[lincls_data.owned_part(idx, r, 2)].tolist() for r in range(2)]
    assert mine == [[2, 4], [5, 9, 7]] and lincls_data.owned(7, 1, 2) == [1, 3, 5]
    assert lincls_data.loss_scale(17, 2) * 17 / 2 == 1.0


# ----- two processes equal one ----------------------------------------------------------------
@pytest.mark.parametrize("fast", [False, True])
def test_two_processes_equal_one(setup: tuple[Path, Path], tmp_path: Path, fast: bool) -> None:
    data, ckpt = setup
    one = _run(None, _cfg(data, ckpt, tmp_path / "one", fast=fast))
    two = spawn(_worker, tmp_path, _cfg(data, ckpt, tmp_path / "two", fast=fast), wait_s=300)
    assert torch.equal(two[0]["weight"], two[1]["weight"])  # every process makes the same update
    _same(two[0], one)
    assert two[0]["history"][0]["processes"] == 2
    # rank 0 alone wrote the run folder: same records as the one-process run
    recs = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["acc1"] for r in recs] == [h["acc1"] for h in one["history"]]
    ckpt2 = load_checkpoint(tmp_path / "two" / "checkpoint.pth.tar")
    torch.testing.assert_close(ckpt2["state_dict"]["module.fc.weight"], one["weight"],
                               rtol=1e-5, atol=1e-6)


def test_stopped_on_two_processes_resumes_on_one(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """SIGTERM to rank 0 in epoch 1's second step: both processes stop after it, rank 0 saves
    the step reached; one process resumes it and ends where the uninterrupted run ends."""
    data, ckpt = setup
    ref = _run(None, _cfg(data, ckpt, tmp_path / "ref", batch_size=5))  # steps of 5, 5, 5, 3
    cfg = _cfg(data, ckpt, tmp_path / "run", batch_size=5)
    two = spawn(_worker, tmp_path, cfg, 2, wait_s=300)
    assert two[0]["stopped_by"] == two[1]["stopped_by"] == signal.SIGTERM
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pth.tar")
    assert (saved["epoch"], saved["moco"]["step"]) == (0, 2)
    done = _run(None, {**cfg, "resume": "auto"})
    assert done["stopped_by"] is None
    _same(done, ref)


@pytest.mark.slow
def test_torchrun_command_equals_one_process(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 -m moco lincls``: the command joins the group itself."""
    data, ckpt = setup
    one = _run(None, _cfg(data, ckpt, tmp_path / "one", fast=True))
    root = Path(__file__).resolve().parents[2]
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "moco", "lincls", str(data),
         "--pretrained", str(ckpt), "--output", str(tmp_path / "two"), "--epochs", "2", "-b", "17",
         "--lr", "1", "-j", "0", "--device", "cpu", "--image-size", "32", "--fast",
         "--no-progress"], capture_output=True, text=True, timeout=300, cwd=root,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("linear classification") == 1 and "2 processes" in r.stdout
    two = load_checkpoint(tmp_path / "two" / "checkpoint.pth.tar")
    torch.testing.assert_close(two["state_dict"]["module.fc.weight"], one["weight"],
                               rtol=1e-5, atol=1e-6)


# ----- one process: signals and --resume auto ---------------------------------------------------
def test_sigterm_saves_and_resume_auto_continues_exactly(setup: tuple[Path, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    data, ckpt = setup
    ref = _run(None, _cfg(data, ckpt, tmp_path / "ref", fast=True, epochs=3, batch_size=4))
    out = tmp_path / "run"
    argv = ["lincls", str(data), "--pretrained", str(ckpt), "--output", str(out), "--epochs", "3",
            "-b", "4", "--lr", "1", "-j", "0", "--device", "cpu", "--image-size", "32",
            "--fast", "--no-progress"]
    real, calls = LinearEngine.step, [0]

    def step(self: LinearEngine, *a: Any) -> Any:
        calls[0] += 1
        if calls[0] == 7:  # epoch 2 (5 steps per epoch), its second step
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a)

    monkeypatch.setattr(LinearEngine, "step", step)
    rc, stdout, _ = run_cli(argv)
    assert rc == 0 and "stopped by signal 15 at epoch 2 step 2" in stdout
    assert "--resume auto" in stdout
    saved = load_checkpoint(out / "checkpoint.pth.tar")
    assert (saved["epoch"], saved["moco"]["step"]) == (1, 2)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    monkeypatch.setattr(LinearEngine, "step", real)
    assert run_cli([*argv, "--resume", "auto"])[0] == 0
    last = load_checkpoint(out / "checkpoint.pth.tar")
    assert last["epoch"] == 3 and last["moco"]["step"] == 0
    torch.testing.assert_close(last["state_dict"]["module.fc.weight"], ref["weight"], rtol=0, atol=0)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["loss"], r["acc1"]) for r in recs] == [
        (h["epoch"], h["loss"], h["acc1"]) for h in ref["history"]]


def test_resume_auto_without_a_checkpoint(setup: tuple[Path, Path], tmp_path: Path) -> None:
    data, ckpt = setup
    res = _run(None, _cfg(data, ckpt, tmp_path / "fresh", epochs=1, fast=True, resume="auto"))
    assert [h["epoch"] for h in res["history"]] == [1]
    with pytest.raises(MocoError, match="no checkpoint.pth.tar in .* and no --pretrained"):
        LinearClassification(LinclsConfig(data=str(data), output=str(tmp_path / "none"),
                                          resume="auto", device="cpu"), **QUIET)


# ----- bf16 -------------------------------------------------------------------------------------
def test_bf16_autocast_of_the_frozen_backbone(setup: tuple[Path, Path], tmp_path: Path) -> None:
    data, ckpt = setup
    runs = {p: LinearClassification(LinclsConfig(**_cfg(data, ckpt, tmp_path / p, precision=p)),
                                    **QUIET) for p in ("fp32", "bf16")}
    assert runs["bf16"].dtype == torch.bfloat16 and runs["fp32"].dtype is None
    assert runs["fp32"].engine.dtype is None and "bf16 backbone" in runs["bf16"].describe()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for r in runs.values():
        r.model.eval()
    f32, f16 = (runs[p].engine.backbone(x) for p in ("fp32", "bf16"))
    assert f16.dtype == torch.float32 and not torch.equal(f16, f32)  # computed in bf16
    torch.testing.assert_close(f16, f32, rtol=0.05, atol=0.05)
    res = runs["bf16"].run()
    assert len(res.history) == 2


def test_best_copy_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "last", tmp_path / "best"
    src.write_bytes(b"new" * 1000)
    dst.write_bytes(b"old")

    def broken(a: Any, b: Any) -> None:
        Path(b).write_bytes(b"ne")  # half written, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("moco.eval.lincls_state.shutil.copyfile", broken)
    with pytest.raises(OSError):
        atomic_copy(src, dst)
    assert dst.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["best", "last"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_run(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """On a GPU, auto precision runs the frozen backbone in bf16 (fp32 on GPUs without it) and
    the run gives the CPU fp32 run's accuracy records to within a few images."""
    data, ckpt = setup
    run = LinearClassification(LinclsConfig(**_cfg(data, ckpt, tmp_path / "gpu", device="cuda",
                                                    fast=True)), **QUIET)
    from moco.utils.runtime import native_bf16_here

    want = torch.bfloat16 if native_bf16_here(run.device) else None
    assert run.device.type == "cuda" and run.dtype == want
    res = run.run()
    assert len(res.history) == 2 and run.engine.fc.weight.device.type == "cuda"
    cpu = _run(None, _cfg(data, ckpt, tmp_path / "cpu", fast=True, precision="fp32"))
    torch.testing.assert_close(run.engine.fc.weight.cpu(), cpu["weight"], rtol=0.05, atol=0.01)
