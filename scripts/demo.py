"""`make demo`: MoCo learning on CIFAR-10, measured against the same network untrained.

Without CUDA (configs/demo.yaml): the authors' CIFAR-10 recipe scaled to a few CPU minutes.
It measures weighted kNN top-1 (k 200, t 0.1, the 10,000 test images against the 50,000
train images: the project's protocol) of the randomly initialised network, trains, measures
it again on the same features, and says whether the encoder ended at least 5 points above
its random initialisation. Between the two, a cheaper kNN monitor (1,000 test images against
5,000 train images) is printed per epoch.

With CUDA (configs/demo-gpu.yaml): the authors' recipe itself (``--preset cifar10``: CIFAR
stem, batch 512, T 0.1, K 4096, the 200-epoch cosine schedule) for as many whole epochs as
fit its time limit (``--full``: all 200), with the full kNN after every epoch next to the
authors' own log at the same number of image pairs seen.

Both draw a nearest-neighbour grid before and after training (``neighbours-before.png``,
``neighbours-after.png`` in the run folder: the same test images, each with its nearest
training images through the kNN features) and print the run's health signals per epoch
(effective rank, std of the normalised embeddings: docs/monitoring.md).

``--gpu-recipe-dry-run`` runs that GPU path on the CPU with tiny sizes: a check of the code,
not a result. ``--set KEY=VALUE`` changes any setting (how the pilots of docs/demo.md ran).
Data: --data, else $MOCO_DATA, else a copy of CIFAR-10 beside the checkout (the development
machines' ``../shared/data/cifar10``), else the official CIFAR-10 python archive, downloaded once
into the user cache folder (``moco.data.cifar_download``: md5 checked, resumable;
``$MOCO_CIFAR10_URL`` names a mirror or a local copy of the archive).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from moco.core.backbones import strip_head
from moco.core.errors import MocoError
from moco.core.methods import method_spec
from moco.data.cifar_download import CIFAR10_URL, fetch_cifar10
from moco.data.datasets import class_balanced_subset
from moco.data.source import ImageSource
from moco.engine.config import MocoConfig
from moco.engine.config_sources import build_config
from moco.engine.loop import Pretrainer
from moco.engine.run_state import PretrainResult
from moco.eval.authors_log import authors_knn_at
from moco.eval.config import NeighboursConfig
from moco.eval.features import EvalSettings, source_features
from moco.eval.knn import knn_accuracy
from moco.eval.neighbours import plot_grid, retrieve
from moco.utils.distributed import shutdown_distributed
from moco.utils.logs import show_on_stderr
from moco.utils.runtime import resolve_device, resolve_precision

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "configs/demo.yaml"
GPU_CONFIG = ROOT / "configs/demo-gpu.yaml"
#: The development machines keep an ImageFolder copy of CIFAR-10 beside the checkout.
DEV_COPY = ROOT.parent / "shared" / "data" / "cifar10"


def demo_data(given: str) -> str:
    """The demo's CIFAR-10: ``--data``, else ``$MOCO_DATA``, else the development copy beside
    the checkout, else the official archive downloaded into the user cache folder (once)."""
    if given:
        return given
    if os.environ.get("MOCO_DATA"):
        return os.environ["MOCO_DATA"]
    if DEV_COPY.is_dir():
        return str(DEV_COPY)
    print(f"demo: no local CIFAR-10 (--data, $MOCO_DATA): using {CIFAR10_URL} (163 MB, "
          "downloaded once into the user cache folder)", file=sys.stderr)
    return str(fetch_cifar10())
#: ``--recipe``: other CPU recipes over configs/demo.yaml (docs/demo.md, the pilots). mocov3:
#: MoCo v3 with LARS, its heads and augmentation, 5 epochs (the end-to-end recipe's time).
CPU_RECIPES: dict[str, dict[str, Any]] = {
    "mocov3": {"mechanism": "mocov3", "moco_t": 0.2, "moco_m_cos": True, "moco_dim": 256,
               "mlp_dim": 2048, "aug": "cifar-v3", "optimizer": "lars", "lr": 0.3,
               "lr_scale": "linear", "wd": 1e-5, "lr_schedule": "warmup-cosine",
               "warmup_epochs": 1, "epochs": 5, "output": "runs/demo-mocov3"},
}
GOAL_POINTS = 5.0  # the CPU demo passes when the final kNN is this far above the untrained one
MONITOR_SIZES = (5000, 1000)  # the per-epoch monitor: train images in the bank, test queries
# The GPU recipe on the CPU, tiny: a check that the path runs, not a result.
DRY_RUN: dict[str, Any] = {"device": "cpu", "train_subset": 64, "batch_size": 16, "moco_k": 64,
                           "stop_after_epochs": 2, "time_limit": 0.0, "workers": 0,
                           "output": "runs/demo-gpu-dry-run"}
DRY_RUN_KNN_SIZES = (256, 128)  # the dry run's kNN: bank and queries (the protocol's: 50k / 10k)
AUTHORS_CLOSE = 3.0  # points: "tracks the authors' log" within this
#: Under the epoch table: what its health columns are (docs/monitoring.md).
HEALTH_NOTE = ("  rank, std: health of the embeddings on a fixed sample of training images "
               "(effective rank;\n    std of the normalised embeddings x sqrt(d): 1 = spread "
               "out, 0 = collapsed); no labels needed.")
GRID_BANK = 5000  # the neighbour grids search a class-balanced subset of the training images
GRID_QUERIES, GRID_K = 8, 8  # the grids' rows (test images) and neighbours per row

# How the recipe differs from the authors' (--preset cifar10), in words.
LABELS = {"cifar_stem": "stem", "batch_size": "batch", "lr": "lr", "moco_k": "K",
          "moco_m": "m", "moco_t": "T", "mlp": "MLP head", "aug": "augmentation",
          "crop_min_scale": "crop scale from", "epochs": "epochs", "train_subset": "images",
          "cos_one_based": "1-based cosine (last epoch at lr 0)", "warmup_epochs": "warmup epochs",
          "wd": "wd", "bn_splits": "SplitBN splits", "mechanism": "mechanism",
          "knn_features": "kNN features", "symmetric": "symmetric loss", "moco_dim": "dim",
          "optimizer": "optimizer", "lr_schedule": "lr schedule",
          "zero_init_residual": "zero-init residual"}


def _show(key: str, value: Any) -> str:
    if key == "cifar_stem":
        return "CIFAR" if value else "ImageNet"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "train_subset":
        return f"{value:,}" if value else "all"
    return str(value)


def recipe_changes(cfg: MocoConfig) -> list[str]:
    """What ``cfg`` changes in the authors' CIFAR-10 recipe, e.g. ``"batch 128 (authors: 512)"``."""
    authors = build_config(preset="cifar10")
    changes = [f"{label} {_show(k, getattr(cfg, k))} (authors: {_show(k, getattr(authors, k))})"
               for k, label in LABELS.items() if getattr(cfg, k) != getattr(authors, k)]
    if cfg.batch_size != authors.batch_size and cfg.lr == authors.lr:
        changes.append(f"lr {cfg.lr:g} kept at batch {cfg.batch_size} (not scaled by "
                       f"{cfg.batch_size}/{authors.batch_size}: the pilots' choice)")
    return changes


