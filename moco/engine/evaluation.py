"""The training monitor: weighted kNN of the encoder being trained (MoCo v1 §4.1's kNN
protocol as in the authors' CIFAR demo), computed on the training device.

Under torchrun every rank extracts the features of its share of the images with rank 0's BN
statistics (rank 0's f_q is the one saved) and all get the same result: no rank waits for
another's evaluation (which, at ImageNet scale, could pass ``--dist-timeout``).
"""

from __future__ import annotations

import torch
from torch import nn

from moco.core.backbones import strip_head
from moco.core.collectives import gather_shards, shard
from moco.data.datasets import class_balanced_subset
from moco.data.source import ImageSource
from moco.engine.build import Runtime
from moco.engine.config import MocoConfig
from moco.eval.features import source_features
from moco.eval.knn import knn_accuracy
from moco.utils.distributed import DistContext
from moco.utils.logs import Log

#: (this rank's bank images, this rank's queries, the bank's size, the queries' size)
MonitorSources = tuple[ImageSource, ImageSource, int, int]


def monitor_sources(cfg: MocoConfig, bank: ImageSource, query: ImageSource, dist: DistContext,
                    log: Log) -> MonitorSources:
    """The monitor's bank and queries (class-balanced subsets when --knn-bank-images /
    --knn-query-images ask: the ImageNet presets' cheap monitor), this rank's shard of each,
    and their full sizes."""
    world, rank = dist.world_size, dist.rank
    parts, sizes = [], []
    for src, n in ((bank, cfg.knn_bank_images), (query, cfg.knn_query_images)):
        if 0 < n < len(src):
            src = src.subset(class_balanced_subset(src.labels or [], n, cfg.seed))
        sizes.append(len(src))
        # Every rank extracts every world-th image; gathered in order afterwards.
        parts.append(src.subset(shard(len(src), rank, world)) if len(src) >= world else src)
    if sizes != [len(bank), len(query)]:
        log(f"kNN monitor: class-balanced subsets, {sizes[0]} of the {len(bank)} train images "
            f"as the bank, {sizes[1]} of the {len(query)} val/test images as queries")
    return parts[0], parts[1], sizes[0], sizes[1]


def monitor_knn(encoder: nn.Module, sources: MonitorSources, cfg: MocoConfig, dist: DistContext,
                workers: int, device: torch.device,
                autocast_dtype: torch.dtype | None) -> tuple[float, float]:
    """Weighted kNN top-1/top-5 of the queries against the bank, through ``encoder`` (f_q;
    its backbone with ``--knn-features backbone``) with rank 0's BN statistics: the features
    of the one evaluation pipeline (:func:`moco.eval.features.source_features`), as
    ``moco knn`` computes them from a checkpoint."""
    bank_src, query_src, n_bank, n_query = sources
    dist.broadcast_buffers(encoder)
    net = strip_head(encoder) if cfg.knn_features == "backbone" else encoder
    feats = []
    for src, n in ((bank_src, n_bank), (query_src, n_query)):
        f, y = source_features(net, src, cfg.input_settings(), device, workers,
                               autocast_dtype=autocast_dtype, out_device=device)
        feats.append((gather_shards(f, n), gather_shards(y, n)) if len(src) < n else (f, y))
    (bank, bank_labels), (query, query_labels) = feats
    return knn_accuracy(query, query_labels, bank, bank_labels, k=cfg.knn_k, t=cfg.knn_t)


class KnnMonitor:
    """The kNN monitor of a run: the labeled train split as the bank, val/ or test/ as the
    queries (either None: no monitor). Its sources are built on first use and kept (the
    decoded-image cache is per source object)."""

    def __init__(self, cfg: MocoConfig, runtime: Runtime, bank: ImageSource | None,
                 query: ImageSource | None, log: Log) -> None:
        self.cfg, self.runtime, self.log = cfg, runtime, log
        self.bank, self.query = bank, query
        self._sources: MonitorSources | None = None

    def __call__(self, encoder: nn.Module) -> tuple[float, float] | None:
        """Weighted kNN top-1/top-5 of ``encoder``'s features (every rank gets the same), or
        None without a bank and queries."""
        if self.bank is None or self.query is None:
            return None
        rt = self.runtime
        if self._sources is None:
            self._sources = monitor_sources(self.cfg, self.bank, self.query, rt.dist, self.log)
        return monitor_knn(encoder, self._sources, self.cfg, rt.dist, rt.workers, rt.device,
                           rt.autocast_dtype)

    def absent_reason(self) -> str:
        """Why there is no monitor (logged once, when the run starts)."""
        if self.bank is None:
            return "the training images are unlabeled (no class folders): kNN evaluation is skipped"
        return "no labeled val/ or test/ split: kNN evaluation is skipped"
