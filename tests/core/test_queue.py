"""KeyQueue: a FIFO ring buffer of unit-length keys stored as columns (REFERENCE.md §1.1, §1.3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moco.core.queue import KeyQueue


def _keys(n: int, dim: int, start: int = 0) -> torch.Tensor:
    """n distinct keys [n, dim]: key i is i+start in every coordinate (easy to identify)."""
    return (torch.arange(start, start + n, dtype=torch.float32)[:, None]).expand(n, dim).clone()


def _ids(q: KeyQueue) -> list[int]:
    """The key id stored in each column."""
    return [int(v) for v in q.queue[0].round()]


def test_buffers_names_shapes_dtypes() -> None:
    q = KeyQueue(dim=5, size=12)
    buffers = dict(q.named_buffers())
    assert set(buffers) == {"queue", "queue_ptr"}
    assert buffers["queue"].shape == (5, 12)
    assert buffers["queue"].dtype == torch.float32
    assert buffers["queue_ptr"].shape == (1,)
    assert buffers["queue_ptr"].dtype == torch.long
    assert int(buffers["queue_ptr"]) == 0
    assert set(q.state_dict()) == {"queue", "queue_ptr"}
    assert list(q.parameters()) == []


def test_columns_unit_length_at_init() -> None:
    q = KeyQueue(dim=16, size=64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(q.queue.norm(dim=0), torch.ones(64))
    # Rows are not unit length (it is the columns that are normalised).
    assert not torch.allclose(q.queue.norm(dim=1), torch.ones(16))
    # Random, not zeros or constants.
    assert q.queue.std() > 0.05


def test_init_is_seeded_by_generator() -> None:
    a = KeyQueue(8, 10, generator=torch.Generator().manual_seed(3))
    b = KeyQueue(8, 10, generator=torch.Generator().manual_seed(3))
    c = KeyQueue(8, 10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.queue, b.queue)
    assert not torch.equal(a.queue, c.queue)


def test_fifo_order_and_pointer_advance() -> None:
    q = KeyQueue(dim=3, size=8)
    init = q.queue.clone()
    q.enqueue(_keys(2, 3, start=100))
    assert int(q.queue_ptr) == 2
    assert _ids(q)[:2] == [100, 101]
    torch.testing.assert_close(q.queue[:, 2:], init[:, 2:])  # the rest untouched
    q.enqueue(_keys(2, 3, start=200))
    assert int(q.queue_ptr) == 4
    assert _ids(q)[:4] == [100, 101, 200, 201]
    q.enqueue(_keys(4, 3, start=300))
    assert int(q.queue_ptr) == 0  # (4 + 4) mod 8
    assert _ids(q) == [100, 101, 200, 201, 300, 301, 302, 303]
    # The next block overwrites the oldest keys (100, 101), in order.
    q.enqueue(_keys(2, 3, start=400))
    assert int(q.queue_ptr) == 2
    assert _ids(q) == [400, 401, 200, 201, 300, 301, 302, 303]


def test_keys_are_stored_as_columns() -> None:
    q = KeyQueue(dim=4, size=6)
    k = F.normalize(torch.randn(3, 4), dim=1)
    q.enqueue(k)
    torch.testing.assert_close(q.queue[:, :3], k.T)


def test_wrap_around_when_n_does_not_divide_k() -> None:
    """N=3, K=8: a block running past the end wraps to column 0; every key is kept and only the
    oldest keys are overwritten."""
    k, n = 8, 3
    q = KeyQueue(dim=2, size=k)
    written: list[int] = []
    for step in range(7):
        ids = list(range(10 * step, 10 * step + n))
        q.enqueue(torch.tensor(ids, dtype=torch.float32)[:, None].expand(n, 2).clone())
        written += ids
        assert int(q.queue_ptr) == len(written) % k
        # The queue holds exactly the newest min(K, written) keys, each at column (pos mod K).
        newest = written[-k:]
        stored = _ids(q)
        for pos in range(max(0, len(written) - k), len(written)):
            assert stored[pos % k] == written[pos]
        if len(written) >= k:
            assert sorted(stored) == sorted(newest)


def test_n_equal_k_replaces_everything() -> None:
    q = KeyQueue(dim=2, size=4)
    q.enqueue(_keys(4, 2, start=1))
    assert _ids(q) == [1, 2, 3, 4]
    assert int(q.queue_ptr) == 0


def test_n_greater_than_k_is_rejected() -> None:
    q = KeyQueue(dim=2, size=4)
    before = q.queue.clone()
    with pytest.raises(ValueError, match=r"(?i)moco-k|K=4"):
        q.enqueue(_keys(5, 2))
    assert torch.equal(q.queue, before)
    assert int(q.queue_ptr) == 0


@pytest.mark.parametrize(("dim", "size"), [(0, 4), (4, 0)])
def test_bad_sizes_rejected(dim: int, size: int) -> None:
    with pytest.raises(ValueError):
        KeyQueue(dim, size)


def test_negatives_are_a_detached_copy() -> None:
    q = KeyQueue(dim=3, size=5)
    neg = q.negatives()
    assert not neg.requires_grad
    torch.testing.assert_close(neg, q.queue)
    q.enqueue(_keys(2, 3, start=50))
    # A snapshot taken before enqueue does not see the new keys.
    assert not torch.equal(neg, q.queue)
    assert _ids(q)[:2] == [50, 51]


def test_enqueue_carries_no_gradient() -> None:
    q = KeyQueue(dim=3, size=5)
    k = torch.randn(2, 3, requires_grad=True)
    q.enqueue(k)
    assert not q.queue.requires_grad
    assert q.queue.grad_fn is None


def test_state_dict_round_trip_into_fresh_queue() -> None:
    a = KeyQueue(dim=4, size=10, generator=torch.Generator().manual_seed(1))
    a.enqueue(F.normalize(torch.randn(3, 4), dim=1))
    a.enqueue(F.normalize(torch.randn(3, 4), dim=1))
    b = KeyQueue(dim=4, size=10, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a.queue, b.queue)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.queue, b.queue)
    assert int(b.queue_ptr) == 6
    assert b.queue_ptr.dtype == torch.long
    # Both continue identically.
    k = F.normalize(torch.randn(6, 4), dim=1)
    a.enqueue(k)
    b.enqueue(k)
    assert torch.equal(a.queue, b.queue)
    assert int(a.queue_ptr) == int(b.queue_ptr) == 2


def test_state_dict_survives_torch_save(tmp_path) -> None:
    a = KeyQueue(dim=4, size=8)
    a.enqueue(F.normalize(torch.randn(3, 4), dim=1))
    torch.save(a.state_dict(), tmp_path / "q.pt")
    b = KeyQueue(dim=4, size=8)
    b.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True))
    assert torch.equal(a.queue, b.queue)
    assert torch.equal(a.queue_ptr, b.queue_ptr)
