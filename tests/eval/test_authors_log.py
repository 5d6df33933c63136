"""The authors' CIFAR-10 kNN log as the project keeps it (moco.eval.authors_log)."""

from __future__ import annotations

import pytest

from moco.eval.authors_log import AUTHORS_CIFAR10_KNN, AUTHORS_PAIRS_PER_EPOCH, authors_knn_at


def test_log_values_at_the_published_thresholds() -> None:
    """Spot values of the published log: first epoch, the epochs that first pass 48/60/70/80%,
    the best epoch and the last."""
    knn = AUTHORS_CIFAR10_KNN
    assert len(knn) == 200
    assert (knn[0], knn[9], knn[18], knn[35], knn[118]) == (31.98, 48.03, 60.11, 70.37, 80.32)
    assert max(knn) == knn[189] == 82.73 and knn[-1] == 82.58
    assert all(v < 48 for v in knn[:9]) and all(v < 80 for v in knn[:118])
    assert AUTHORS_PAIRS_PER_EPOCH == 49_664


def test_equal_pairs_interpolates_between_epoch_ends() -> None:
    e = AUTHORS_PAIRS_PER_EPOCH
    assert authors_knn_at(10 * e) == pytest.approx(48.03)
    assert authors_knn_at(10.5 * e) == pytest.approx((48.03 + 49.34) / 2)
    assert authors_knn_at(200 * e) == pytest.approx(82.58)
    assert authors_knn_at(0.5 * e) is None and authors_knn_at(201 * e) is None