Features = tuple[torch.Tensor, torch.Tensor]  # L2-normalised features [N, D], labels [N]


def _demo_log(line: str) -> None:
    """The run's lines, less the advice to scale the lr with the batch: the CPU recipe keeps
    lr 0.06 at batch 128 on purpose (the pilots of docs/demo.md) and says so in its recipe."""
    if not (line.startswith("warning: -b ") and "linear scaling rule" in line):
        print(line)


class DemoPretrainer(Pretrainer):
    """The library's training loop; its ``knn()`` hook (called before training and after every
    epoch when ``knn_every`` is 1) runs the demo's evaluations: the full protocol before
    training and after the last epoch (or after every epoch), and the monitor after every
    epoch. The kNN is the library's (``moco.knn``: the same features, precision, k and t as
    ``moco knn``); the demo runs in one process, never under torchrun."""

    def __init__(self, cfg: MocoConfig, *, monitor: tuple[int, int] | None,
                 full_every_epoch: bool, full_sizes: tuple[int, int] | None = None,
                 progress: bool = True) -> None:
        super().__init__(dataclasses.replace(cfg, knn_every=1), log=_demo_log,
                         progress=progress, overwrite=True)
        self.full_every_epoch = full_every_epoch
        self.full_sets: tuple[ImageSource, ImageSource] | None = None
        if self.knn_bank is not None and self.knn_query is not None:
            self.full_sets = (self.knn_bank, self.knn_query)
            if full_sizes:  # the dry run: subsets stand in for the protocol's sets
                self.full_sets = self._subsets(self.full_sets, full_sizes)[1]
        self.monitor_sets, self.monitor_index = None, None
        if monitor and self.full_sets is not None:
            self.monitor_index, self.monitor_sets = self._subsets(self.full_sets, monitor)
        self.monitor_top1: dict[int, float] = {}  # epoch (0 = random init) -> monitor kNN top-1
        self.queries: Features | None = None  # the last kNN's queries (the online probe's)
        self.full: dict[int, float] = {}  # epoch -> kNN top-1, full protocol
        self.eval_seconds = 0.0
        self.grids: dict[str, Grid] = {}  # "before" / "after" -> the neighbour grid drawn
        self.grid_bank: ImageSource | None = None  # the images the grids search

    @staticmethod
    def _subsets(sets: tuple[ImageSource, ImageSource], sizes: tuple[int, int]
                 ) -> tuple[tuple[list[int], list[int]], tuple[ImageSource, ImageSource]]:
        """Class-balanced subsets (fixed seed) of the bank and queries: indices and sources."""
        index = tuple(class_balanced_subset(src.labels or [], n, seed=0)
                      for src, n in zip(sets, sizes, strict=True))
        return (index[0], index[1]), (sets[0].subset(index[0]), sets[1].subset(index[1]))

    def set_sizes(self, which: str) -> tuple[int, int]:
        """(bank, queries) of the ``full`` protocol's or the ``monitor``'s kNN; (0, 0): none."""
        sets = self.full_sets if which == "full" else self.monitor_sets
        return (len(sets[0]), len(sets[1])) if sets is not None else (0, 0)

    def _features(self, source: ImageSource) -> Features:
        encoder = self.model.evaluation_encoder()  # the query encoder (MoCo v3: base encoder)
        net = strip_head(encoder) if self.cfg.knn_features == "backbone" else encoder
        return source_features(net, source, self.cfg.input_settings(), self.device, self.workers,
                               autocast_dtype=self.autocast_dtype, out_device=self.device)

    def _knn(self, bank: Features, query: Features) -> tuple[float, float]:
        return knn_accuracy(query[0], query[1], bank[0], bank[1], k=self.cfg.knn_k, t=self.cfg.knn_t)

    def knn(self) -> tuple[float, float] | None:
        s = self.state
        epoch = 0 if s.global_step == 0 else s.epoch + 1
        if self.full_sets is None:
            return None
        if epoch == 0:
            self.neighbours("before")  # the untrained network's grid
        t0 = time.perf_counter()
        full = None
        if epoch == 0 or self.full_every_epoch or epoch == self.cfg.epochs:
            bank, query = (self._features(src) for src in self.full_sets)
            full = self._knn(bank, query)
            self.full[epoch] = full[0]
            if self.monitor_index is not None:  # the monitor's images are among these
                ib, iq = (torch.tensor(i) for i in self.monitor_index)
                self.monitor_top1[epoch] = self._knn((bank[0][ib], bank[1][ib]),
                                                     (query[0][iq], query[1][iq]))[0]
            self.queries = query
        elif self.monitor_sets is not None:
            bank, query = (self._features(src) for src in self.monitor_sets)
            self.monitor_top1[epoch] = self._knn(bank, query)[0]
            self.queries = query
        self.eval_seconds += time.perf_counter() - t0
        return full

    def held_out_features(self) -> Features | None:
        """The queries of the last kNN (the online probe's held-out images), once."""
        queries, self.queries = self.queries, None
        return queries

    def neighbours(self, when: str) -> None:
        """The nearest-neighbour grid of the encoder as it is now, ``neighbours-{when}.png``
        in the run folder: the same :data:`GRID_QUERIES` test images (class-balanced, fixed)
        each followed by its :data:`GRID_K` nearest among :data:`GRID_BANK` training images
        (class-balanced, fixed), through the kNN's features."""
        if self.full_sets is None:
            return
        t0 = time.perf_counter()
        if self.grid_bank is None:  # the CPU monitor's bank when it has GRID_BANK images
            self.grid_bank = (self.monitor_sets[0] if self.monitor_sets is not None
                              and MONITOR_SIZES[0] == GRID_BANK else self.full_sets[0].subset(
                                  class_balanced_subset(self.full_sets[0].labels or [],
                                                        GRID_BANK, seed=0)))
        bank = self.grid_bank
        encoder = self.model.evaluation_encoder()  # the query encoder (MoCo v3: base encoder)
        net = strip_head(encoder) if self.cfg.knn_features == "backbone" else encoder
        options = NeighboursConfig(queries=GRID_QUERIES, k=GRID_K, workers=self.workers)
        r = retrieve(net, EvalSettings(self.cfg.input_settings(), self.cfg.precision), bank,
                     self.full_sets[1], self.device, options)
        path = self.run_dir / f"neighbours-{when}.png"
        state = "untrained network" if when == "before" else f"after {self.state.epoch} epochs"
        plot_grid(r.cells(), path, f"{state}: test images (blue) and their nearest of "
                  f"{len(bank):,} training images (green: same class)")
        self.grids[when] = Grid(path, len(bank), r.same_class_rate(), r.queries)
        self.eval_seconds += time.perf_counter() - t0


