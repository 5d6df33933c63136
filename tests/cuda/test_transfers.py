"""What a GPU would wait for, or copy again, checked on the CPU (and, tier ``cuda``, on the
GPU itself): the dataset indices sent with the views, linear classification's steps reading
nothing back and running channels_last, the kNN bank copied to the device once per chunk,
the sharded features gathered without a third copy.

A read of a tensor's value into Python (``float()``, ``int()``, ``.item()``) is the operation
``aten._local_scalar_dense``; on a GPU it makes the host wait for the GPU. A dispatch mode
sees every such read on any device, so the CPU checks what a GPU would wait for.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moco.data.batches import Batch

READ = torch.ops.aten._local_scalar_dense.default
needs_cuda = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the cuda tier)")]


class Ops(TorchDispatchMode):
    """Counts value reads, records each op's name and the bytes of the new storages made."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.ops: list[tuple[str, tuple[int, ...]]] = []
        self.new_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is READ:
            self.reads += 1
        out = func(*args, **(kwargs or {}))
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self.ops.append((str(func), tuple(first.shape) if first is not None else ()))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs \
                    and "view" not in str(func) and "slice" not in str(func):
                self.new_bytes += t.untyped_storage().nbytes()
        return out


# ----- the dataset indices travel with the views ------------------------------------------------

