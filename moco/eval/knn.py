"""Weighted kNN classifier on frozen features: the protocol of instance discrimination (Wu et
al., CVPR 2018) that the authors' CIFAR-10 demo of MoCo runs as its monitor. The features come
from :func:`moco.eval.features.extract_features` (re-exported here)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moco.data.source import ImageSource
from moco.eval.config import KnnConfig
from moco.eval.features import extract_features
from moco.utils.common_settings import check_batch_fits
from moco.utils.settings import checked_instance

__all__ = ["KnnConfig", "KnnResult", "extract_features", "knn_accuracy", "knn_evaluate",
           "knn_scores"]


@dataclass
class KnnResult:
    """What :func:`knn_evaluate` measured: accuracies in %, the settings, sizes and times."""

    top1: float
    top5: float
    k: int
    t: float
    features: str
    bank_size: int
    num_queries: int
    feature_dim: int
    extract_seconds: float
    knn_seconds: float




def _nearest(query: torch.Tensor, bank: torch.Tensor, k: int, query_chunk: int,
             bank_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar bank rows of every query: similarities and indices [Q, k].

    The bank is read chunk by chunk in the outer loop, each chunk copied to the queries'
    device once (a bank kept in host memory is not copied again for every query chunk); the
    queries are taken ``query_chunk`` at a time, with a running top-k, so memory is
    O(Q·k + query_chunk·bank_chunk)."""
    k = min(k, bank.shape[0])
    n_q = query.shape[0]
    top_sim = torch.full((n_q, 0), float("-inf"), device=query.device)
    top_idx = torch.zeros((n_q, 0), dtype=torch.long, device=query.device)
    for start in range(0, bank.shape[0], bank_chunk):
        chunk = bank[start:start + bank_chunk].to(query.device, query.dtype)
        sims, idxs = [], []
        for q0 in range(0, n_q, query_chunk):
            sim = query[q0:q0 + query_chunk] @ chunk.T
            s, i = sim.topk(min(k, sim.shape[1]), dim=1)
            both = torch.cat([top_sim[q0:q0 + query_chunk], s], 1)
            best, order = both.topk(min(k, both.shape[1]), dim=1)
            sims.append(best)
            idxs.append(torch.cat([top_idx[q0:q0 + query_chunk], i + start], 1).gather(1, order))
        top_sim, top_idx = torch.cat(sims), torch.cat(idxs)
    return top_sim, top_idx


