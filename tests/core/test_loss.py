"""InfoNCE logits and loss against naive reference computations (REFERENCE.md §1.2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moco.core.loss import info_nce, moco_logits, top1_accuracy


def _naive_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> float:
    """L = mean over rows of -log(exp(q·k+/t) / (exp(q·k+/t) + Σ_i exp(q·k_i/t))), in float64."""
    q, k, queue = q.double(), k.double(), queue.double()
    total = 0.0
    for n in range(q.shape[0]):
        pos = math.exp(float(q[n] @ k[n]) / t)
        neg = sum(math.exp(float(q[n] @ queue[:, i]) / t) for i in range(queue.shape[1]))
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


def _unit(*shape: int, dim: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=dim)


@pytest.mark.parametrize("t", [0.07, 0.2, 1.0])
def test_info_nce_matches_naive_loop(t: float) -> None:
    torch.manual_seed(0)
    n, c, k = 5, 8, 13
    q, key, queue = _unit(n, c, dim=1), _unit(n, c, dim=1), _unit(c, k, dim=0)
    loss = info_nce(moco_logits(q, key, queue, t))
    assert loss.shape == ()
    assert float(loss) == pytest.approx(_naive_loss(q, key, queue, t), rel=1e-5)


def test_logits_shape_and_columns() -> None:
    torch.manual_seed(1)
    n, c, k, t = 4, 6, 9, 0.1
    q, key, queue = _unit(n, c, dim=1), _unit(n, c, dim=1), _unit(c, k, dim=0)
    logits = moco_logits(q, key, queue, t)
    assert logits.shape == (n, 1 + k)
    for i in range(n):
        # Column 0 is the positive q·k+ / t ...
        assert float(logits[i, 0]) == pytest.approx(float(q[i] @ key[i]) / t, abs=1e-5)
        # ... columns 1..K are q·queue[:, j] / t, in queue order.
        for j in range(k):
            assert float(logits[i, 1 + j]) == pytest.approx(float(q[i] @ queue[:, j]) / t, abs=1e-5)


def test_positive_is_column_zero() -> None:
    """When q equals its key and is orthogonal to every negative, column 0 wins and the loss
    is small; moving the positive to any other column would make it large."""
    c = 4
    q = torch.eye(c)[:2]
    queue = torch.eye(c)[:, 2:].repeat(1, 3)  # negatives e2, e3: orthogonal to q
    logits = moco_logits(q, q.clone(), queue, 0.05)
    assert (logits.argmax(dim=1) == 0).all()
    assert top1_accuracy(logits) == 100.0
    assert float(info_nce(logits)) < 1e-6
    # The label is 0: a loss that targeted another class would be huge here.
    assert float(F.cross_entropy(logits, torch.ones(2, dtype=torch.long))) > 10


def test_all_equal_logits_give_log_one_plus_k() -> None:
    for k in (1, 7, 4096):
        logits = torch.full((3, 1 + k), 0.37)
        assert float(info_nce(logits)) == pytest.approx(math.log(1 + k), rel=1e-6)


def test_gradient_flows_to_q_only() -> None:
    torch.manual_seed(2)
    q = _unit(3, 5, dim=1).requires_grad_(True)
    key = _unit(3, 5, dim=1)
    queue = _unit(5, 7, dim=0).requires_grad_(True)
    loss = info_nce(moco_logits(q, key, queue.detach(), 0.2))
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert queue.grad is None


def test_gradient_matches_naive_autograd() -> None:
    torch.manual_seed(3)
    q0, key, queue = _unit(4, 6, dim=1).double(), _unit(4, 6, dim=1).double(), _unit(6, 5, dim=0).double()
    q1 = q0.clone().requires_grad_(True)
    info_nce(moco_logits(q1, key, queue, 0.1)).backward()
    q2 = q0.clone().requires_grad_(True)
    rows = []
    for n in range(4):
        pos = torch.exp(q2[n] @ key[n] / 0.1)
        neg = torch.exp(q2[n] @ queue / 0.1).sum()
        rows.append(-torch.log(pos / (pos + neg)))
    torch.stack(rows).mean().backward()
    assert q1.grad is not None and q2.grad is not None
    torch.testing.assert_close(q1.grad.double(), q2.grad, rtol=1e-4, atol=1e-6)


def test_top1_accuracy() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [2.0, 2.5, -1.0], [9.0, 0.0, 0.0]])
    assert top1_accuracy(logits) == pytest.approx(50.0)


# ----- logits and loss in float32 under autocast --------------------------------------------------

def test_logits_and_loss_are_float32_under_bf16_autocast() -> None:
    """bf16 logits / T 0.07 would be off by ~0.03-0.06 and tie the positive with negatives in
    the pretext accuracy; they are computed in float32 from float32 embeddings."""
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(64, 128, generator=g), dim=1)
    k = F.normalize(torch.randn(64, 128, generator=g), dim=1)
    queue = F.normalize(torch.randn(128, 4096, generator=g), dim=0)
    ref = moco_logits(q, k, queue, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = moco_logits(q, k, queue, 0.07)
        loss = info_nce(logits)
        assert (q @ queue).dtype == torch.bfloat16  # what autocast would have done
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(logits, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(loss, info_nce(ref))


def test_a_moco_step_under_bf16_autocast_has_float32_logits() -> None:
    from moco.core.mechanisms import EndToEnd, MemoryBank, end_to_end_logits
    from moco.core.model import MoCo, build_encoder

    torch.manual_seed(0)
    enc = build_encoder("resnet18", 16, mlp=False, cifar_stem=True, bn_splits=1)
    x = torch.randn(4, 3, 8, 8)
    for model in (MoCo(enc, dim=16, k=32, t=0.07, generator=torch.Generator().manual_seed(1)),
                  EndToEnd(enc, t=0.07),
                  MemoryBank(enc, num_samples=8, dim=16, k=8, per_query=True,
                             generator=torch.Generator().manual_seed(1))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, x.clone(), None, torch.arange(4))
        assert out.logits.dtype == torch.float32 and out.loss.dtype == torch.float32
    q = F.normalize(torch.randn(5, 16), dim=1).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert end_to_end_logits(q, q, 0.1).dtype == torch.float32


# ----- the logits' dtype: at least float32, never narrower than the model's ----------------------

def test_float64_embeddings_keep_float64_logits_and_loss() -> None:
    """Promotion, not a cast to float32: a float64 model's logits and loss stay float64 and
    equal the naive float64 loop to float64 precision (a float32 cast would miss by ~1e-7)."""
    torch.manual_seed(4)
    q = _unit(5, 8, dim=1).double()
    key = _unit(5, 8, dim=1).double()
    queue = _unit(8, 11, dim=0).double()
    for ctx in (torch.autocast("cpu", enabled=False), torch.autocast("cpu", dtype=torch.bfloat16)):
        with ctx:
            logits = moco_logits(q, key, queue, 0.07)
            loss = info_nce(logits)
        assert logits.dtype == torch.float64 and loss.dtype == torch.float64
        assert float(loss) == pytest.approx(_naive_loss(q, key, queue, 0.07), rel=1e-12)
    half = moco_logits(q.half(), key.half(), queue.half(), 0.07)
    assert half.dtype == torch.float32  # narrower inputs are promoted to float32


def test_a_float64_moco_model_keeps_float64_logits() -> None:
    from moco.core.mechanisms import EndToEnd
    from moco.core.model import MoCo, build_encoder

    torch.manual_seed(0)
    enc = build_encoder("resnet18", 16, mlp=False, cifar_stem=True, bn_splits=1)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for model in (MoCo(enc, dim=16, k=32, t=0.07, generator=torch.Generator().manual_seed(1)),
                  EndToEnd(enc, t=0.07)):
        out = model.double()(x, x.clone(), None, torch.arange(4))
        assert out.logits.dtype == torch.float64 and out.loss.dtype == torch.float64
