"""Weighted kNN monitor (REFERENCE.md §6.4) against a hand-computed example and a naive version."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moco.eval.knn import extract_features, knn_accuracy, knn_scores

# Bank of 2-D unit vectors; the query is [1, 0], so similarity = first coordinate.
BANK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
LABELS = torch.tensor([0, 1, 1, 0])
QUERY = torch.tensor([[1.0, 0.0]])


def test_hand_computed_example() -> None:
    # k=3: neighbours sim 1 (class 0), 0.6 (class 1), 0 (class 1); weights exp(sim / t).
    s = knn_scores(QUERY, BANK, LABELS, num_classes=2, k=3, t=0.5)
    assert s.shape == (1, 2)
    assert float(s[0, 0]) == pytest.approx(math.exp(2.0), rel=1e-6)
    assert float(s[0, 1]) == pytest.approx(math.exp(1.2) + 1.0, rel=1e-6)
    # Temperature 2 flips the decision: exp(.5) = 1.649 < exp(.3) + 1 = 2.350.
    s = knn_scores(QUERY, BANK, LABELS, num_classes=2, k=3, t=2.0)
    assert float(s[0, 0]) == pytest.approx(math.exp(0.5), rel=1e-6)
    assert float(s[0, 1]) == pytest.approx(math.exp(0.3) + 1.0, rel=1e-6)
    assert int(s.argmax()) == 1
    # k=1: only the nearest neighbour votes.
    s = knn_scores(QUERY, BANK, LABELS, num_classes=3, k=1, t=2.0)
    assert s.tolist()[0] == pytest.approx([math.exp(0.5), 0.0, 0.0])
    # k=4 (the whole bank), adds exp(-1/2) to class 0.
    s = knn_scores(QUERY, BANK, LABELS, num_classes=2, k=4, t=2.0)
    assert float(s[0, 0]) == pytest.approx(math.exp(0.5) + math.exp(-0.5), rel=1e-6)
    # k larger than the bank is clipped to the bank.
    s2 = knn_scores(QUERY, BANK, LABELS, num_classes=2, k=200, t=2.0)
    torch.testing.assert_close(s, s2)


def test_hand_computed_accuracy() -> None:
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q_labels = torch.tensor([1, 1])
    # t=2, k=3: query 0 -> class 1 (above), query 1 -> neighbours b1 (1), b2 (.8), b0 or b3 (0).
    top1, top5 = knn_accuracy(queries, q_labels, BANK, LABELS, k=3, t=2.0)
    assert top1 == pytest.approx(100.0)
    assert top5 == pytest.approx(100.0)
    top1, _ = knn_accuracy(queries, torch.tensor([0, 1]), BANK, LABELS, k=3, t=0.5)
    assert top1 == pytest.approx(100.0)
    top1, _ = knn_accuracy(queries, torch.tensor([1, 0]), BANK, LABELS, k=3, t=0.5)
    assert top1 == pytest.approx(0.0)


def naive_scores(query: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 k: int, t: float) -> torch.Tensor:
    """Full similarity matrix, sort each row, sum exp(sim/t) of the k best per class."""
    sim = (query.double() @ bank.double().T)
    out = torch.zeros(query.shape[0], num_classes, dtype=torch.float64)
    for i in range(query.shape[0]):
        order = sorted(range(bank.shape[0]), key=lambda j: -float(sim[i, j]))[:k]
        for j in order:
            out[i, int(labels[j])] += math.exp(float(sim[i, j]) / t)
    return out


def _random(n_q: int, n_b: int, d: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n_q, d, generator=g), dim=1)
    b = F.normalize(torch.randn(n_b, d, generator=g), dim=1)
    return q, b, torch.randint(0, classes, (n_b,), generator=g), torch.randint(0, classes, (n_q,), generator=g)


@pytest.mark.parametrize(("k", "chunk"), [(10, 65536), (10, 3), (10, 7), (1, 4), (57, 5), (60, 16)])
def test_scores_match_naive(k: int, chunk: int) -> None:
    """Including a bank scanned in chunks smaller than k (running top-k across chunks)."""
    q, b, lb, _ = _random(9, 57, 6, 4, seed=k + chunk)
    got = knn_scores(q, b, lb, num_classes=4, k=k, t=0.1, bank_chunk=chunk)
    torch.testing.assert_close(got.double(), naive_scores(q, b, lb, 4, min(k, 57), 0.1),
                               rtol=1e-4, atol=1e-6)


def test_chunking_does_not_change_scores() -> None:
    q, b, lb, _ = _random(6, 100, 8, 5, seed=1)
    ref = knn_scores(q, b, lb, 5, k=20, t=0.07)
    for chunk in (1, 3, 19, 20, 21, 99, 100):
        torch.testing.assert_close(knn_scores(q, b, lb, 5, k=20, t=0.07, bank_chunk=chunk), ref,
                                   rtol=1e-5, atol=1e-5)


def _naive_accuracy(q, ql, b, lb, k, t) -> tuple[float, float]:
    classes = int(max(int(lb.max()), int(ql.max()))) + 1
    s = naive_scores(q, b, lb, classes, min(k, b.shape[0]), t)
    top1 = top5 = 0
    for i in range(q.shape[0]):
        order = sorted(range(classes), key=lambda c: -float(s[i, c]))
        top1 += order[0] == int(ql[i])
        top5 += int(ql[i]) in order[:5]
    return 100.0 * top1 / q.shape[0], 100.0 * top5 / q.shape[0]


def test_accuracy_matches_naive_random() -> None:
    q, b, lb, ql = _random(40, 90, 8, 8, seed=3)
    # k = bank size so every class gets a non-zero score (no ties for top-5).
    ref1, ref5 = _naive_accuracy(q, ql, b, lb, 90, 0.1)
    top1, top5 = knn_accuracy(q, ql, b, lb, k=90, t=0.1, query_chunk=7, bank_chunk=13)
    assert top1 == pytest.approx(ref1)
    assert top5 == pytest.approx(ref5)
    # Smaller k: top-1 against the naive one; chunk sizes do not matter.
    ref1, _ = _naive_accuracy(q, ql, b, lb, 5, 0.1)
    for qc, bc in ((1024, 65536), (3, 2), (40, 4)):
        top1, _ = knn_accuracy(q, ql, b, lb, k=5, t=0.1, query_chunk=qc, bank_chunk=bc)
        assert top1 == pytest.approx(ref1)


def test_accuracy_on_separable_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 16, generator=g), dim=1) * 5
    lb = torch.arange(3).repeat_interleave(20)
    b = F.normalize(centres[lb] + torch.randn(60, 16, generator=g), dim=1)
    ql = torch.arange(3).repeat_interleave(5)
    q = F.normalize(centres[ql] + torch.randn(15, 16, generator=g), dim=1)
    assert knn_accuracy(q, ql, b, lb, k=10, t=0.1) == (100.0, 100.0)
    # Shuffled labels: top-5 with 3 classes is always 100.
    _, top5 = knn_accuracy(q, ql, b, lb[torch.randperm(60, generator=g)], k=10, t=0.1)
    assert top5 == 100.0


def test_extract_features_normalised_and_restores_mode() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5))
    net(torch.randn(2, 3, 6, 6))
    net.train()
    batches = [(torch.randn(3, 3, 6, 6), torch.tensor([0, 1, 2])), (torch.randn(2, 3, 6, 6), torch.tensor([1, 1]))]
    rm = net[1].running_mean.clone()
    feats, labels = extract_features(net, batches, torch.device("cpu"))
    assert feats.shape == (5, 5) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(5))
    assert labels.tolist() == [0, 1, 2, 1, 1]
    assert net.training  # restored
    assert torch.equal(net[1].running_mean, rm)  # ran in eval mode: BN stats not updated
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats[:3], F.normalize(net(batches[0][0]), dim=1))


def test_extract_features_takes_a_device_name_and_its_options_as_one_object() -> None:
    from moco.eval.features import FeatureOptions

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    net(torch.randn(1, 3, 6, 6))
    batches = [(torch.randn(3, 3, 6, 6), torch.tensor([0, 1, 2]))]
    ref, _ = extract_features(net, batches, torch.device("cpu"), normalize=False)
    for device in ("cpu", "cpu:0"):
        feats, labels = extract_features(net, batches, device, normalize=False, n=3)
        torch.testing.assert_close(feats, ref, rtol=0, atol=0)
    raw, _ = extract_features(net, batches, "cpu",
                              options=FeatureOptions(normalize=False, dtype=torch.float64))
    assert raw.dtype == torch.float64
    torch.testing.assert_close(raw, ref.double(), rtol=0, atol=0)
    with pytest.raises(TypeError):
        extract_features(net, batches, "cpu", normalise=False)  # not an option


# ----- the training monitor's kNN on class-balanced subsets ---------------------------------------

def test_the_imagenet_presets_monitor_on_class_balanced_subsets() -> None:
    from moco.engine.config_sources import build_config

    for preset in ("mocov1", "mocov2"):
        cfg = build_config(preset=preset)
        assert (cfg.knn_bank_images, cfg.knn_query_images) == (10000, 2000)
    cfg = build_config(preset="cifar10")  # the authors' log: the whole train and test sets
    assert (cfg.knn_bank_images, cfg.knn_query_images) == (0, 0)


def test_the_monitor_uses_the_subsets_and_says_so(tiny_data, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """--knn-bank-images / --knn-query-images: the bank and the queries are class-balanced
    subsets (both classes kept), kept on the training device, and the log says it."""
    from helpers import TINY_FLAGS

    import moco.engine.evaluation as evaluation
    import moco.engine.loop as train_mod
    from moco.cli import build_parser
    from moco.cli.pretrain import config_from_args

    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    real = evaluation.knn_accuracy

    def spy(q, ql, b, bl, **kw):  # type: ignore[no-untyped-def]
        seen.append((q, ql, b, bl))
        return real(q, ql, b, bl, **kw)

    monkeypatch.setattr(evaluation, "knn_accuracy", spy)
    cfg = config_from_args(build_parser().parse_args(
        ["pretrain", str(tiny_data), *TINY_FLAGS, "--output", str(tmp_path / "r"), "--epochs", "1",
         "--knn-bank-images", "6", "--knn-query-images", "4"]))
    logs: list[str] = []
    train_mod.Pretrainer(cfg, log=logs.append, progress=False).run()
    assert len(seen) == 2  # the untrained network, then epoch 1
    q, ql, b, bl = seen[0]
    assert b.shape[0] == 6 and q.shape[0] == 4 and b.device == q.device == torch.device("cpu")
    assert sorted(bl.tolist()) == [0, 0, 0, 1, 1, 1] and sorted(ql.tolist()) == [0, 0, 1, 1]
    assert any("kNN monitor: class-balanced subsets, 6 of the 32 train images as the bank, 4 of "
               "the 32" in line for line in logs), logs