def _votes(top_sim: torch.Tensor, top_idx: torch.Tensor, bank_labels: torch.Tensor,
           num_classes: int, t: float) -> torch.Tensor:
    """Class scores [B, num_classes]: Σ exp(sim / t) over each query's neighbours per class."""
    neighbour_labels = bank_labels.to(top_idx.device)[top_idx]
    weights = (top_sim / t).exp()
    scores = torch.zeros(top_sim.shape[0], num_classes, device=top_sim.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


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
    top_sim, top_idx = _nearest(query, bank, k, max(1, query.shape[0]), bank_chunk)
    return _votes(top_sim, top_idx, bank_labels, num_classes, t)


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
    """Top-1 and top-5 accuracy in % of weighted kNN: every query's neighbours found with
    each bank chunk copied to the queries' device once (:func:`_nearest`), the votes counted
    on the device and read once."""
    num_classes = int(max(int(bank_labels.max()), int(query_labels.max()))) + 1
    top_sim, top_idx = _nearest(query, bank, k, query_chunk, bank_chunk)
    labels, bank_labels = query_labels.to(query.device), bank_labels.to(query.device)
    hits = torch.zeros(2, dtype=torch.int64, device=query.device)
    for start in range(0, query.shape[0], query_chunk):
        rows = slice(start, start + query_chunk)
        pred = _votes(top_sim[rows], top_idx[rows], bank_labels, num_classes, t)
        ranked = pred.argsort(dim=1, descending=True)
        y = labels[rows]
        hits += torch.stack([(ranked[:, 0] == y).sum(),
                             (ranked[:, : min(5, num_classes)] == y[:, None]).any(dim=1).sum()])
    correct1, correct5 = hits.tolist()
    n = query.shape[0]
    return 100.0 * correct1 / n, 100.0 * correct5 / n


def knn_evaluate(data: str | Path | KnnConfig, pretrained: str | Path | None = None, *,
                 progress: bool = True, **settings: Any) -> KnnResult:
    """kNN top-1/top-5 (%) of ``pretrained`` on ``data`` (train = bank, val/test = queries):
    what ``moco knn`` prints. Each query's class scores are the sums of exp(similarity / t)
    over its ``k`` nearest bank rows of each class (:func:`knn_scores`).

    ``settings``: the fields of :class:`KnnConfig` (``k=20``, ``t=0.1``, ``device="cpu"``,
    ``workers=0``, ...), each checked (an error names the parameter); or pass a
    :class:`KnnConfig` as ``data``. The images go through the training monitor's pipeline with
    the settings the pretraining run recorded (:func:`moco.eval.features.eval_config`: image
    size, mean/std, loader, precision, channels_last), so a checkpoint gets the figure its
    run's monitor logged."""
    from moco.data.splits import find_dataset, knn_splits

    if isinstance(data, KnnConfig):
        cfg = checked_instance(KnnConfig, "knn_evaluate", {**asdict(data), **settings})
    else:
        if pretrained is None:
            raise TypeError("knn_evaluate() needs pretrained (the checkpoint to evaluate)")
        cfg = checked_instance(KnnConfig, "knn_evaluate",
                               {"data": data, "pretrained": pretrained, **settings})
    check_batch_fits(cfg.batch_size, cfg.image_size)
    # The same check of the splits as the training monitor's (moco.data.splits.knn_splits).
    bank_source, query_source = knn_splits(find_dataset(cfg.data), cfg.data, required=True)  # type: ignore[misc]
    return _evaluate(cfg, bank_source, query_source, progress)


def _evaluate(cfg: KnnConfig, bank_source: ImageSource, query_source: ImageSource,
              progress: bool) -> KnnResult:
    """The features of the bank and the queries, then the kNN accuracies."""
    from tqdm import tqdm

    from moco.eval import features as feats
    from moco.eval.encoders import load_encoder
    from moco.utils.runtime import default_workers, resolve_device, resolve_precision

    dev = resolve_device(cfg.device)
    model, info = load_encoder(cfg.pretrained, cfg.arch, dev, features=cfg.features)
    nw = cfg.workers if cfg.workers >= 0 else default_workers(dev)
    ecfg = feats.eval_config(info.config, image_size=cfg.image_size or info.image_size,
                             mean=info.mean, std=info.std, workers=nw, precision=cfg.precision)
    autocast = resolve_precision(ecfg.precision, dev)
    t0 = time.perf_counter()
    with tqdm(total=len(bank_source) + len(query_source), desc="features", unit="img",
              disable=not progress, dynamic_ncols=True) as bar:
        bank, bank_labels = feats.source_features(
            model, bank_source, ecfg.inputs, dev, nw, autocast_dtype=autocast,
            batch_size=cfg.batch_size, dtype=torch.float16 if cfg.half_bank else torch.float32,
            progress=bar)
        query, query_labels = feats.source_features(
            model, query_source, ecfg.inputs, dev, nw, autocast_dtype=autocast,
            batch_size=cfg.batch_size, progress=bar)
    t1 = time.perf_counter()
    top1, top5 = knn_accuracy(query.to(dev), query_labels, bank, bank_labels, k=cfg.k, t=cfg.t,
                              bank_chunk=cfg.bank_chunk)
    t2 = time.perf_counter()
    return KnnResult(top1, top5, cfg.k, cfg.t, info.features, len(bank_source),
                     len(query_source), int(bank.shape[1]), t1 - t0, t2 - t1)
