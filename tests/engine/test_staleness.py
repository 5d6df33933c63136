"""moco.engine.staleness: the queue's keys against fresh keys of the current key encoder, computed
by hand; the model untouched; a run trains bit for bit the same with the measurement on."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_FLAGS, assert_same_tensors, final_state

from moco.cli import build_parser
from moco.cli.pretrain import config_from_args
from moco.core.model import MoCo, build_encoder
from moco.core.shuffle_bn import LocalShuffle, NoShuffle
from moco.data.batches import Batch
from moco.engine.loop import Pretrainer
from moco.engine.staleness import _FRESH_EPOCH, _MEASURED_EPOCH, measure_staleness

pytestmark = pytest.mark.usefixtures("one_thread")

B, K, T = 8, 32, 0.2


class FakeLoader:
    """Batches of random images that depend only on (epoch, step), like the real loaders."""

    def __init__(self, steps: int = 6) -> None:
        self.n_steps = steps

    def steps(self) -> int:
        return self.n_steps

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        for step in range(start_step, self.n_steps):
            g = torch.Generator().manual_seed(epoch * 1000 + step)
            im = torch.rand(2, B, 3, 16, 16, generator=g)
            yield Batch(im[0], im[1], torch.arange(B))


def tiny_moco() -> MoCo:
    torch.manual_seed(0)
    enc = build_encoder("resnet18", 16, mlp=False, cifar_stem=True, bn_splits=2)
    return MoCo(enc, dim=16, k=K, m=0.99, t=T, generator=torch.Generator().manual_seed(1))


def naive(model: MoCo, batches: list[Batch], negatives: torch.Tensor) -> tuple[float, float, float]:
    """Loss, acc@1 and mean cos(q, neg) written out: -log softmax of the positive, per query."""
    losses, hits, cos = [], [], []
    for b in batches:
        q = F.normalize(model.encoder_q(b.im_q), dim=1)
        k = F.normalize(model.encoder_k(b.im_k), dim=1)
        for i in range(q.shape[0]):
            pos = float(q[i] @ k[i]) / T
            negs = [float(q[i] @ negatives[:, j]) / T for j in range(negatives.shape[1])]
            all_logits = [pos, *negs]
            m = max(all_logits)
            losses.append(-(pos - m - math.log(sum(math.exp(v - m) for v in all_logits))))
            hits.append(100.0 if pos >= max(negs) else 0.0)
            cos.append(sum(negs) * T / len(negs))
    n = len(losses)
    return sum(losses) / n, sum(hits) / n, sum(cos) / n


@torch.no_grad()
def test_matches_a_naive_computation_and_leaves_the_model_untouched() -> None:
    model = tiny_moco()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = FakeLoader()
    r = measure_staleness(model, loader, NoShuffle, batches=2, epoch=3)
    assert_same_tensors(model.state_dict(), before, "model state")

    ref = tiny_moco()
    ref.load_state_dict(before)
    ref.train()
    measured = list(loader.batches(_MEASURED_EPOCH + 3))[:2]
    fresh = torch.cat([F.normalize(ref.encoder_k(b.im_k), dim=1)
                       for b in loader.batches(_FRESH_EPOCH + 3)])[:K].T
    ql, qa, qc = naive(ref, measured, before["key_queue.queue"])
    fl, fa, fc = naive(ref, measured, fresh)
    assert r.queue_loss == pytest.approx(ql, rel=1e-5)
    assert r.fresh_loss == pytest.approx(fl, rel=1e-5)
    assert (r.queue_acc1, r.fresh_acc1) == (pytest.approx(qa), pytest.approx(fa))
    assert r.queue_cos == pytest.approx(qc, abs=1e-5)
    assert r.fresh_cos == pytest.approx(fc, abs=1e-5)
    # The queue holds random unit vectors here, keys of no encoder: a different dictionary.
    assert abs(r.queue_loss - r.fresh_loss) > 1e-3


@torch.no_grad()
def test_a_queue_of_the_current_keys_is_not_stale() -> None:
    model = tiny_moco()
    model.train()
    loader = FakeLoader()
    shuffle = LocalShuffle(torch.Generator().manual_seed(5))
    keys = torch.cat([model.encode_key(b.im_k, shuffle) for b in loader.batches(_FRESH_EPOCH)])[:K]
    model.key_queue.enqueue(keys)  # the queue now holds exactly the keys measured as fresh
    r = measure_staleness(model, loader, lambda: LocalShuffle(torch.Generator().manual_seed(5)),
                          batches=3)
    assert r.queue_loss == pytest.approx(r.fresh_loss, abs=1e-5)
    assert r.queue_acc1 == pytest.approx(r.fresh_acc1)
    assert r.queue_cos == pytest.approx(r.fresh_cos, abs=1e-6)


def test_needs_an_epoch_of_at_least_k_images() -> None:
    with pytest.raises(ValueError, match="K = 32 fresh keys"):
        measure_staleness(tiny_moco(), FakeLoader(steps=3), NoShuffle, batches=1)
    with pytest.raises(ValueError, match=">= 1 measured batch"):
        measure_staleness(tiny_moco(), FakeLoader(), NoShuffle, batches=0)


def _train(data: Path, out: Path, *extra: str) -> list[dict[str, object]]:
    args = build_parser().parse_args(["pretrain", str(data), *TINY_FLAGS, "--output", str(out),
                                      "--knn-every", "0", *extra])
    Pretrainer(config_from_args(args), log=lambda _m: None, progress=False).run()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_records_it_and_trains_the_same(tiny_data: Path, tmp_path: Path) -> None:
    plain = _train(tiny_data, tmp_path / "plain")
    measured = _train(tiny_data, tmp_path / "measured", "--staleness-every", "1",
                      "--staleness-batches", "2")
    assert_same_tensors(final_state(tmp_path / "measured")["state_dict"],
                        final_state(tmp_path / "plain")["state_dict"], "state_dict")
    keys = {"staleness_queue_loss", "staleness_fresh_loss", "staleness_queue_acc1",
            "staleness_fresh_acc1", "staleness_queue_cos", "staleness_fresh_cos"}
    for a, b in zip(plain, measured, strict=True):
        assert (a["loss"], a["acc1"]) == (b["loss"], b["acc1"])
        assert keys <= set(b) and not keys & set(a)
        assert all(math.isfinite(float(b[k])) for k in keys)  # type: ignore[arg-type]
        # At most K = 32 keys over 4 steps of 8: the queue is all keys of this epoch's encoders.
        assert 0 < float(b["staleness_fresh_loss"]) < 2 * math.log(K + 1)  # type: ignore[arg-type]


def test_bad_settings_are_refused(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="memory-bank has none"):
        _train(tiny_data, tmp_path / "bank", "--staleness-every", "1", "--mechanism", "memory-bank")
    with pytest.raises(ValueError, match="--staleness-batches >= 1"):
        _train(tiny_data, tmp_path / "zero", "--staleness-every", "1", "--staleness-batches", "0")