@dataclasses.dataclass
class Grid:
    """A neighbour grid drawn: its file, the images searched, the share of neighbours of
    their query's class (%), and the queries (indices of the test images)."""

    path: Path
    bank: int
    same_class: float | None
    queries: list[int]


@dataclasses.dataclass
class DemoRun:
    """What the demo measured: the run, its per-epoch figures and where time went."""

    cfg: MocoConfig
    result: PretrainResult
    monitor: dict[int, float]
    full: dict[int, float]
    wall_seconds: float
    eval_seconds: float
    precision: str
    full_sizes: tuple[int, int] = (50000, 10000)  # kNN bank (train) and queries (test)
    monitor_sizes: tuple[int, int] = MONITOR_SIZES
    grids: dict[str, Grid] = dataclasses.field(default_factory=dict)  # before / after

    def pairs(self, epoch: int) -> int:
        """Image pairs seen after ``epoch`` epochs (0 before training)."""
        return int(self.result.history[epoch - 1]["step"]) * self.cfg.batch_size if epoch else 0


def verdict_cpu(final: float | None, untrained: float | None, goal: float = GOAL_POINTS) -> str:
    """The CPU demo's one-line verdict: did kNN end ``goal`` points above random init?"""
    if final is None or untrained is None:
        return "VERDICT: no kNN figure (the data has no labeled test/ split): NOT passed"
    gain = final - untrained
    passed = gain >= goal
    return (f"VERDICT: kNN top-1 {final:.2f}% after training vs {untrained:.2f}% for the same "
            f"network untrained: {gain:+.2f} points -> {'PASSED' if passed else 'NOT passed'} "
            f"(the demo's goal: at least +{goal:g} points)")


