"""The CUDA tier (``pytest -m cuda``): every command end to end on a GPU, and the GPU-only
parts of the device, precision, layout and synchronisation rules. Skipped without CUDA;
``make gpu-check`` runs it with a per-test limit, the ``--compile`` test last.

Each test uses the tiny datasets of ``conftest.py`` (a few seconds per run on a GPU, the
``--compile`` one ~1 min). Runs go through the command line as a user types it, in this
process (``run_cli``), except torchrun, which starts its own processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import TINY_FLAGS, run_cli

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the cuda tier)"),
]

ROOT = Path(__file__).resolve().parents[2]
GPU_FLAGS = [f for f in TINY_FLAGS if f not in ("--channels-last", "false")]


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _pretrain(data: Path, out: Path, *flags: str) -> tuple[str, list[dict[str, Any]]]:
    rc, stdout, stderr = run_cli(["pretrain", str(data), *GPU_FLAGS, "--output", str(out), *flags])
    assert rc == 0, stderr[-3000:]
    rows = _metrics(out)
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows), rows
    assert rows[-1]["knn_top1"] is not None
    assert torch.cuda.get_device_name() in rows[-1]["machine"]
    return stdout, rows


# ----- the devices and the precision -------------------------------------------------------------

def test_auto_and_cuda_resolve_to_the_indexed_current_gpu() -> None:
    from moco.utils.runtime import native_bf16_here, resolve_device, resolve_precision

    current = torch.device("cuda", torch.cuda.current_device())
    assert resolve_device("auto") == current and resolve_device("cuda") == current
    assert torch.zeros(1, device=resolve_device("cuda")).device == current  # compares equal
    expected = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    assert resolve_precision("auto", current) == expected
    assert native_bf16_here(current) == (expected == torch.bfloat16)


@pytest.mark.parametrize("on_gpu", [True, False], ids=["cache-on-gpu", "cache-in-host-memory"])
def test_tensor_loader_on_cuda_matches_the_cpu(on_gpu: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cuda (unindexed) with the decoded cache on the GPU trains (no pin_memory of a
    CUDA tensor). Both cache placements, against the CPU's batches."""
    from moco.data.cache import DecodedImages
    from moco.data.tensor_loader import TensorTrainLoader
    from moco.engine.config_sources import build_config

    if not on_gpu:  # no free memory reported: the cache stays in (pinned) host memory
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 0))
    rng = np.random.default_rng(0)
    images = DecodedImages(rng.integers(0, 256, (24, 40, 36, 3), dtype=np.uint8), [0, 1] * 12)
    cfg = build_config(overrides=dict(image_size=32, batch_size=8, aug="v2", seed=1,
                                      channels_last=False))
    gpu = TensorTrainLoader(cfg, images, torch.device("cuda"), prefetch=False)
    assert (gpu.images.device.type == "cuda") == on_gpu
    cpu = TensorTrainLoader(cfg, images, torch.device("cpu"))
    for b_gpu, b_cpu in zip(gpu.batches(0), cpu.batches(0), strict=True):
        torch.testing.assert_close(b_gpu.im_q.cpu(), b_cpu.im_q, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(b_gpu.im_k.cpu(), b_cpu.im_k, atol=2e-3, rtol=1e-3)


def test_stream_prefetch_gives_the_same_batches() -> None:
    from moco.data.cache import DecodedImages
    from moco.data.tensor_loader import TensorTrainLoader
    from moco.engine.config_sources import build_config

    rng = np.random.default_rng(0)
    images = DecodedImages(rng.integers(0, 256, (32, 36, 36, 3), dtype=np.uint8), [0, 1] * 16)
    cfg = build_config(overrides=dict(image_size=32, batch_size=8, aug="v2", seed=2))
    plain = [(b.im_q.clone(), b.im_k.clone()) for b in
             TensorTrainLoader(cfg, images, torch.device("cuda"), prefetch=False).batches(1)]
    streamed = TensorTrainLoader(cfg, images, torch.device("cuda"))  # prefetch: on by default
    assert streamed.prefetch
    got = [(b.im_q, b.im_k) for b in streamed.batches(1)]
    assert len(got) == len(plain) == 4
    for (q1, k1), (q2, k2) in zip(plain, got, strict=True):
        assert torch.equal(q1, q2) and torch.equal(k1, k2)
        assert q2.is_contiguous(memory_format=torch.channels_last)  # auto: on CUDA


def test_a_training_step_and_the_augmentation_never_wait_for_the_gpu(tiny_data: Path) -> None:
    """No host-device synchronisation, on the GPU itself: torch's sync debug mode raises on any
    synchronising call."""
    from moco.core.shuffle_bn import LocalShuffle
    from moco.data.loaders import make_tensor_loader
    from moco.data.splits import find_dataset
    from moco.engine.build import build_model, build_optimizer
    from moco.engine.config_sources import build_config
    from moco.engine.training_step import train_step

    dev = torch.device("cuda", torch.cuda.current_device())
    cfg = build_config(overrides=dict(arch="resnet18", cifar_stem=True, image_size=32,
                                      batch_size=8, moco_k=32, bn_splits=2, shuffle_bn="split",
                                      data=str(tiny_data)))
    model = build_model(cfg, dev)
    opt = build_optimizer(cfg, model)
    loader = make_tensor_loader(cfg, find_dataset(tiny_data).train, dev, 0)
    shuffle = LocalShuffle(torch.Generator().manual_seed(0))
    batches = loader.batches(0)
    train_step(model, opt, next(batches), shuffle, torch.bfloat16)  # warm-up: cudnn autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        b = next(batches)
        r = train_step(model, opt, b, shuffle, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert np.isfinite(float(r.loss))


def test_split_bn_channels_last_on_the_gpu_matches_nchw() -> None:
    from moco.core.shuffle_bn import SplitBatchNorm

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a, b = SplitBatchNorm(16, 4).cuda(), SplitBatchNorm(16, 4).cuda()
        b.load_state_dict(a.state_dict())
        x = (torch.randn(32, 16, 8, 8, device="cuda") * 3 + 1).to(dtype)
        xa = x.clone().requires_grad_(True)
        xb = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
        ya, yb = a(xa.float()).to(dtype), b(xb)
        assert yb.dtype == dtype and yb.is_contiguous(memory_format=torch.channels_last)
        tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
        if dtype == torch.float16:
            tol = dict(atol=0.01, rtol=0.005)
        torch.testing.assert_close(yb.float(), ya.float(), **tol)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(xb.grad.float(), xa.grad.float(), **tol)


def test_knn_bank_stays_on_the_gpu() -> None:
    from moco.eval.knn import extract_features, knn_accuracy

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8)).cuda()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(10, 3, 2, 2, generator=g), torch.arange(10) % 3) for _ in range(3)]
    dev = torch.device("cuda", torch.cuda.current_device())
    f, y = extract_features(net, batches, dev, out_device=dev)
    assert f.device == dev and y.device == dev
    fc, yc = extract_features(net, batches, dev)
    assert fc.device.type == "cpu"
    on_gpu = knn_accuracy(f[:10], y[:10], f[10:], y[10:], k=5)
    on_cpu = knn_accuracy(fc[:10], yc[:10], fc[10:], yc[10:], k=5)
    assert on_gpu == pytest.approx(on_cpu)


