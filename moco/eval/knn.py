"""Weighted kNN classifier on frozen features: the protocol of instance discrimination (Wu et
al., CVPR 2018) that the authors' CIFAR-10 demo of MoCo runs as its monitor. The features come
from :func:`moco.eval.features.extract_features` (re-exported here)."""

from __future__ import annotations

import torch

from moco.eval.features import extract_features

__all__ = ["extract_features", "knn_accuracy", "knn_scores"]


@torch.no_grad()
def knn_scores(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    bank_chunk: int = 65536,
) -> torch.Tensor:
    """Class scores [B, num_classes] for queries [B, D] against a bank [N, D] (unit rows).

    Score of class c = Σ over the k most similar bank rows with label c of exp(sim / t).
    The bank is scanned in chunks with a running top-k, so memory is O(B·(chunk + k)).
    """
    k = min(k, bank.shape[0])
    top_sim = torch.full((query.shape[0], 0), float("-inf"), device=query.device)
    top_idx = torch.zeros((query.shape[0], 0), dtype=torch.long, device=query.device)
    for start in range(0, bank.shape[0], bank_chunk):
        chunk = bank[start:start + bank_chunk].to(query.device, query.dtype)
        sim = query @ chunk.T
        s, i = sim.topk(min(k, sim.shape[1]), dim=1)
        top_sim, order = torch.cat([top_sim, s], 1).topk(min(k, top_sim.shape[1] + s.shape[1]), dim=1)
        top_idx = torch.cat([top_idx, i + start], 1).gather(1, order)
    neighbour_labels = bank_labels.to(query.device)[top_idx]
    weights = (top_sim / t).exp()
    scores = torch.zeros(query.shape[0], num_classes, device=query.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


@torch.no_grad()
def knn_accuracy(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    k: int = 200,
    t: float = 0.1,
    query_chunk: int = 1024,
    bank_chunk: int = 65536,
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in % of weighted kNN, queries processed in chunks."""
    num_classes = int(max(int(bank_labels.max()), int(query_labels.max()))) + 1
    correct1 = correct5 = 0
    for start in range(0, query.shape[0], query_chunk):
        q = query[start:start + query_chunk]
        y = query_labels[start:start + query_chunk].to(q.device)
        pred = knn_scores(q, bank, bank_labels, num_classes, k, t, bank_chunk)
        ranked = pred.argsort(dim=1, descending=True)
        correct1 += int((ranked[:, 0] == y).sum())
        correct5 += int((ranked[:, : min(5, num_classes)] == y[:, None]).any(dim=1).sum())
    n = query.shape[0]
    return 100.0 * correct1 / n, 100.0 * correct5 / n