def verdict_gpu(epoch: int, pairs: int, final: float | None, untrained: float | None) -> str:
    """The GPU demo's verdict: our kNN against the authors' log at the same pairs seen."""
    theirs = authors_knn_at(pairs)
    if final is None:
        return "VERDICT: no kNN figure (the data has no labeled test/ split)"
    text = f"VERDICT: kNN top-1 {final:.2f}% after {epoch} epochs ({pairs:,} pairs)"
    if untrained is not None:
        text += f", untrained {untrained:.2f}%"
    if theirs is None:
        return text + "; the authors' log starts after one of their epochs (49,664 pairs): no comparison"
    diff = final - theirs
    how = (f"tracks the authors' log (within {AUTHORS_CLOSE:g} points)" if abs(diff) <= AUTHORS_CLOSE
           else f"{'above' if diff > 0 else 'BELOW'} the authors' log by {abs(diff):.2f} points")
    return f"{text}; the authors' log at the same pairs: {theirs:.2f}% ({diff:+.2f}) -> {how}"


def _figure(h: dict[str, Any] | None, key: str, fmt: str) -> str:
    """A figure of an epoch's record, or "-" (before training, or not recorded)."""
    return format(h[key], fmt) if h and h.get(key) is not None else "-"


def epoch_table(run: DemoRun, gpu: bool) -> list[str]:
    """One line per epoch (0 = random initialisation): pairs seen, lr, loss, the health
    signals (effective rank, std x sqrt(d): :data:`HEALTH_NOTE`), kNN."""
    start = f"{'epoch':>5}  {'pairs seen':>11}  {'lr':>7}  {'loss':>6}  {'rank':>5}  {'std':>4}"
    if gpu:
        head = f"{start}  {'kNN top-1':>9}  {'authors (same pairs)':>20}"
    else:
        head = f"{start}  {'kNN monitor*':>12}  {'kNN full protocol':>17}"
    lines = [head]
    for epoch in range(len(run.result.history) + 1):
        h = run.result.history[epoch - 1] if epoch else None
        pairs = run.pairs(epoch)
        row = (f"{epoch:>5}  {pairs:>11,}  {_figure(h, 'lr', '.4f'):>7}  "
               f"{_figure(h, 'loss', '.3f'):>6}  {_figure(h, 'health_rank', '.1f'):>5}  "
               f"{_figure(h, 'health_std_ratio', '.2f'):>4}")
        full = run.full.get(epoch)
        full_txt = f"{full:.2f}" if full is not None else ""
        if epoch == 0 and full is not None:
            full_txt += " untrained"
        if gpu:
            theirs = authors_knn_at(pairs) if epoch else None
            lines.append(f"{row}  {full_txt:>9}  "
                         f"{f'{theirs:.2f}' if theirs is not None else '-':>20}")
        else:
            mon = run.monitor.get(epoch)
            lines.append(f"{row}  {f'{mon:.2f}' if mon is not None else '':>12}  {full_txt:>17}")
    return lines


