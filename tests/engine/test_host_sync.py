"""No host-device synchronisation inside a training step.

A read of a device tensor into Python (``float()``, ``int()``, ``.item()``, ``bool()``) is the
operation ``aten._local_scalar_dense``; on a GPU it makes the host wait until the GPU is done.
A dispatch mode sees every such read on any device, so the CPU checks what a GPU would wait
for. The meta device (shapes, no data) refuses every read and counts the copies to a device.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moco.core.mechanisms import EndToEnd, MemoryBank
from moco.core.model import MoCo, build_encoder
from moco.core.queue import KeyQueue
from moco.core.shuffle_bn import LocalShuffle
from moco.data.batch_augment import BatchAugment
from moco.data.batches import Batch
from moco.engine.config import CIFAR_MEAN, CIFAR_STD
from moco.engine.training_step import EpochMeter, StepResult, train_step

READ = torch.ops.aten._local_scalar_dense.default


class Reads(TorchDispatchMode):
    """Counts reads of tensor values into Python, and copies from the CPU to another device."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is READ:
            self.reads += 1
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" \
                and out.device.type != "cpu":
            self.copies += 1
        return out


def _mechanism(kind: str) -> nn.Module:
    torch.manual_seed(0)
    enc = build_encoder("resnet18", 16, mlp=True, cifar_stem=True, bn_splits=2)
    if kind == "moco":
        return MoCo(enc, dim=16, k=32, m=0.9, t=0.2, generator=torch.Generator().manual_seed(1))
    if kind == "end-to-end":
        return EndToEnd(enc, t=0.2)
    return MemoryBank(enc, num_samples=20, dim=16, k=8, t=0.2,
                      generator=torch.Generator().manual_seed(1), seed=3)


@pytest.mark.parametrize("kind", ["moco", "end-to-end", "memory-bank"])
def test_a_training_step_reads_nothing_back(kind: str) -> None:
    """Forward (queue pointer, key shuffle, SplitBN), loss, backward, SGD and the step's
    metrics: no value is read back. (Before: the loss and accuracy as floats, the queue
    pointer as an int mid-forward.)"""
    torch.set_num_threads(1)
    model = _mechanism(kind).train()
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g),
                  torch.arange(4))
    train_step(model, opt, batch, LocalShuffle(torch.Generator().manual_seed(2)), None)  # warm up
    with Reads() as mode:
        r = train_step(model, opt, batch, LocalShuffle(torch.Generator().manual_seed(2)), None)
    assert mode.reads == 0
    assert isinstance(r.loss, torch.Tensor) and r.loss.dim() == 0 and not r.loss.requires_grad
    assert isinstance(r.acc1, torch.Tensor) and 0 <= float(r.acc1) <= 100


def test_the_queue_advances_without_reading_its_pointer() -> None:
    """On the meta device every read raises: the pointer arithmetic stays on the device."""
    q = KeyQueue(4, 6, generator=torch.Generator().manual_seed(0)).to("meta")
    q.enqueue(torch.randn(4, 4, device="meta"))
    cpu = KeyQueue(4, 6, generator=torch.Generator().manual_seed(0))
    keys = torch.nn.functional.normalize(torch.randn(10, 4), dim=1)
    cpu.enqueue(keys[:4])
    cpu.enqueue(keys[4:9])  # wraps around: columns 4, 5, 0, 1, 2
    assert int(cpu.queue_ptr) == 3
    assert torch.equal(cpu.queue[:, [4, 5, 0, 1, 2]], keys[4:9].T)
    assert torch.equal(cpu.queue[:, 3], keys[3])


def test_the_augmentation_sends_its_parameters_in_one_copy() -> None:
    """Both views of a batch, every op of the v2 recipe (crops, flips, jitter in random
    orders on subsets, grayscale, blur, normalisation): one copy of parameters to the device,
    and no read of a device value. (Before: ~20 small blocking copies.)"""
    aug = BatchAugment("v2", 16, 0.2, CIFAR_MEAN, CIFAR_STD)
    g = torch.Generator().manual_seed(0)
    n = 12
    p = aug.params(torch.full((n,), 24), torch.full((n,), 20), g)
    assert 0 < int(p.blur.sum()) < 2 * n and 0 < int(p.jitter.sum()) < 2 * n  # subsets
    images = torch.empty((n, 24, 20, 3), dtype=torch.uint8, device="meta")
    with Reads() as mode:
        q, k = aug.two_views(images, p)
    assert mode.copies == 1
    assert q.shape == k.shape == (n, 3, 16, 16) and q.device.type == "meta"
    cpu_images = torch.randint(0, 256, (n, 24, 20, 3), dtype=torch.uint8, generator=g)
    with Reads() as mode:
        aug.two_views(cpu_images, p)
    assert mode.copies == 0  # the CPU path does not pack


def test_epoch_meter_sums_like_python_floats_and_names_the_first_bad_step() -> None:
    g = torch.Generator().manual_seed(0)
    losses = (torch.rand(7, generator=g) * 10).tolist()
    accs = (torch.rand(7, generator=g) * 100).tolist()
    meter = EpochMeter(torch.device("cpu"), loss_sum=1.25, acc_sum=3.5)
    with Reads() as mode:
        for i, (lo, ac) in enumerate(zip(losses, accs, strict=True)):
            meter.add(StepResult(torch.tensor(lo, dtype=torch.float32), torch.tensor(ac)), 10 + i)
    assert mode.reads == 0
    loss_sum, acc_sum = 1.25, 3.5
    for lo, ac in zip(losses, accs, strict=True):
        loss_sum += float(torch.tensor(lo, dtype=torch.float32))
        acc_sum += float(torch.tensor(ac))
    assert meter.sums() == (loss_sum, acc_sum)  # bit for bit: resumed runs log the same means
    assert meter.divergence() is None
    meter.add(StepResult(float("inf"), 0.0), 17)
    meter.add(StepResult(float("nan"), 0.0), 18)
    bad = meter.divergence()
    assert bad is not None and bad.global_step == 17 and math.isinf(bad.loss)


def test_step_results_may_be_python_floats() -> None:
    """Callers (and tests) may hand the meter Python floats instead of device tensors."""
    meter = EpochMeter(torch.device("cpu"))
    meter.add(StepResult(2.0, 50.0), 1)
    assert meter.sums() == (2.0, 50.0)

