"""The tensor pipeline (moco.data.tensor_loader): determinism by (seed, epoch, step), resume,
process-count independence, shapes, dispatch and the cached eval path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from moco.data.batches import step_generator
from moco.data.cache import DecodedImages
from moco.data.crop_loader import CropTrainLoader
from moco.data.datasets import EpochBatchSampler
from moco.data.input_settings import InputSettings
from moco.data.loaders import eval_batches, make_tensor_loader, make_train_loader
from moco.data.pil_loader import PILTrainLoader
from moco.data.source import ImageSource
from moco.data.splits import find_dataset
from moco.data.tensor_loader import DecodeTrainLoader, TensorTrainLoader, decoded_or_none
from moco.engine.config import MocoConfig
from moco.engine.config_sources import build_config

CPU = torch.device("cpu")


def _cfg(**kw: object) -> InputSettings:
    base = dict(arch="resnet18", image_size=24, batch_size=4, aug="v2", seed=3, moco_k=32,
                bn_splits=2, channels_last=False)
    base.update(kw)
    return build_config(overrides=base).input_settings()


def _images(n: int = 20, h: int = 32, w: int = 32) -> DecodedImages:
    rng = np.random.default_rng(0)
    return DecodedImages(rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8), [i % 2 for i in range(n)])


def _all(loader: TensorTrainLoader | DecodeTrainLoader, epoch: int, start: int = 0) -> list:
    return [(b.im_q, b.im_k, b.index) for b in loader.batches(epoch, start)]


def test_shapes_order_and_determinism() -> None:
    cfg = _cfg(channels_last=True)
    a = TensorTrainLoader(cfg, _images(), CPU)
    assert a.steps() == 5
    batches = list(a.batches(0))
    assert len(batches) == 5
    b0 = batches[0]
    assert b0.im_q.shape == b0.im_k.shape == (4, 3, 24, 24) and b0.im_q.dtype == torch.float32
    assert b0.im_q.is_contiguous(memory_format=torch.channels_last)
    # the same sample order as the PIL path
    pil_order = [[i for i, _ in items] for items in EpochBatchSampler(20, 4, cfg.seed, 0)]
    assert [b.index.tolist() for b in batches] == pil_order
    again = _all(TensorTrainLoader(cfg, _images(), CPU), 0)
    for (q, k, i), b in zip(again, batches, strict=True):
        assert torch.equal(q, b.im_q) and torch.equal(k, b.im_k) and torch.equal(i, b.index)
    other = _all(a, 1)
    assert not torch.equal(other[0][0], batches[0].im_q)  # another epoch, other views
    assert not torch.equal(batches[0].im_q, batches[0].im_k)


def test_resume_mid_epoch_gives_the_same_batches() -> None:
    cfg = _cfg()
    full = _all(TensorTrainLoader(cfg, _images(), CPU), 2)
    tail = _all(TensorTrainLoader(cfg, _images(), CPU), 2, start=3)
    assert len(tail) == 2
    for (q, k, i), (q2, k2, i2) in zip(full[3:], tail, strict=True):
        assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(i, i2)


def test_prefetch_does_not_change_batches() -> None:
    cfg = _cfg()
    on = _all(TensorTrainLoader(cfg, _images(), CPU, prefetch=True), 0)
    off = _all(TensorTrainLoader(cfg, _images(), CPU, prefetch=False), 0)
    for x, y in zip(on, off, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(x, y, strict=True))
    it = TensorTrainLoader(cfg, _images(), CPU, prefetch=True).batches(0)
    next(it)
    it.close()  # abandoning an epoch midway leaves no thread behind


def test_step_generator_depends_on_seed_epoch_step() -> None:
    draws = {(s, e, t): torch.rand(3, generator=step_generator(s, e, t)).tolist()
             for s in (0, 1) for e in (0, 1) for t in (0, 1)}
    assert len({tuple(v) for v in draws.values()}) == 8
    assert torch.rand(3, generator=step_generator(1, 0, 1)).tolist() == draws[(1, 0, 1)]


def test_process_count_does_not_change_views() -> None:
    """Two ranks with batch B see exactly the halves of one process's batch 2B."""
    one = _all(TensorTrainLoader(_cfg(batch_size=8), _images(), CPU), 0)
    ranks = [_all(TensorTrainLoader(_cfg(batch_size=4), _images(), CPU, rank=r, world_size=2), 0)
             for r in (0, 1)]
    for step, (q, k, i) in enumerate(one):
        assert torch.allclose(torch.cat([ranks[0][step][0], ranks[1][step][0]]), q, atol=1e-6)
        assert torch.allclose(torch.cat([ranks[0][step][1], ranks[1][step][1]]), k, atol=1e-6)
        assert torch.equal(torch.cat([ranks[0][step][2], ranks[1][step][2]]), i)


