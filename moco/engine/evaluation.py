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
from moco.core.errors import ConfigError
from moco.data.datasets import class_balanced_subset
from moco.data.source import ImageSource
from moco.engine.build import Runtime
from moco.engine.config import MocoConfig
from moco.engine.monitor_settings import probe_wanted
from moco.eval.feature_tap import HeadInputs
from moco.eval.features import source_features
from moco.eval.knn import knn_accuracy
from moco.utils.distributed import DistContext
from moco.utils.logs import Log

#: (this rank's bank images, this rank's queries, the bank's size, the queries' size)
MonitorSources = tuple[ImageSource, ImageSource, int, int]
#: Features [N, D] and their labels [N].
Features = tuple[torch.Tensor, torch.Tensor]


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


def _gathered(net: nn.Module, src: ImageSource, n: int, cfg: MocoConfig, workers: int,
              device: torch.device, autocast_dtype: torch.dtype | None) -> Features:
    """The features and labels of this rank's share ``src`` of ``n`` images, gathered from
    every rank in the images' order."""
    f, y = source_features(net, src, cfg.input_settings(), device, workers,
                           autocast_dtype=autocast_dtype, out_device=device)
    return (gather_shards(f, n), gather_shards(y, n)) if len(src) < n else (f, y)


def monitor_knn(encoder: nn.Module, sources: MonitorSources, cfg: MocoConfig, dist: DistContext,
                workers: int, device: torch.device, autocast_dtype: torch.dtype | None,
                queries: list[Features] | None = None) -> tuple[float, float]:
    """Weighted kNN top-1/top-5 of the queries against the bank, through ``encoder`` (f_q;
    its backbone with ``--knn-features backbone``) with rank 0's BN statistics: the features
    of the one evaluation pipeline (:func:`moco.eval.features.source_features`), as
    ``moco knn`` computes them from a checkpoint. ``queries``: a list that receives the
    queries' backbone features [M, D] and labels [M] (the online probe's held-out images;
    with ``--knn-features head``, the head's inputs of the same pass)."""
    bank_src, query_src, n_bank, n_query = sources
    dist.broadcast_buffers(encoder)
    net = strip_head(encoder) if cfg.knn_features == "backbone" else encoder
    bank, bank_labels = _gathered(net, bank_src, n_bank, cfg, workers, device, autocast_dtype)
    inputs = head_inputs(net) if queries is not None and cfg.knn_features == "head" else None
    try:
        query, query_labels = _gathered(net, query_src, n_query, cfg, workers, device,
                                        autocast_dtype)
    finally:
        if inputs is not None:
            inputs.close()
    if queries is not None:
        if inputs is None:  # the backbone features: gathered above
            queries.append((query, query_labels))
        elif (rows := inputs.features()) is not None:  # the head's inputs: this rank's rows
            gathered = gather_shards(rows, n_query) if len(query_src) < n_query else rows
            queries.append((gathered, query_labels))
    return knn_accuracy(query, query_labels, bank, bank_labels, k=cfg.knn_k, t=cfg.knn_t)


def head_inputs(encoder: nn.Module) -> HeadInputs | None:
    """A collector of the inputs of ``encoder``'s head, or None when it has no head."""
    try:
        return HeadInputs(encoder)
    except ConfigError:
        return None


class KnnMonitor:
    """The kNN monitor of a run: the labeled train split as the bank, val/ or test/ as the
    queries (either None: no monitor). Its sources are built on first use and kept (the
    decoded-image cache is per source object). When the run trains the online probe
    (:func:`~moco.engine.monitor_settings.probe_wanted`; decided alike on every rank, whose
    query features are gathered), it keeps its queries' backbone features for it."""

    def __init__(self, cfg: MocoConfig, runtime: Runtime, bank: ImageSource | None,
                 query: ImageSource | None, log: Log) -> None:
        self.cfg, self.runtime, self.log = cfg, runtime, log
        self.bank, self.query = bank, query
        self._sources: MonitorSources | None = None
        self.keep_queries = probe_wanted(cfg, bank is not None)  # the bank: the labeled train split
        self._queries: list[Features] = []

    def __call__(self, encoder: nn.Module) -> tuple[float, float] | None:
        """Weighted kNN top-1/top-5 of ``encoder``'s features (every rank gets the same), or
        None without a bank and queries. With ``keep_queries``, the queries' backbone
        features are kept for :meth:`take_queries`."""
        self._queries.clear()
        if self.bank is None or self.query is None:
            return None
        rt = self.runtime
        if self._sources is None:
            self._sources = monitor_sources(self.cfg, self.bank, self.query, rt.dist, self.log)
        return monitor_knn(encoder, self._sources, self.cfg, rt.dist, rt.workers, rt.device,
                           rt.autocast_dtype, self._queries if self.keep_queries else None)

    def take_queries(self) -> Features | None:
        """The last evaluation's query backbone features [M, D] and labels [M] (the online
        probe's held-out set), then forgotten; None when none were kept."""
        kept = self._queries[-1] if self._queries else None
        self._queries.clear()
        return kept

    def absent_reason(self) -> str:
        """Why there is no monitor (logged once, when the run starts)."""
        if self.bank is None:
            return "the training images are unlabeled (no class folders): kNN evaluation is skipped"
        return "no labeled val/ or test/ split: kNN evaluation is skipped"