def plot(run: DemoRun, path: Path, gpu: bool) -> Path:
    """kNN per epoch against the untrained network's line (and, on the GPU path, the authors')."""
    from moco.utils.runlog import plt  # matplotlib set up as the library does (Agg, cache folder)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    untrained = run.full.get(0)
    if gpu:
        xs = sorted(e for e in run.full if e > 0)
        ax.plot(xs, [run.full[e] for e in xs], "o-", color="tab:green", label="this run, kNN top-1")
        theirs = [(e, authors_knn_at(run.pairs(e))) for e in xs]
        pts = [(e, v) for e, v in theirs if v is not None]
        if pts:
            ax.plot([e for e, _ in pts], [v for _, v in pts], "s--", color="tab:purple",
                    label="the authors' log, same pairs seen")
        ax.set_xlabel("epoch")
    else:
        xs = sorted(run.monitor)
        ax.plot([run.pairs(e) / 1000 for e in xs], [run.monitor[e] for e in xs], "o-",
                color="tab:blue", label=f"monitor: {run.monitor_sizes[1]:,} test vs "
                f"{run.monitor_sizes[0]:,} train images")
        fe = sorted(run.full)
        ax.plot([run.pairs(e) / 1000 for e in fe], [run.full[e] for e in fe], "D",
                color="tab:green", markersize=9,
                label=f"full protocol: {run.full_sizes[1]:,} test vs {run.full_sizes[0]:,} train")
        ax.set_xlabel("image pairs seen (thousands)")
        if untrained is not None:
            ax.axhline(untrained + GOAL_POINTS, color="tab:red", linestyle="--", linewidth=1,
                       label=f"goal: untrained + {GOAL_POINTS:g} points")
    if untrained is not None:
        ax.axhline(untrained, color="gray", linestyle=":", label=f"untrained network ({untrained:.2f}%)")
    ax.set_ylabel(f"weighted kNN top-1 (%), k {run.cfg.knn_k}, t {run.cfg.knn_t}")
    ax.set_title("MoCo demo: kNN accuracy while training")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_demo(cfg: MocoConfig, *, gpu: bool, dry_run: bool = False,
             progress: bool = True) -> DemoRun:
    """Train ``cfg`` with the demo's kNN schedule and return what it measured."""
    t0 = time.perf_counter()
    try:
        trainer = DemoPretrainer(cfg, monitor=None if gpu else MONITOR_SIZES, full_every_epoch=gpu,
                                 full_sizes=DRY_RUN_KNN_SIZES if dry_run else None,
                                 progress=progress)
        result = trainer.run()  # its first kNN draws the grid "before"
        trainer.neighbours("after")
    finally:
        shutdown_distributed()
    dtype = resolve_precision(cfg.precision, trainer.device)
    return DemoRun(cfg, result, trainer.monitor_top1, trainer.full, time.perf_counter() - t0,
                   trainer.eval_seconds, {None: "fp32"}.get(dtype, str(dtype).replace("torch.", "")),
                   trainer.set_sizes("full"), trainer.set_sizes("monitor"), trainer.grids)


OPTIMIZER_NAMES = {"sgd": "SGD", "lars": "LARS", "adamw": "AdamW"}