# ----- every command, end to end -----------------------------------------------------------------

CASES = {
    "auto": ["--device", "auto"],
    "cuda-fp16-nchw": ["--device", "cuda", "--precision", "fp16", "--channels-last", "false"],
    "cuda-bf16-channels-last": ["--device", "cuda", "--precision", "bf16", "--channels-last", "true"],
    "pil-loader": ["--device", "cuda", "--loader", "pil", "--workers", "2"],
    "symmetric-splitbn": ["--device", "cuda", "--symmetric", "--shuffle-bn", "split",
                          "--moco-k", "64"],
    "memory-bank": ["--device", "cuda", "--mechanism", "memory-bank"],
}


@pytest.mark.parametrize("flags", list(CASES.values()), ids=list(CASES))
def test_pretrain_end_to_end(flags: list[str], tiny_data: Path, tmp_path: Path) -> None:
    stdout, rows = _pretrain(tiny_data, tmp_path / "run", *flags)
    assert f"device cuda:{torch.cuda.current_device()}" in stdout


def test_pretrain_decoding_in_workers(tiny_data: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The ImageNet-scale path: the decoded cache refused, workers decode, the GPU augments."""
    monkeypatch.setenv("MOCO_CACHE_MAX_GB", "0")
    _pretrain(tiny_data, tmp_path / "run", "--device", "cuda", "--loader", "tensor",
              "--workers", "2")


def test_pretrain_compiled(tiny_data: Path, tmp_path: Path) -> None:
    _pretrain(tiny_data, tmp_path / "run", "--device", "cuda", "--compile")


def test_resume_continues_within_a_tolerance(tiny_data: Path, tmp_path: Path) -> None:
    """GPU kernels (cudnn autotuning, bf16, atomics) are not bit-reproducible: a resumed run
    ends close to the uninterrupted one, at the same step."""
    _, full = _pretrain(tiny_data, tmp_path / "full", "--device", "cuda")
    rc, _, err = run_cli(["pretrain", str(tiny_data), *GPU_FLAGS, "--output", str(tmp_path / "cut"),
                          "--device", "cuda", "--stop-after-epochs", "1"])
    assert rc == 0, err
    rc, out, err = run_cli(["pretrain", str(tiny_data), "--output", str(tmp_path / "cut"),
                            "--resume", "auto", "--no-progress"])
    assert rc == 0 and "resumed from" in out, err
    cut = _metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [r["step"] for r in full]
    assert cut[0]["loss"] == pytest.approx(full[0]["loss"], rel=0.02)
    assert cut[1]["loss"] == pytest.approx(full[1]["loss"], rel=0.05)


def test_the_other_commands_on_the_gpu(tiny_data: Path, tmp_path: Path) -> None:
    _pretrain(tiny_data, tmp_path / "run", "--device", "cuda")
    ckpt = sorted((tmp_path / "run").glob("checkpoint_*.pth.tar"))[-1]
    rc, out, err = run_cli(["knn", str(tiny_data), "--pretrained", str(ckpt), "--device", "cuda",
                            "-j", "0", "--k", "5", "--no-progress"])
    assert rc == 0 and "%" in out, err
    rc, out, err = run_cli(["lincls", str(tiny_data), "--pretrained", str(ckpt), "--fast",
                            "--epochs", "2", "-b", "8", "-j", "0", "--device", "cuda",
                            "--output", str(tmp_path / "lin"), "--no-progress"])
    assert rc == 0, err
    rc, _, err = run_cli(["export", str(ckpt), "--format", "safetensors",
                          "--out", str(tmp_path / "enc.safetensors")])
    assert rc == 0 and (tmp_path / "enc.safetensors").is_file(), err
    rc, _, err = run_cli(["embed", str(tiny_data / "test"), "--pretrained", str(ckpt), "--out",
                          str(tmp_path / "emb.npy"), "--device", "cuda", "-j", "0", "--no-progress"])
    assert rc == 0 and np.load(tmp_path / "emb.npy").shape[0] == 32, err


def _run_group(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run ``cmd`` in a session of its own; its whole process group (torchrun and its workers)
    is killed if it outlives ``timeout`` or the test is interrupted (a per-test time limit)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_torchrun_nccl_with_ddp_shuffling(tiny_data: Path, tmp_path: Path) -> None:
    """The multi-process path on the GPUs there are: NCCL, DistributedDataParallel (torch
    2.11's keywords too), ``--shuffle-bn ddp``, the kNN monitor split over the ranks. On a
    one-GPU machine this is a process group of ONE: NCCL refuses two ranks on one GPU, so the
    gathers and broadcasts of ``--shuffle-bn ddp`` are the identity here; their exchanges
    between ranks are tested with two gloo processes on the CPU
    (tests/engine/test_distributed.py), and with several GPUs here."""
    n = torch.cuda.device_count()
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(n), "-m", "moco", "pretrain", str(tiny_data), *GPU_FLAGS, "-b", str(8 * n),
           "--moco-k", str(32 * n), "--device", "cuda", "--shuffle-bn", "ddp", "--output", str(out)]
    rc, text = _run_group(cmd, env, timeout=240)
    assert rc == 0, text[-4000:]
    assert "shuffle-BN ddp" in text
    rows = _metrics(out)
    assert len(rows) == 2 and rows[-1]["knn_top1"] is not None
