"""Multi-process MoCo on the CPU: 2 gloo processes, tiny models, a few steps.

Workers are spawned with ``torch.multiprocessing`` (fresh interpreters) and join the group the
way torchrun starts them: through ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` and
:func:`moco.utils.distributed.init_distributed`. Each worker saves what it saw to ``rank{r}.pt``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers import _free_port, spawn
from torch import nn

from moco.core.collectives import concat_all_gather
from moco.core.shuffle_bn import DDPShuffle, GatherKeys, LocalShuffle, NoShuffle, make_key_shuffle
from moco.data.batches import Batch
from moco.engine.config import PER_RANK_SETTINGS, MocoConfig
from moco.engine.world import resolve_for_world, resolve_shuffle_bn
from moco.utils.checkpoint import load_checkpoint
from moco.utils.distributed import (
    DistContext,
    DistributedError,
    check_same_settings,
    init_distributed,
    is_communication_error,
    per_rank_batch,
    settings_hash,
    shutdown_distributed,
    wrap_ddp,
)

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2


class IdEncoder(nn.Module):
    """Output row i = the image's first pixel value repeated: a key that names its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, :1].repeat(1, 4)


def toy_encoder(dim: int = 8) -> nn.Module:
    """Conv + GroupNorm (per sample: no statistics shared across the batch) + linear head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, dim))


def toy_batches(steps: int, global_batch: int, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(global_batch, 3, size, size, generator=g),
             torch.randn(global_batch, 3, size, size, generator=g)) for _ in range(steps)]


def toy_moco() -> nn.Module:
    from moco.core.model import MoCo

    return MoCo(toy_encoder(), dim=8, k=32, m=0.9, t=0.2, generator=torch.Generator().manual_seed(1))


# ----- single process: no group, nothing changes ------------------------------------------
def test_single_process_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed(torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.enabled, ctx.is_main) == (0, 1, False, True)
    assert ctx.broadcast_object("x") == "x" and ctx.all_gather_object(3) == [3]
    assert ctx.agree_signal(None) is None and ctx.agree_signal(15) == 15
    assert ctx.on_main(lambda: 7) == 7
    assert ctx.local_device(torch.device("cpu")) == torch.device("cpu")
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")  # outside torchrun (no TORCHELASTIC_RUN_ID)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert not init_distributed(torch.device("cpu")).enabled
    model = nn.Linear(2, 2)
    assert wrap_ddp(model, ctx, torch.device("cpu")) is model
    x = torch.randn(4, 3)
    assert concat_all_gather(x) is x


def test_shuffle_bn_modes_resolve_per_process_count() -> None:
    assert resolve_shuffle_bn("auto", 1) == "split"
    assert resolve_shuffle_bn("auto", 8) == "ddp"
    for mode in ("split", "none", "ddp", "syncbn"):
        assert resolve_shuffle_bn(mode, 4) == mode
    for mode in ("ddp", "syncbn"):
        with pytest.raises(DistributedError, match="needs several processes"):
            resolve_shuffle_bn(mode, 1)
    g = torch.Generator()
    one, two = DistContext(), DistContext(rank=1, world_size=2)
    assert isinstance(make_key_shuffle("split", one, g), LocalShuffle)
    assert isinstance(make_key_shuffle("none", one, g), NoShuffle)
    assert isinstance(make_key_shuffle("ddp", two, g), DDPShuffle)
    assert isinstance(make_key_shuffle("none", two, g), GatherKeys)
    assert isinstance(make_key_shuffle("split", two, g).local, LocalShuffle)  # type: ignore[attr-defined]


def test_global_batch_must_split_evenly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("moco.engine.world.check_same_settings", lambda ctx, settings, per_rank: None)
    assert per_rank_batch(256, 8) == 32
    with pytest.raises(DistributedError, match="global batch and must be divisible by the 3"):
        per_rank_batch(256, 3)
    cfg = MocoConfig(batch_size=12, bn_splits=4, shuffle_bn="split")
    with pytest.raises(DistributedError, match="per-process batch 6"):
        resolve_for_world(cfg, DistContext(world_size=2), torch.device("cpu"))
    with pytest.raises(DistributedError, match="GPUs only"):
        resolve_for_world(MocoConfig(shuffle_bn="syncbn"), DistContext(world_size=2),
                          torch.device("cpu"))
    # One process: auto is split (its sub-batches checked too), the config keeps "auto".
    cfg = MocoConfig()
    assert resolve_for_world(cfg, DistContext(), torch.device("cpu")) == "split"
    assert cfg.shuffle_bn == "auto"
    with pytest.raises(DistributedError, match="--batch-size 12 is not divisible by --bn-splits 8"):
        resolve_for_world(MocoConfig(batch_size=12), DistContext(), torch.device("cpu"))


def test_lr_rule_uses_the_global_batch() -> None:
    assert MocoConfig(lr=0.03, batch_size=64).effective_lr == 0.03
    assert MocoConfig(lr=0.03, batch_size=64, lr_scale="linear").effective_lr == pytest.approx(0.0075)
    with pytest.raises(ValueError, match="--lr-scale"):
        MocoConfig(lr_scale="sqrt").validate()


def test_settings_hash_ignores_per_rank_settings() -> None:
    a = MocoConfig().to_dict()
    assert settings_hash(a, PER_RANK_SETTINGS) == settings_hash(
        {**a, "data": "/elsewhere", "workers": 3}, PER_RANK_SETTINGS)
    assert settings_hash(a, PER_RANK_SETTINGS) != settings_hash({**a, "lr": 0.1}, PER_RANK_SETTINGS)


def test_ddp_shuffle_on_one_process_is_a_local_shuffle() -> None:
    s = DDPShuffle(torch.Generator().manual_seed(0), rank=0, world_size=1)
    x = torch.arange(8.0)[:, None, None, None].expand(8, 3, 2, 2).contiguous()
    shuffled, handle = s.shuffle(x)
    assert not torch.equal(shuffled, x)
    k = IdEncoder()(shuffled)
    assert torch.equal(s.unshuffle(k, handle), IdEncoder()(x))


def test_torchrun_with_one_process_joins_a_group_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """`torchrun --nproc_per_node 1` runs the multi-process path on one process (how NCCL and
    --shuffle-bn ddp are tested on a machine with one GPU): a group of one is joined."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    ctx = init_distributed(torch.device("cpu"), timeout_minutes=1.0)
    try:
        assert dist.is_initialized() and ctx.enabled and ctx.grouped and ctx.world_size == 1
        assert resolve_shuffle_bn("auto", 1, grouped=True) == "split"
        assert resolve_shuffle_bn("ddp", 1, grouped=True) == "ddp"
        cfg = MocoConfig(shuffle_bn="ddp", batch_size=8)
        assert resolve_for_world(cfg, ctx, torch.device("cpu")) == "ddp"
        assert isinstance(make_key_shuffle("ddp", ctx, torch.Generator()), DDPShuffle)
        assert ctx.agree_signal(15) == 15 and ctx.broadcast_object("x") == "x"
        assert isinstance(wrap_ddp(nn.Linear(2, 2), ctx, torch.device("cpu")), nn.parallel.DistributedDataParallel)
    finally:
        shutdown_distributed()
    assert not dist.is_initialized()


