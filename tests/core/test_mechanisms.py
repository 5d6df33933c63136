"""End-to-end and memory-bank mechanisms (MoCo v1 §3.2, Figure 2; REFERENCE.md §11): losses
against naive per-row references, the bank update rule, state dicts and exact resume."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_FLAGS
from torch import nn

import moco.engine.loop as train_mod
from moco.cli import build_parser
from moco.cli.pretrain import config_from_args
from moco.core.loss import top1_accuracy
from moco.core.mechanisms import (
    EndToEnd,
    FeatureBank,
    MemoryBank,
    build_mechanism,
    end_to_end_logits,
)
from moco.core.shuffle_bn import LocalShuffle, NoShuffle, SplitBatchNorm
from moco.engine.build import build_model
from moco.engine.config import MocoConfig
from moco.engine.loop import Pretrainer
from moco.engine.rundir import newest_checkpoint
from moco.engine.training_step import StepResult
from moco.utils.checkpoint import from_original_layout, load_checkpoint, to_original_layout

DIM = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_encoder(dim: int = DIM, bn: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), bn if bn is not None else nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, dim),
    )


def views(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g)


def naive_infonce(rows: list[tuple[float, list[float]]], t: float) -> float:
    """Mean over rows of -log(exp(pos/t) / (exp(pos/t) + Σ exp(neg/t))), in float64 Python."""
    total = 0.0
    for pos, negs in rows:
        z = math.exp(pos / t) + sum(math.exp(v / t) for v in negs)
        total += -math.log(math.exp(pos / t) / z)
    return total / len(rows)


# ----- end-to-end ---------------------------------------------------------------------------

def test_end_to_end_logits_positive_first_and_loss_matches_naive_rows() -> None:
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, DIM, generator=g), dim=1)
    k = F.normalize(torch.randn(5, DIM, generator=g), dim=1)
    t = 0.2
    logits = end_to_end_logits(q, k, t)
    assert logits.shape == (5, 5)
    rows = []
    for n in range(5):
        pos = float(q[n] @ k[n])
        negs = [float(q[n] @ k[j]) for j in range(5) if j != n]
        torch.testing.assert_close(logits[n], torch.tensor([pos] + negs) / t)
        rows.append((pos, negs))
    loss = F.cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    assert float(loss) == pytest.approx(naive_infonce(rows, t), rel=1e-5)
    # Same as cross-entropy over q·kᵀ with the diagonal as target.
    torch.testing.assert_close(loss, F.cross_entropy(q @ k.T / t, torch.arange(5)))


def test_end_to_end_step_matches_naive_and_backprops_through_keys() -> None:
    im_q, im_k = views()
    model = EndToEnd(toy_encoder(), t=0.1).train()
    ref_enc = toy_encoder().train()
    ref_enc.load_state_dict(model.encoder_q.state_dict())
    out = model(im_q, im_k, NoShuffle())
    q = F.normalize(ref_enc(im_q), dim=1)
    k = F.normalize(ref_enc(im_k), dim=1)
    qd, kd = q.detach(), k.detach()
    rows = [(float(qd[n] @ kd[n]), [float(qd[n] @ kd[j]) for j in range(6) if j != n])
            for n in range(6)]
    assert float(out.loss.detach()) == pytest.approx(naive_infonce(rows, 0.1), rel=1e-5)
    assert out.logits.shape == (6, 6) and not out.logits.requires_grad
    assert top1_accuracy(out.logits) == pytest.approx(
        100.0 * float(((q @ k.T).argmax(1) == torch.arange(6)).float().mean()))
    # Gradients flow through the keys too: the gradient differs from the keys-detached one.
    out.loss.backward()
    g_full = model.encoder_q[0].weight.grad.clone()
    ref_loss = F.cross_entropy(q @ k.detach().T / 0.1, torch.arange(6))
    ref_loss.backward()
    assert not torch.allclose(g_full, ref_enc[0].weight.grad)
    k_fresh = F.normalize(ref_enc(im_k), dim=1)
    ref_enc.zero_grad()
    F.cross_entropy(F.normalize(ref_enc(im_q), dim=1) @ k_fresh.T / 0.1, torch.arange(6)).backward()
    torch.testing.assert_close(g_full, ref_enc[0].weight.grad, rtol=1e-4, atol=1e-6)


def test_end_to_end_shuffles_the_key_batch_around_the_encoder() -> None:
    """With SplitBatchNorm the key batch is encoded in the shuffled order (shuffling BN)."""
    im_q, im_k = views(8)
    model = EndToEnd(toy_encoder(bn=SplitBatchNorm(6, 2)), t=0.2).train()
    ref = toy_encoder(bn=SplitBatchNorm(6, 2)).train()
    ref.load_state_dict(model.encoder_q.state_dict())
    out = model(im_q, im_k, LocalShuffle(torch.Generator().manual_seed(3)))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    q = F.normalize(ref(im_q), dim=1)
    k = F.normalize(ref(im_k[perm]), dim=1)[torch.argsort(perm)]
    torch.testing.assert_close(out.logits, end_to_end_logits(q, k, 0.2).detach())
    unshuffled = F.normalize(ref(im_k), dim=1)
    assert not torch.allclose(k, unshuffled)  # SplitBN: the order matters


# ----- memory bank --------------------------------------------------------------------------

def test_bank_update_exact_values_on_a_hand_example() -> None:
    bank = FeatureBank(4, 2)
    bank.bank.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]]))
    bank.update(torch.tensor([0, 2]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]), m=0.5)
    s2, s5 = math.sqrt(0.5), math.sqrt(5.0)
    expected = torch.tensor([[s2, s2], [0.0, 1.0], [2 / s5, 1 / s5], [-1.0, 0.0]])
    torch.testing.assert_close(bank.bank, expected)
    # m = 0 overwrites with the (normalised) feature; other rows never change.
    bank.update(torch.tensor([3]), torch.tensor([[0.0, -3.0]]), m=0.0)
    torch.testing.assert_close(bank.bank[3], torch.tensor([0.0, -1.0]))
    torch.testing.assert_close(bank.bank[:3], expected[:3])
    torch.testing.assert_close(bank.bank.norm(dim=1), torch.ones(4))


@pytest.mark.parametrize("init", ["random", "uniform"])
def test_bank_initialisation(init: str) -> None:
    bank = FeatureBank(1000, 16, init=init, generator=torch.Generator().manual_seed(0)).bank
    norms = bank.norm(dim=1)
    if init == "random":
        torch.testing.assert_close(norms, torch.ones(1000))
    else:  # InstDisc: U(-a, a), a = 1/sqrt(dim/3): E‖v‖² = 1, not unit rows
        a = 1 / math.sqrt(16 / 3)
        assert float(bank.abs().max()) <= a
        assert float((norms ** 2).mean()) == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="init"):
        FeatureBank(4, 2, init="zeros")


def _bank_model(per_query: bool = False, n: int = 20, k: int = 7, m: float = 0.5) -> MemoryBank:
    return MemoryBank(toy_encoder(), n, dim=DIM, k=k, t=0.1, bank_momentum=m,
                      per_query=per_query, generator=torch.Generator().manual_seed(1),
                      seed=5).train()


@pytest.mark.parametrize("per_query", [False, True])
def test_memory_bank_loss_matches_naive_rows_and_updates_after_the_loss(per_query: bool) -> None:
    im_q, im_k = views()
    index = torch.tensor([3, 0, 19, 7, 8, 12])
    model = _bank_model(per_query)
    ref_enc = toy_encoder().train()
    ref_enc.load_state_dict(model.encoder_q.state_dict())
    bank_before = model.memory.bank.clone()
    sampler = torch.Generator()
    sampler.set_state(model.memory.sampler.get_state())
    out = model(im_q, im_k, NoShuffle(), index)

    q = F.normalize(ref_enc(im_q), dim=1).detach()
    neg_idx = torch.randint(0, 20, (6, 7) if per_query else (7,), generator=sampler)
    rows = []
    for n in range(6):
        negs_n = neg_idx[n] if per_query else neg_idx
        pos = float(q[n] @ bank_before[index[n]])
        negs = [float(q[n] @ bank_before[j]) for j in negs_n]
        torch.testing.assert_close(out.logits[n], torch.tensor([pos] + negs) / 0.1,
                                   rtol=1e-5, atol=1e-5)
        rows.append((pos, negs))
    assert out.logits.shape == (6, 8)
    assert float(out.loss.detach()) == pytest.approx(naive_infonce(rows, 0.1), rel=1e-5)
    # After the loss: v <- normalize(0.5 v + 0.5 q) for the batch's rows only, unit length.
    bank = model.memory.bank
    expected = F.normalize(0.5 * bank_before[index] + 0.5 * q, dim=1)
    torch.testing.assert_close(bank[index], expected)
    others = torch.ones(20, dtype=torch.bool)
    others[index] = False
    assert torch.equal(bank[others], bank_before[others])
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(20))
    assert not bank.requires_grad
    # Gradient reaches the encoder only through q.
    out.loss.backward()
    assert model.encoder_q[0].weight.grad is not None


def test_memory_bank_negatives_may_include_the_sample_itself() -> None:
    """Documented behaviour (InstDisc's): negatives are drawn uniformly from the whole bank,
    so with a small bank a query's own entry is drawn too; the loss stays finite."""
    model = _bank_model(n=4, k=64)
    im_q, im_k = views(4)
    index = torch.arange(4)
    sampler = torch.Generator()
    sampler.set_state(model.memory.sampler.get_state())
    out = model(im_q, im_k, None, index)
    neg_idx = torch.randint(0, 4, (64,), generator=sampler)
    assert (neg_idx == 0).any()  # sample 0's own entry is among its negatives
    pos_logit = out.logits[0, 0]
    self_cols = 1 + torch.nonzero(neg_idx == 0).flatten()
    torch.testing.assert_close(out.logits[0, self_cols], pos_logit.expand(len(self_cols)))
    assert math.isfinite(float(out.loss.detach()))


def test_memory_bank_needs_indices_and_ignores_the_key_view() -> None:
    model = _bank_model()
    im_q, im_k = views()
    with pytest.raises(ValueError, match="indices"):
        model(im_q, im_k, None, None)
    a = _bank_model()(im_q, im_k, None, torch.arange(6)).logits
    b = _bank_model()(im_q, torch.zeros_like(im_k), None, torch.arange(6)).logits
    torch.testing.assert_close(a, b)


def test_state_dicts_original_layout_and_restore() -> None:
    e2e = EndToEnd(toy_encoder())
    assert all(k.startswith("encoder_q.") for k in e2e.state_dict())
    model = _bank_model()
    im_q, im_k = views()
    model(im_q, im_k, None, torch.arange(6))
    state = to_original_layout(model.state_dict())
    assert {"module.memory.bank", "module.memory._extra_state"} <= set(state)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    fresh = MemoryBank(toy_encoder(), 20, dim=DIM, k=7, t=0.1, seed=99)
    fresh.load_state_dict(from_original_layout(state))
    assert torch.equal(fresh.memory.bank, model.memory.bank)
    # The sampler resumes where it was: both draw the same next negatives.
    assert torch.equal(fresh.memory.sample((10,)), model.memory.sample((10,)))


def _cfg(**kw: Any) -> MocoConfig:
    base = dict(arch="resnet18", moco_dim=16, moco_k=32, batch_size=8, bn_splits=2,
                channels_last=False, device="cpu")
    base.update(kw)
    return MocoConfig(**base)  # type: ignore[arg-type]


def test_build_model_for_each_mechanism() -> None:
    cpu = torch.device("cpu")
    e2e = build_model(_cfg(mechanism="end-to-end", moco_t=0.3), cpu)
    assert isinstance(e2e, EndToEnd) and e2e.t == 0.3
    bank = build_model(_cfg(mechanism="memory-bank", bank_momentum=0.3), cpu, num_samples=50)
    assert isinstance(bank, MemoryBank)
    assert bank.memory.bank.shape == (50, 16) and bank.k == 32 and bank.bank_momentum == 0.3
    # Same seed, same query encoder as MoCo's.
    moco = build_model(_cfg(), cpu)
    for a, b in zip(moco.encoder_q.parameters(), bank.encoder_q.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="training-set size"):
        build_model(_cfg(mechanism="memory-bank"), cpu)
    with pytest.raises(ValueError, match="symmetric"):
        build_mechanism(_cfg(mechanism="end-to-end", symmetric=True), nn.Linear(2, 2))


# ----- through the training loop: metrics, checkpoints, exact resume -------------------------

def _make_cfg(data: Path, out: Path, *extra: str) -> MocoConfig:
    args = build_parser().parse_args(["pretrain", str(data), *TINY_FLAGS, "--output", str(out),
                                      *extra])
    return config_from_args(args)


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", ["end-to-end", "memory-bank"])
def test_mechanism_trains_checkpoints_and_resumes_exactly(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mechanism: str) -> None:
    flags = ("--mechanism", mechanism, "--knn-every", "0")
    logged: list[str] = []
    full = Pretrainer(_make_cfg(tiny_data, tmp_path / "full", *flags), log=logged.append,
                      progress=False).run()
    banner = next(m for m in logged if "pretraining:" in m)
    assert banner.startswith(f"{mechanism} pretraining:") and ", K 32, m " not in banner
    assert {"end-to-end": "dictionary = the batch's other 7 keys",
            "memory-bank": "K 32 sampled from a bank of 32, bank momentum 0.5"}[mechanism] in banner
    assert len(full.history) == 2 and all(math.isfinite(h["loss"]) for h in full.history)
    assert {"loss", "acc1", "images_per_s"} <= set(full.history[-1])

    real = train_mod.train_step
    count = {"n": 0}

    def step(*a: Any, **k: Any) -> StepResult:
        r = real(*a, **k)
        count["n"] += 1
        if count["n"] == 3:  # mid-epoch 1 (4 steps per epoch)
            os.kill(os.getpid(), signal.SIGTERM)
        return r

    monkeypatch.setattr(train_mod, "train_step", step)
    stopped = Pretrainer(_make_cfg(tiny_data, tmp_path / "cut", *flags), log=lambda _m: None,
                         progress=False).run()
    assert stopped.stopped_early
    monkeypatch.setattr(train_mod, "train_step", real)
    Pretrainer(_make_cfg(tiny_data, tmp_path / "cut", *flags, "--resume", "auto"),
               log=lambda _m: None, progress=False).run()

    a = load_checkpoint(newest_checkpoint(tmp_path / "full"))  # type: ignore[arg-type]
    b = load_checkpoint(newest_checkpoint(tmp_path / "cut"))  # type: ignore[arg-type]
    assert set(a["state_dict"]) == set(b["state_dict"])
    assert any(k.startswith("module.encoder_q.") for k in a["state_dict"])
    assert not any("encoder_k" in k or "queue" in k for k in a["state_dict"])
    if mechanism == "memory-bank":
        assert a["state_dict"]["module.memory.bank"].shape == (32, 128)
    for key, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][key]), key