def _schedule(cfg: MocoConfig) -> str:
    if cfg.lr_schedule != "auto":
        return cfg.lr_schedule
    return "cosine" if cfg.cos else "step"


def describe_recipe(cfg: MocoConfig, precision: str) -> list[str]:
    """The recipe in words, and what it changes in the authors' (``--preset cifar10``)."""
    images = f"{cfg.train_subset:,} images" if cfg.train_subset else "all training images"
    dictionary = {
        "moco": f"MoCo: momentum encoder (m {cfg.moco_m}) + queue of K {cfg.moco_k} keys",
        "end-to-end": f"end-to-end: the keys are the batch's other {cfg.batch_size - 1} views "
                      "through the query encoder, with gradients (no queue, no momentum encoder)",
        "memory-bank": f"memory bank: K {cfg.moco_k} keys drawn from a bank of every image",
        "mocov3": f"MoCo v3: momentum encoder (m {cfg.moco_m}"
                  f"{' -> 1, cosine' if cfg.moco_m_cos else ''}), the batch's other "
                  f"{cfg.batch_size - 1} keys, symmetric loss",
    }.get(cfg.mechanism, cfg.mechanism)
    recipe = (f"recipe: ResNet-18 ({'CIFAR' if cfg.cifar_stem else 'ImageNet'} stem), "
              f"{method_spec(cfg.mechanism).head(cfg)}, {dictionary}, T {cfg.moco_t}, "
              f"batch {cfg.batch_size}, {OPTIMIZER_NAMES.get(cfg.optimizer, cfg.optimizer)} "
              f"lr {cfg.lr} {_schedule(cfg)}, wd {cfg.wd}, {cfg.epochs} epochs x {images}, "
              f"augmentation {cfg.aug}, crop scale {cfg.crop_min_scale}-1, {precision}")
    lines = textwrap.wrap(recipe, width=86, initial_indent="  ", subsequent_indent="    ")
    changes = recipe_changes(cfg)
    if precision != "fp32":
        changes.append(f"{precision} autocast (authors: fp32)")
    lines.extend(textwrap.wrap("changed from the authors' recipe: " + ("; ".join(changes) or "nothing"),
                               width=86, initial_indent="  ", subsequent_indent="    "))
    return lines


def train_seconds(run: DemoRun) -> float:
    """Seconds spent in training steps (the epochs' kNN evaluations excluded)."""
    total, step = 0.0, 0
    for h in run.result.history:
        total += (int(h["step"]) - step) * run.cfg.batch_size / max(float(h["images_per_s"]), 1e-9)
        step = int(h["step"])
    return total


def report(run: DemoRun, gpu: bool, dry_run: bool) -> list[str]:
    """What the demo prints at the end: recipe, table, time, verdict, files."""
    cfg, hist = run.cfg, run.result.history
    rule = "=" * 88
    epochs = len(hist)
    out = [rule]
    if dry_run:
        out.append("GPU-recipe DRY RUN on the CPU with tiny sizes: a check of the code path, "
                   "NOT a result")
    if gpu:
        out.append(f"MoCo demo: the authors' CIFAR-10 recipe, {epochs} of its {cfg.epochs} epochs")
    else:
        how = {"moco": "", "mocov3": " with MoCo v3 (momentum encoder, no queue)"}.get(
            cfg.mechanism,
            f" with MoCo v1's {cfg.mechanism} mechanism (not the momentum encoder + queue)")
        out.append(f"MoCo demo: the authors' CIFAR-10 recipe{how}, scaled to a few CPU minutes")
    out.extend(describe_recipe(cfg, run.precision))
    out.append("")
    out.extend("  " + line for line in epoch_table(run, gpu))
    if not gpu:
        (mb, mq), (fb, fq) = run.monitor_sizes, run.full_sizes
        out.append(f"  * monitor: the same kNN on {mq:,} test vs {mb:,} train images (class-balanced, "
                   "fixed), cheaper per epoch.")
        out.append(f"    The full protocol (weighted kNN, k {cfg.knn_k}, t {cfg.knn_t}, all {fq:,} test "
                   f"vs all {fb:,} train images, {cfg.knn_features} features) runs before and after "
                   "training.")
    elif dry_run:
        out.append(f"  (dry run: kNN on {run.full_sizes[1]} test vs {run.full_sizes[0]} train "
                   "images, not the protocol)")
    if any(h.get("health_rank") is not None for h in hist):
        out.append(HEALTH_NOTE)
    ips = sorted(h["images_per_s"] for h in hist)
    out.append("")
    out.append(f"  time: {run.wall_seconds / 60:.1f} min ({run.wall_seconds:.0f} s): training "
               f"{train_seconds(run):.0f} s ({ips[len(ips) // 2] if ips else 0:.0f} img/s, median "
               f"epoch), kNN evaluations and grids {run.eval_seconds:.0f} s, the rest start-up and "
               "checkpoints")
    if run.result.stopped_early and gpu:
        out.append(f"  stopped after epoch {epochs} of {cfg.epochs} (the time limit, "
                   f"{cfg.time_limit:g} min; all {cfg.epochs}: --full)")
    final = run.full.get(epochs) if epochs else None
    untrained = run.full.get(0)
    out.append("  " + (verdict_gpu(epochs, run.pairs(epochs), final, untrained) if gpu
                       else verdict_cpu(final, untrained)))
    out.append(f"  plot:       {run.result.run_dir / 'demo.png'} (and the run's plot.png)")
    out.extend(grid_lines(run))
    out.append(f"  checkpoint: {run.result.checkpoint}")
    out.append(f"  metrics:    {run.result.run_dir / 'metrics.jsonl'} (TensorBoard: "
               f"{run.result.run_dir / 'tb'})")
    out.append(rule)
    return out