def test_mixed_size_array_uses_each_images_size() -> None:
    imgs = _images(8, 40, 40)
    sizes = np.array([[40, 30], [20, 40]] * 4, dtype=np.int32)
    for k, (h, w) in enumerate(sizes):
        imgs.images[k, h:] = 0
        imgs.images[k, :, w:] = 0
    imgs.sizes = sizes
    loader = TensorTrainLoader(_cfg(), imgs, CPU)
    b = next(iter(loader.batches(0)))
    assert b.im_q.shape == (4, 3, 24, 24) and torch.isfinite(b.im_q).all()


def test_decode_loader_matches_the_cached_loader(tiny_data: Path) -> None:
    """Worker decoding (datasets too large to cache) feeds the same views for the same pixels."""
    src = find_dataset(tiny_data).train
    cfg = _cfg(image_size=32)
    cached = TensorTrainLoader(cfg, decoded_or_none(cfg, src, 0), CPU)  # type: ignore[arg-type]
    decoded = DecodeTrainLoader(cfg, src, CPU, workers=0)
    assert decoded.steps() == cached.steps() == 8
    a, b = _all(cached, 1, start=5), _all(decoded, 1, start=5)
    assert len(a) == len(b) == 3
    for (q, k, i), (q2, k2, i2) in zip(a, b, strict=True):
        assert torch.equal(i, i2)
        assert torch.allclose(q, q2, atol=1e-4) and torch.allclose(k, k2, atol=1e-4)


def test_dispatch(tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = find_dataset(tiny_data).train
    cached = {"crops": "short-side"}  # 32 px images, 24 px crops: auto takes original-size crops
    assert isinstance(make_train_loader(_cfg(loader="pil"), src, CPU, 0), PILTrainLoader)
    assert isinstance(make_train_loader(_cfg(loader="auto", **cached), src, CPU, 0), TensorTrainLoader)
    assert isinstance(make_train_loader(_cfg(loader="tensor", **cached), src, CPU, 0), TensorTrainLoader)
    assert isinstance(make_train_loader(_cfg(loader="auto"), src, CPU, 0), CropTrainLoader)
    assert isinstance(make_train_loader(_cfg(loader="auto", image_size=32), src, CPU, 0),
                      TensorTrainLoader)  # the cache keeps 32 px images whole for 32 px crops
    monkeypatch.setenv("MOCO_CACHE_MAX_GB", "0")
    fresh = find_dataset(tiny_data).train  # decoded_or_none remembers per source object
    assert isinstance(make_tensor_loader(_cfg(**cached), fresh, CPU, 0), DecodeTrainLoader)
    assert MocoConfig().loader == "auto"
    with pytest.raises(ValueError, match="--loader"):
        dataclasses.replace(MocoConfig(), loader="fast").validate()


def test_cached_eval_matches_pil_eval(tiny_data: Path) -> None:
    test = find_dataset(tiny_data).test
    assert test is not None
    ours = list(eval_batches(_cfg(image_size=28), test, CPU, 0, batch_size=10))
    pil = list(eval_batches(_cfg(image_size=28, loader="pil"), test, CPU, 0, batch_size=10))
    assert [len(y) for _, y in ours] == [10, 10, 10, 2]
    for (x, y), (x2, y2) in zip(ours, pil, strict=True):
        assert torch.equal(y, y2)
        assert (x - x2).abs().max() <= 1.01 / 255 / min(MocoConfig().std)


def test_in_memory_array_source() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    src = ImageSource(array=arr, labels=[0] * 12)
    loader = make_train_loader(_cfg(), src, CPU, 0)
    assert isinstance(loader, TensorTrainLoader) and loader.steps() == 3


def test_pretrain_flags() -> None:
    import argparse

    from moco.cli.pretrain import add_parser, config_from_args

    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["pretrain", "d", "--loader", "pil", "--cache-dir", "/c", "--compile"])
    cfg = config_from_args(args)
    assert (cfg.loader, cfg.cache_dir, cfg.compile) == ("pil", "/c", True)
    cfg = config_from_args(ap.parse_args(["pretrain", "d"]))
    assert (cfg.loader, cfg.cache_dir, cfg.compile) == ("auto", "", False)