class _Probe(nn.Module):
    """A "model" that records the index it is given and returns a loss and logits."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.seen: list[torch.Tensor] = []

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, shuffle: Any, index: torch.Tensor) -> Any:
        from moco.core.model import StepOutput

        self.seen.append(index)
        loss = (im_q.mean() + im_k.mean()) * self.w
        return StepOutput(loss, torch.zeros(im_q.shape[0], 3, device=im_q.device))


def test_the_step_sends_the_indices_with_the_views(monkeypatch: pytest.MonkeyPatch) -> None:
    """train_step hands the model the indices on the views' device, sent by ``to_device`` (a
    non-blocking copy from pinned memory), not the loader's CPU tensor (which a
    DistributedDataParallel model would copy with a blocking ``.to``)."""
    import moco.engine.training_step as ts

    sent: list[tuple[torch.Tensor, torch.device]] = []
    marker = torch.tensor([7, 8])

    def spy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        sent.append((t, device))
        return marker

    monkeypatch.setattr(ts, "to_device", spy)
    model = _Probe()
    batch = Batch(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), torch.tensor([3, 5]))
    ts.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), batch, None, None)  # type: ignore[arg-type]
    assert len(sent) == 1 and sent[0][0] is batch.index and sent[0][1] == batch.im_q.device
    assert model.seen[0] is marker


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the cuda tier)")
def test_the_indices_reach_the_gpu_without_a_wait() -> None:
    from moco.engine.training_step import train_step

    cuda = torch.device("cuda", torch.cuda.current_device())
    model = _Probe().to(cuda)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = Batch(torch.rand(4, 3, 8, 8, device=cuda), torch.rand(4, 3, 8, 8, device=cuda),
                  torch.arange(4))
    train_step(model, opt, batch, None, None)  # type: ignore[arg-type]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step(model, opt, batch, None, None)  # type: ignore[arg-type]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert model.seen[-1].device == cuda and torch.equal(model.seen[-1].cpu(), torch.arange(4))


# ----- linear classification ------------------------------------------------------------------

class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return self.fc(F.adaptive_avg_pool2d(self.conv(x), 1).flatten(1))


def _engine(channels_last: bool | None = None) -> Any:
    from moco.eval.lincls_engine import LinearEngine
    from moco.utils.distributed import DistContext

    torch.manual_seed(0)
    model = _Tiny()
    for p in model.conv.parameters():
        p.requires_grad = False
    opt = torch.optim.SGD(model.fc.parameters(), lr=0.1)
    return LinearEngine(model, opt, DistContext(), torch.device("cpu"), None, 8, 16,
                        (0.5,) * 3, (0.25,) * 3, 4, 0, 0, False, None,  # type: ignore[arg-type]
                        range(50), channels_last=channels_last)  # a "val split" of 50 images


def test_a_linear_step_reads_nothing_back() -> None:
    """The step's loss and correct count stay on the device (no ``float(ce)`` or ``int`` per
    step, each a wait for the GPU); validation counts its hits there and reads them once."""
    from moco.eval import lincls_protocol as protocol

    engine = _engine()
    g = torch.Generator().manual_seed(1)
    feats, y = torch.randn(6, 8, generator=g), torch.tensor([0, 1, 2, 3, 0, 1])
    with Ops() as ops:
        ce, correct = engine.step(feats, y, 6)
    assert ops.reads == 0
    assert isinstance(ce, torch.Tensor) and isinstance(correct, torch.Tensor)
    x_all, y_all = torch.randn(50, 8, generator=g), torch.randint(0, 4, (50,), generator=g)
    with Ops() as ops:
        top1, top5 = engine.validate((x_all, y_all))
    assert ops.reads <= 2
    with torch.no_grad():
        c1, c5 = protocol.accuracy(engine.fc(x_all), y_all)
    assert (top1, top5) == pytest.approx((100.0 * c1 / 50, 100.0 * c5 / 50))


def test_the_frozen_backbone_runs_channels_last_when_asked() -> None:
    """channels_last (the default on CUDA): the backbone's weights and its input in that
    layout, the features those of the NCHW run."""
    nchw, cl = _engine(), _engine(channels_last=True)
    assert not nchw.channels_last  # the default on the CPU
    assert cl.model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(3, 3, 10, 10)
    a, b = nchw.backbone(x), cl.backbone(x)
    assert cl.model.inputs[-1].is_contiguous(memory_format=torch.channels_last)
    assert not nchw.model.inputs[-1].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----- moco knn: the bank copied once per chunk --------------------------------------------------

def test_each_bank_chunk_is_copied_to_the_queries_once() -> None:
    """A bank kept elsewhere (here: float64, the queries float32, so every chunk is converted)
    is copied chunk by chunk once in all, not once per query chunk; the accuracies are those
    of the whole-bank computation."""
    from moco.eval.knn import knn_accuracy

    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(40, 6, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 3, (40,), generator=g)
    query = F.normalize(torch.randn(25, 6, generator=g), dim=1)
    q_labels = torch.randint(0, 3, (25,), generator=g)
    with Ops() as ops:
        chunked = knn_accuracy(query, q_labels, bank, labels, k=7, t=0.1, query_chunk=4,
                               bank_chunk=16)
    copies = [shape for name, shape in ops.ops if "_to_copy" in name and shape[1:] == (6,)]
    assert copies == [(16, 6), (16, 6), (8, 6)]  # 3 chunks, each once (7 query chunks)
    whole = knn_accuracy(query, q_labels, bank.float(), labels, k=7, t=0.1)
    assert chunked == pytest.approx(whole)


# ----- the kNN monitor's sharded features --------------------------------------------------------

def test_gathered_shards_are_in_order_with_two_copies_at_most(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three ranks (faked: this process is rank 1, the collective fills in the others' rows),
    301 rows split r, r+3, ...: gathered in the original order, allocating about two copies
    of the result in all (the rank-major buffer and the reordered result, not the parts, their
    concatenation and the result)."""
    import torch.distributed as dist

    from moco.core.collectives import gather_shards, shard

    n, world, rank = 301, 3, 1
    full = torch.arange(n * 4, dtype=torch.float32).view(n, 4)
    width = -(-n // world)
    every = torch.zeros(world * width, 4)
    for r in range(world):
        rows = full[shard(n, r, world)]
        every[r * width:r * width + len(rows)] = rows
    sent: list[torch.Tensor] = []

    def fake_gather(out: torch.Tensor, inp: torch.Tensor) -> None:
        out.copy_(every)
        sent.append(inp)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_gather_into_tensor", fake_gather)
    mine = full[shard(n, rank, world)].clone()
    with Ops() as ops:
        got = gather_shards(mine, n)
    assert torch.equal(got, full)
    assert torch.equal(sent[0][:len(mine)], mine)
    assert ops.new_bytes <= 2.5 * full.nbytes, ops.new_bytes / full.nbytes