def test_ddp_without_forward_sync_buffers_falls_back_to_broadcast_buffers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.11 (the GPU machine's) has no `forward_sync_buffers`: `broadcast_buffers=False`
    is used, and the buffers are broadcast once by hand, as the newer keyword does."""
    made: list[dict[str, Any]] = []
    sent: list[torch.Tensor] = []

    class OldDDP:  # DistributedDataParallel.__init__ of torch 2.11, as far as keywords go
        def __init__(self, module: nn.Module, device_ids: Any = None, output_device: Any = None,
                     dim: int = 0, broadcast_buffers: bool = True) -> None:
            made.append({"broadcast_buffers": broadcast_buffers})

    monkeypatch.setattr("moco.utils.distributed.DistributedDataParallel", OldDDP)
    monkeypatch.setattr("moco.utils.distributed.dist.broadcast", lambda t, src: sent.append(t))
    model = nn.BatchNorm2d(3)
    wrap_ddp(model, DistContext(world_size=2), torch.device("cpu"))
    assert made == [{"broadcast_buffers": False}]
    assert [t.data_ptr() for t in sent] == [b.data_ptr() for b in model.buffers()]


def _shards_worker(ctx: DistContext, n: int) -> dict[str, Any]:
    from moco.core.collectives import gather_shards, shard

    rows = torch.tensor(shard(n, ctx.rank, ctx.world_size), dtype=torch.float32)
    feats = torch.stack([rows, -rows], dim=1)  # row i of the whole set is [i, -i]
    bn = nn.BatchNorm1d(2)
    with torch.no_grad():
        bn.running_mean.fill_(float(ctx.rank + 1))
    ctx.broadcast_buffers(bn)
    return {"all": gather_shards(feats, n), "mean": bn.running_mean.clone()}


def test_the_knn_monitor_splits_its_images_over_the_ranks(tmp_path: Path) -> None:
    """Each rank extracts features of every world-th image; gathered, they are in the original
    order on every rank (an uneven split included); rank 0's BN statistics are the ones used."""
    n = 7
    results = spawn(_shards_worker, tmp_path, n)
    expected = torch.stack([torch.arange(n, dtype=torch.float32), -torch.arange(n, dtype=torch.float32)], 1)
    for r in results:
        assert torch.equal(r["all"], expected)
        assert torch.equal(r["mean"], torch.ones(2))


# ----- two processes -----------------------------------------------------------------------
def _collectives_worker(ctx: DistContext, batch: int) -> dict[str, Any]:
    r = ctx.rank
    out: dict[str, Any] = {}
    # Shuffling BN: key images named by their global index, an encoder that returns the name.
    ids = torch.arange(r * batch, (r + 1) * batch, dtype=torch.float32)
    x = ids[:, None, None, None].expand(batch, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    s = DDPShuffle(torch.Generator().manual_seed(5))
    shuffled, handle = s.shuffle(x)
    enc = IdEncoder()
    k = s.unshuffle(enc(shuffled), handle)
    out["gather_keys"] = GatherKeys(NoShuffle()).gather(k)  # --shuffle-bn none under torchrun
    out.update(encoded_here=shuffled[:, 0, 0, 0].tolist(), k=k, own=enc(x), gathered=s.gather(k),
               handle=handle, rng=s.generator.get_state(),
               channels_last=shuffled.is_contiguous(memory_format=torch.channels_last))
    # A stop signal seen by one rank only.
    out["signal"] = ctx.agree_signal(15 if r == 1 else None)
    # Different flags on the two ranks (workers may differ).
    cfg = MocoConfig(lr=0.03 if r == 0 else 0.06, workers=r)
    try:
        check_same_settings(ctx, cfg.to_dict(), PER_RANK_SETTINGS)
        out["mismatch"] = "no error"
    except DistributedError as e:
        out["mismatch"] = str(e)

    # An error in rank 0's file-system work reaches every rank.
    def fails() -> None:
        raise OSError("disk full")

    try:
        ctx.on_main(fails)
        out["on_main"] = "no error"
    except OSError as e:
        out["on_main"] = str(e)
    return out


def test_two_process_collectives(tmp_path: Path) -> None:
    """shuffle -> encode -> unshuffle returns each rank its own keys; one permutation from
    rank 0; stop signals, mismatched flags and rank-0 errors reach every rank."""
    b = 8
    res = spawn(_collectives_worker, tmp_path, b)
    encoded = [set(map(int, r["encoded_here"])) for r in res]
    assert encoded[0] | encoded[1] == set(range(WORLD * b)) and not encoded[0] & encoded[1]
    assert encoded[0] != set(range(b)), "rank 0 should encode a random slice of the global batch"
    for r in res:
        assert torch.equal(r["k"], r["own"])  # own keys, in the original order
        assert torch.equal(r["gathered"][:, 0], torch.arange(WORLD * b, dtype=torch.float32))
        assert torch.equal(r["gather_keys"], r["gathered"])
        assert r["channels_last"]
        assert r["signal"] == 15
        assert "different settings" in r["mismatch"]
        assert "lr: rank 0 has 0.03, rank 1 has 0.06" in r["mismatch"]
        assert "workers" not in r["mismatch"]
        assert r["on_main"] == "disk full"
    assert torch.equal(res[0]["handle"], res[1]["handle"])
    assert torch.equal(res[0]["rng"], res[1]["rng"])


def _train_worker(ctx: DistContext, steps: int, global_batch: int) -> dict[str, Any]:
    from moco.engine.training_step import train_step

    model = toy_moco()
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    ddp = wrap_ddp(model, ctx, torch.device("cpu"))
    shuffle = make_key_shuffle("ddp", ctx, torch.Generator().manual_seed(2))
    local = per_rank_batch(global_batch, ctx.world_size)
    sl = slice(ctx.rank * local, (ctx.rank + 1) * local)
    grads = None
    for i, (q, k) in enumerate(toy_batches(steps, global_batch)):
        train_step(ddp, opt, Batch(q[sl], k[sl], torch.arange(local)), shuffle, None)
        if i == 0:
            grads = [p.grad.clone() for p in model.encoder_q.parameters()]  # type: ignore[union-attr]
    return {"grads": grads, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _single_process(steps: int, global_batch: int) -> dict[str, Any]:
    from moco.engine.training_step import train_step

    model = toy_moco()
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    grads = None
    for i, (q, k) in enumerate(toy_batches(steps, global_batch)):
        train_step(model, opt, Batch(q, k, torch.arange(global_batch)), NoShuffle(), None)
        if i == 0:
            grads = [p.grad.clone() for p in model.encoder_q.parameters()]  # type: ignore[union-attr]
    return {"grads": grads, "state": model.state_dict()}


def test_two_processes_match_one_process_with_twice_the_batch(tmp_path: Path) -> None:
    """DDP + shuffling BN with BN out of the picture (GroupNorm): 2 processes x B give the
    gradients and weights of 1 process x 2B, and the queues are identical on both ranks."""
    steps, batch = 6, 8  # K = 32: after 4 steps every queue entry is a key
    res = spawn(_train_worker, tmp_path, steps, batch)
    one = _single_process(steps, batch)
    for name, v in res[0]["state"].items():
        assert torch.equal(v, res[1]["state"][name]), name
    for g2, g1 in zip(res[0]["grads"], one["grads"], strict=True):
        torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-6)
    for name, v in one["state"].items():
        torch.testing.assert_close(res[0]["state"][name], v, rtol=1e-4, atol=1e-5, msg=name)
    assert int(res[0]["state"]["key_queue.queue_ptr"]) == (steps * batch) % 32


def _stuck_worker(ctx: DistContext) -> dict[str, Any]:
    if ctx.rank == 1:
        time.sleep(20)  # alive but never joins the collective
        return {}
    t0 = time.monotonic()
    try:
        concat_all_gather(torch.zeros(2))
    except RuntimeError as e:
        return {"comm_error": is_communication_error(e), "msg": str(e),
                "seconds": time.monotonic() - t0}
    return {"comm_error": None}


@pytest.mark.slow
def test_a_stuck_rank_fails_the_collective_after_the_timeout(tmp_path: Path) -> None:
    res = spawn(_stuck_worker, tmp_path, timeout_min=0.2)  # --dist-timeout 12 s
    assert res[0]["comm_error"], res[0]
    assert 10.0 < res[0]["seconds"] < 19.0, res[0]


# ----- the CLI under torchrun ----------------------------------------------------------------
def _moco(*args: str, torchrun: bool = False, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    bin_dir = Path(sys.executable).parent
    launcher = ([str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", str(WORLD)]
                if torchrun else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*launcher, "-m", "moco", "pretrain", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
def test_torchrun_checkpoint_resumes_on_one_process(tiny_data: Path, tmp_path: Path) -> None:
    from helpers import TINY_FLAGS

    out = tmp_path / "run"
    common = [str(tiny_data), *TINY_FLAGS, "--output", str(out), "--knn-every", "1"]
    r = _moco(*common, "--epochs", "1", torchrun=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "batch 8 = 2 processes x 4 (gloo)" in r.stdout and "shuffle-BN ddp" in r.stdout
    assert r.stdout.count("MoCo pretraining:") == 1  # rank 0 logs, rank 1 does not
    ckpt = load_checkpoint(out / "checkpoint_0000.pth.tar")
    assert ckpt["epoch"] == 1 and ckpt["moco"]["global_step"] == 4  # 32 images / global batch 8
    assert not any(k.startswith("module.module.") for k in ckpt["state_dict"])
    assert (out / "metrics.jsonl").read_text().count("\n") == 1
    r = _moco(*common, "--epochs", "2", "--resume", "auto")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout and "shuffle-BN split" in r.stdout
    assert load_checkpoint(out / "checkpoint_0001.pth.tar")["moco"]["global_step"] == 8
    assert (out / "metrics.jsonl").read_text().count("\n") == 2


@pytest.mark.slow
def test_torchrun_rejects_a_batch_that_does_not_split(tiny_data: Path, tmp_path: Path) -> None:
    from helpers import TINY_FLAGS

    r = _moco(str(tiny_data), *TINY_FLAGS, "-b", "7", "--moco-k", "28", "--bn-splits", "1",
              "--output", str(tmp_path / "run"), torchrun=True)
    assert r.returncode != 0
    assert "--batch-size 7 is the global batch and must be divisible by the 2 processes" in r.stderr


@pytest.mark.slow
def test_sigterm_under_torchrun_saves_on_rank_0_and_stops_every_rank(
        tiny_data: Path, tmp_path: Path) -> None:
    from helpers import TINY_FLAGS

    out = tmp_path / "run"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", str(WORLD), "-m", "moco",
           "pretrain", str(tiny_data), *TINY_FLAGS, "--epochs", "50", "--knn-every", "0",
           "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (out / "metrics.jsonl").is_file(), "the run did not finish an epoch"
        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to every worker
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped by signal 15" in output, output
    ckpts = sorted(out.glob("checkpoint_*.pth.tar"))
    newest = load_checkpoint(max(ckpts, key=lambda p: p.stat().st_mtime))
    assert newest["moco"]["global_step"] >= 4