def grid_lines(run: DemoRun) -> list[str]:
    """The neighbour grids' files, and how many neighbours share their query's class."""
    before, after = run.grids.get("before"), run.grids.get("after")
    if before is None or after is None:
        return []
    lines = [f"  neighbours: {before.path} (untrained) and {after.path.name} (trained): "
             f"{GRID_QUERIES} test images, each with its {GRID_K} nearest of {after.bank:,} "
             "training images"]
    if before.same_class is not None and after.same_class is not None:
        lines.append(f"              neighbours of the query's class: {before.same_class:.0f}% "
                     f"untrained -> {after.same_class:.0f}% trained")
    return lines


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (values read as YAML: 128, 0.06, true, [1, 2]) to settings."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"demo: --set needs KEY=VALUE, got {item!r}")
        values[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return values


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="", help="CIFAR-10 folder: an ImageFolder (train/, test/) or "
                    "the python version's cifar-10-batches-py (default: $MOCO_DATA, else a copy "
                    "beside the checkout, else downloaded once into the user cache folder)")
    ap.add_argument("--output", default="", help="run folder (default: the recipe's)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    ap.add_argument("--full", action="store_true", help="GPU recipe: all 200 epochs, no time limit")
    ap.add_argument("--gpu-recipe-dry-run", action="store_true",
                    help="run the GPU recipe on the CPU with tiny sizes (a check, not a result)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change a setting of the recipe (repeatable), e.g. --set moco_k=256")
    ap.add_argument("--recipe", choices=("default", *CPU_RECIPES), default="default",
                    help="CPU only: mocov3 = the MoCo v3 pilot of docs/demo.md (momentum "
                    "encoder, no queue; 5 epochs, the CPU recipe's time) instead of end-to-end")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    show_on_stderr()  # the library's notices (decoding into the cache, ...), as `moco` shows them
    try:
        device = resolve_device(args.device)
        gpu = device.type == "cuda" or args.gpu_recipe_dry_run
        overrides: dict[str, Any] = {"device": args.device}
        if args.gpu_recipe_dry_run:
            overrides.update(DRY_RUN)
        if gpu and args.full:
            overrides["time_limit"] = 0.0
        if args.recipe != "default":
            if gpu:
                raise SystemExit("demo: --recipe is for the CPU demo (the GPU runs the authors' recipe)")
            overrides.update(CPU_RECIPES[args.recipe])
        overrides.update(parse_set(args.set))
        overrides["data"] = demo_data(args.data)
        if args.output:
            overrides["output"] = args.output
        cfg = build_config(yaml_path=GPU_CONFIG if gpu else CPU_CONFIG, overrides=overrides)
        run = run_demo(cfg, gpu=gpu, dry_run=args.gpu_recipe_dry_run,
                       progress=not args.no_progress)
    except MocoError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    plot(run, run.result.run_dir / "demo.png", gpu)
    print()
    print("\n".join(report(run, gpu, args.gpu_recipe_dry_run)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