def test_decode_loader_in_worker_processes(tiny_data: Path) -> None:
    src = find_dataset(tiny_data).train
    cfg = _cfg(image_size=32)
    here = _all(DecodeTrainLoader(cfg, src, CPU, workers=0), 0, start=6)
    workers = _all(DecodeTrainLoader(cfg, src, CPU, workers=1), 0, start=6)
    for x, y in zip(here, workers, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(x, y, strict=True))


def test_mixed_size_folder_end_to_end(tmp_path: Path) -> None:
    """Photos of different sizes: cached at short side 37 (for 32-px crops), trained on and
    evaluated close to the PIL path (two resizes instead of one)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        d = tmp_path / "data" / "train" / f"c{c}"
        d.mkdir(parents=True)
        for k, (h, w) in enumerate([(40, 60), (90, 50), (30, 30), (64, 48)]):
            base = np.linspace(0, 200, w)[None, :, None] + rng.integers(0, 40, (h, w, 3))
            Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(d / f"{k}.png")
    src = find_dataset(tmp_path / "data").train
    cfg = _cfg(image_size=32, batch_size=4, crops="short-side")
    loader = make_train_loader(cfg, src, CPU, 0)
    assert isinstance(loader, TensorTrainLoader) and loader.sizes is not None
    b = next(iter(loader.batches(0)))
    assert b.im_q.shape == (4, 3, 32, 32) and torch.isfinite(b.im_q).all()
    ours = torch.cat([x for x, _ in eval_batches(cfg, src, CPU, 0)])
    pil = torch.cat([x for x, _ in eval_batches(dataclasses.replace(cfg, loader="pil"), src, CPU, 0)])
    std = min(MocoConfig().std)
    assert (ours - pil).abs().mean() < 2 / 255 / std


def test_sigterm_to_the_process_group_during_worker_decoding_saves_and_exits_0(
        tiny_data: Path, tmp_path: Path) -> None:
    """`moco pretrain` decoding in DataLoader workers (the decoded cache forbidden by
    MOCO_CACHE_MAX_GB=0, as at ImageNet scale) gets a real SIGTERM sent to its whole process
    group, as SLURM --signal and Ctrl-C send it. The workers ignore it, the main process
    finishes the step, saves and exits 0 (not 'DataLoader worker ... killed by signal' with no
    checkpoint)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import TINY_FLAGS

    from moco.utils.checkpoint import load_checkpoint

    out = tmp_path / "run"
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo), "MOCO_CACHE_MAX_GB": "0"}
    cmd = [sys.executable, "-m", "moco", "pretrain", str(tiny_data), *TINY_FLAGS, "--output",
           str(out), "--epochs", "100", "--knn-every", "0", "--loader", "tensor", "--workers", "2",
           "--save-every-steps", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("checkpoint_*.pth.tar")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGTERM)  # main process and its decoding workers
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "decoding in workers" in stderr, stderr
    assert proc.returncode == 0, stderr
    assert "stopped by signal 15" in stdout and "killed by signal" not in stderr
    saved = sorted(out.glob("checkpoint_*.pth.tar"), key=lambda p: p.stat().st_mtime)
    assert load_checkpoint(saved[-1])["moco"]["global_step"] >= 1
