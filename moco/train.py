"""The pretraining loop: builds everything from a :class:`MocoConfig` and runs it.

The step does not care about device, precision or process count: those come in as a device,
an autocast dtype, an optional grad scaler and a :class:`KeyShuffle`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from moco.backbones import strip_head
from moco.checkpoint import (
    CheckpointError,
    atomic_save,
    check_finite,
    describe_contents,
    first_nonfinite,
    from_original_layout,
    load_checkpoint,
    model_state,
    remove_stale_temporaries,
    state_mismatch,
    to_original_layout,
)
from moco.config import RESUME_FREE, SPLIT_BN_MODES, MocoConfig, save_yaml
from moco.config_checks import check_buildable, check_staleness_images
from moco.data import DataError, ImageSource, class_balanced_subset, find_dataset, knn_splits
from moco.distributed import (
    DistContext,
    gather_shards,
    init_distributed,
    is_communication_error,
    make_key_shuffle,
    per_rank_batch,
    resolve_for_world,
    shard,
    shutdown_distributed,
    wrap_ddp,
)
from moco.errors import ConfigError, RunError
from moco.knn import extract_features, knn_accuracy
from moco.loader import Batch, TrainLoader, eval_batches, make_train_loader
from moco.machine import describe_machine
from moco.mechanisms import Mechanism, build_mechanism
from moco.model import MoCo, build_encoder
from moco.paths import check_output
from moco.runlock import RunLock
from moco.runlog import RunLog, read_metrics
from moco.runtime import (  # noqa: F401  (resolve_device, default_workers: re-exported)
    configure_backends,
    default_workers,
    needs_grad_scaler,
    precision_name,
    resolve_device,
    resolve_precision,
)
from moco.schedule import learning_rate
from moco.shuffle_bn import KeyShuffle
from moco.staleness import Staleness, measure_staleness
from moco.training_step import EpochMeter, StepResult, train_step  # noqa: F401  (re-exported)

Log = Callable[[str], None]
CHECKPOINT_GLOB = "checkpoint_*.pth.tar"
CHECKPOINT_FORMAT = 1  # version of the "moco" entry; a newer one is refused on resume


def build_model(cfg: MocoConfig, device: torch.device, num_samples: int | None = None) -> Mechanism:
    """Query encoder (+head, SplitBN if asked), key encoder copy and queue, seeded by ``cfg.seed``;
    or the ``cfg.mechanism`` end-to-end / memory-bank module (``moco/mechanisms.py``; the memory
    bank needs ``num_samples``, the training-set size)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        encoder = build_encoder(cfg.arch, cfg.moco_dim, mlp=cfg.mlp, cifar_stem=cfg.cifar_stem,
                                bn_splits=cfg.bn_splits if cfg.shuffle_bn in (*SPLIT_BN_MODES, "auto") else 1)
    model: Mechanism
    if cfg.mechanism == "moco":
        model = MoCo(encoder, dim=cfg.moco_dim, k=cfg.moco_k, m=cfg.moco_m, t=cfg.moco_t,
                     symmetric=cfg.symmetric, generator=torch.Generator().manual_seed(cfg.seed + 1))
    else:
        model = build_mechanism(cfg, encoder, num_samples)
    model = model.to(device)
    if cfg.compile:  # the encoders; the queue, shuffles and momentum update stay eager
        for child in model.children():
            child.compile()
    if cfg.channels_last_on(device.type):
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(cfg: MocoConfig, model: Mechanism) -> torch.optim.SGD:
    """SGD over f_q only (f_k is trained by momentum); wd on every tensor, as the original."""
    return torch.optim.SGD(model.encoder_q.parameters(), lr=cfg.effective_lr, momentum=cfg.momentum,
                           weight_decay=cfg.wd)


def epoch_lr(cfg: MocoConfig, epoch: int) -> float:
    e = epoch + 1 if cfg.cos_one_based else epoch
    return learning_rate(cfg.effective_lr, e, cfg.epochs, cos=cfg.cos, milestones=cfg.schedule,
                         warmup_epochs=cfg.warmup_epochs)


@dataclass
class TrainState:
    """Where the run is: epoch (finished epochs), step inside the current epoch, global step,
    the current epoch's running sums and the per-epoch history."""

    epoch: int = 0
    epoch_step: int = 0
    global_step: int = 0
    loss_sum: float = 0.0
    acc_sum: float = 0.0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    knn_random_init: float | None = None


@dataclass
class PretrainResult:
    run_dir: Path
    checkpoint: Path
    history: list[dict[str, Any]]
    knn_random_init: float | None
    stopped_early: bool = False


class _StopFlag:
    """Set by SIGTERM/SIGINT: the loop finishes the current step, saves and exits. A second
    SIGINT (Ctrl-C twice) does not wait: it raises KeyboardInterrupt at once (saves are atomic,
    so the newest checkpoint stays whole)."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum


def _existing_run(run_dir: Path) -> bool:
    return any((run_dir / n).exists() for n in ("config.yaml", "metrics.jsonl")) or any(
        run_dir.glob(CHECKPOINT_GLOB))


_CKPT_NAME = re.compile(r"checkpoint_(\d+)(?:_step(\d+))?\.pth\.tar$")


def _checkpoint_age(p: Path) -> tuple[int, int, int]:
    """Sort key, oldest first: modification time, then the training position in the name (a
    tie-break for saves within one tick of a coarse file-system clock). ``checkpoint_0003``
    (0-based epoch 3 finished) is position (4, 0); ``checkpoint_0004_step000010`` is (4, 10)."""
    m = _CKPT_NAME.search(p.name)
    pos = (0, 0)
    if m:
        pos = (int(m[1]), int(m[2])) if m[2] is not None else (int(m[1]) + 1, 0)
    try:
        mtime = p.stat().st_mtime_ns
    except OSError:
        mtime = 0
    return mtime, *pos


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints in ``run_dir``, oldest first."""
    return sorted(run_dir.glob(CHECKPOINT_GLOB), key=_checkpoint_age)


def resume_auto_choice(run_dir: Path, log: Log) -> tuple[Path, dict[str, Any]] | tuple[None, None]:
    """``--resume auto``'s checkpoint, loaded: the newest readable one (newer truncated or
    corrupt files are passed over, with a log line), or (None, None) when ``run_dir`` holds
    no checkpoint at all. A checkpoint that cannot be opened (permissions), a folder whose
    checkpoints all fail to load, or a newest one with NaN/Inf weights is a
    :class:`CheckpointError`: a run is never restarted from scratch over files that exist."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return None, None
    failures: list[str] = []
    for p in reversed(ckpts):
        if not os.access(p, os.R_OK):
            raise CheckpointError(f"--resume auto: cannot read {p} (permission denied); fix its "
                                  "permissions (chmod u+r) and run again; nothing was changed")
        try:
            ckpt = load_checkpoint(p)
        except CheckpointError as e:
            failures.append(str(e))
            log(f"--resume auto: skipping {p}: {e}")
            continue
        bad = first_nonfinite(model_state(ckpt, p)) if isinstance(ckpt.get("state_dict"), dict) else None
        if bad is not None:
            good, _ = newest_finite_checkpoint(run_dir)
            fix = f"resume from {good} with --resume {good}" if good else "start again"
            raise CheckpointError(f"--resume auto: the newest readable checkpoint {p} holds "
                                  f"NaN/Inf weights ({bad[0]}): the run had diverged; {fix}")
        return p, ckpt
    raise CheckpointError(
        f"--resume auto: cannot read any of the {len(ckpts)} checkpoint(s) in {run_dir} "
        f"({failures[0]}); nothing was changed: repair or move them away to start from "
        "scratch")


def newest_finite_checkpoint(run_dir: Path) -> tuple[Path | None, Path | None]:
    """(the newest checkpoint of ``run_dir`` that loads and whose weights are all finite,
    the newest checkpoint file): what a divergence message may call good."""
    ckpts = list_checkpoints(run_dir)
    for p in reversed(ckpts):
        try:
            ckpt = load_checkpoint(p)
            if first_nonfinite(model_state(ckpt, p)) is None:
                return p, ckpts[-1]
        except CheckpointError:
            continue
    return None, ckpts[-1] if ckpts else None


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint in ``run_dir`` that loads (``--resume auto``): a truncated or
    corrupt newer file is passed over for the previous valid one."""
    for p in reversed(list_checkpoints(run_dir)):
        try:
            load_checkpoint(p)
            return p
        except CheckpointError:
            continue
    return None


class Pretrainer:
    """Owns one pretraining run. ``run()`` trains to ``cfg.epochs`` and returns the result."""

    def __init__(self, cfg: MocoConfig, *, log: Log = print, progress: bool = True,
                 overwrite: bool = False, dist: DistContext | None = None) -> None:
        cfg.validate()
        check_output(cfg.output, "--output", folders={"the data folder": cfg.data})
        self.lock: RunLock | None = None  # the run folder's lock (rank 0, from _prepare_run_dir)
        self.device = resolve_device(cfg.device)
        self.dist = dist if dist is not None else init_distributed(self.device, cfg.dist_timeout)
        self.device = self.dist.local_device(self.device)
        configure_backends(self.device)
        self.machine = describe_machine(self.device)  # named in every epoch record
        # --shuffle-bn auto resolved (ddp under torchrun, split on one process) after checking
        # that -b (the global batch) splits evenly over the ranks and that every rank got the
        # same settings. self.cfg keeps the requested mode: N processes' runs resume on M.
        self.shuffle_bn = resolve_for_world(cfg, self.dist, self.device)
        if cfg.staleness_every and self.dist.world_size > 1:
            raise ConfigError("--staleness-every is a single-process diagnostic; run it without "
                              "torchrun, or drop it (it has no effect on the training)")
        self.cfg = cfg
        self.log: Log = log if self.dist.is_main else (lambda _msg: None)
        self.progress = progress and self.dist.is_main
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        self.run_dir = Path(cfg.output)
        self.last_checkpoint: Path | None = None  # the newest checkpoint this run wrote or read
        splits = find_dataset(cfg.data, cfg.on_bad_image, cfg.cache_dir or None)
        self.train_source: ImageSource = splits.train
        if cfg.train_subset:
            if not splits.train.labeled:
                raise DataError("--train-subset needs a labeled train/ folder (it is class-balanced)")
            idx = class_balanced_subset(splits.train.labels or [], cfg.train_subset, cfg.seed)
            self.train_source = splits.train.subset(idx)
        # The same check of the splits as `moco knn` (classes that differ are an error).
        pair = knn_splits(splits, cfg.data, required=False, hint=", or pass --knn-every 0 to "
                          "pretrain without the kNN monitor") if cfg.knn_every > 0 else None
        self.knn_bank = splits.train if splits.train.labeled else None
        self.knn_query = pair[1] if pair is not None else None
        check_buildable(cfg, self.shuffle_bn, self.dist.world_size, len(self.train_source))
        self.model = build_model(dataclasses.replace(cfg, shuffle_bn=self.shuffle_bn), self.device,
                                 num_samples=len(self.train_source))
        self.optimizer = build_optimizer(cfg, self.model)
        # The module the training step calls: DDP-wrapped under torchrun. self.model stays the
        # bare MoCo, so checkpoints carry no DDP "module." prefix of their own.
        self.train_model: nn.Module = wrap_ddp(self.model, self.dist, self.device,
                                               sync_bn=self.shuffle_bn == "syncbn")
        self.scaler = (torch.amp.GradScaler("cuda")
                       if needs_grad_scaler(self.autocast_dtype) else None)
        self._meter: EpochMeter | None = None  # the current epoch's sums, on the device
        self._knn_sources: tuple[ImageSource, ImageSource, int, int] | None = None
        self.shuffle_rng = torch.Generator().manual_seed(cfg.seed + 2)
        self.shuffle: KeyShuffle = make_key_shuffle(self.shuffle_bn, self.dist, self.shuffle_rng)
        self.state = TrainState()
        self.workers = cfg.workers if cfg.workers >= 0 else default_workers(self.device, self.dist.local_world_size)
        # The loader's batch is this process's slice of the global batch.
        self.train_loader: TrainLoader = make_train_loader(
            dataclasses.replace(cfg, batch_size=per_rank_batch(cfg.batch_size, self.dist.world_size)),
            self.train_source, self.device, self.workers, self.dist.rank, self.dist.world_size)
        steps = self.train_loader.steps()  # batch larger than the dataset: fail now, not after kNN
        check_staleness_images(cfg, steps * cfg.batch_size)
        # The checkpoint to resume is read and checked before anything is written.
        resume_from = self._read_resume(cfg.resume) if cfg.resume else None
        # Every input is checked above, before the run folder is touched (--overwrite deletes).
        self.dist.on_main(lambda: self._prepare_run_dir(overwrite))  # one writer, holds the lock
        try:
            self.runlog = RunLog(self.run_dir, enabled=self.dist.is_main)
            if cfg.resume:
                self._resume(resume_from)
            if self.dist.is_main:
                _replace_file(self.run_dir / "config.yaml", lambda tmp: save_yaml(cfg, tmp))
        except BaseException:
            self.close()  # no TensorBoard writer thread, no lock left behind
            raise

    def close(self) -> None:
        """Close the run's logs and release the run folder's lock (``run()`` does it)."""
        if getattr(self, "runlog", None) is not None:
            self.runlog.close()
        if self.lock is not None:
            self.lock.release()

    # ----- run folder and checkpoints -------------------------------------------------------
    def _prepare_run_dir(self, overwrite: bool) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise RunError(f"cannot write to the output folder {self.run_dir}: {e.strerror}; "
                           "choose another --output") from None
        self.lock = RunLock(self.run_dir, log=self.log).acquire()  # a second process refuses
        if _existing_run(self.run_dir) and not self.cfg.resume and not overwrite:
            self.lock.release()
            raise RunError(
                f"{self.run_dir} already holds a run; pass --resume auto to continue it, "
                "--overwrite to replace it, or choose another --output")
        remove_stale_temporaries(self.run_dir, CHECKPOINT_GLOB)  # left by a kill mid-save
        if _existing_run(self.run_dir) and not self.cfg.resume:
            for p in (list(self.run_dir.glob(CHECKPOINT_GLOB)) + [self.run_dir / "metrics.jsonl"]
                      + list(self.run_dir.glob("tb/events.out.tfevents.*"))):
                p.unlink(missing_ok=True)

    def checkpoint_dict(self) -> dict[str, Any]:
        s = self.state
        return {
            "epoch": s.epoch,
            "arch": self.cfg.arch,
            "state_dict": to_original_layout(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "moco": {
                "format": CHECKPOINT_FORMAT,
                "config": self.cfg.to_dict(),
                "epoch_step": s.epoch_step,
                "global_step": s.global_step,
                "partial": {"loss_sum": s.loss_sum, "acc_sum": s.acc_sum, "seconds": s.seconds},
                "knn_random_init": s.knn_random_init,
                "shuffle_rng": self.shuffle_rng.get_state(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": _global_rng_state(),
                "bad_images": sorted(getattr(self.train_loader, "bad_images", ())),
                # where a streaming loader is in its epoch (tar shards' layout), if it keeps it
                "loader": getattr(self.train_loader, "state_dict", dict)(),
            },
        }

    def save(self) -> Path:
        s = self.state
        # Original naming: 0-based index of the epoch the state belongs to.
        name = f"checkpoint_{max(s.epoch - 1, 0) if s.epoch_step == 0 else s.epoch:04d}"
        if s.epoch_step:
            name += f"_step{s.epoch_step:06d}"
        path = self.run_dir / f"{name}.pth.tar"
        # Rank 0 writes; the others wait for it (and fail with it), so none races ahead.
        try:
            self.dist.on_main(lambda: atomic_save(self.checkpoint_dict(), path))
        except OSError as e:  # disk full, folder removed, quota, I/O error
            kept = (f"the previous checkpoint {self.last_checkpoint} is intact"
                    if self.last_checkpoint is not None else "no checkpoint was saved before")
            raise RunError(f"cannot save the checkpoint {path}: {e.strerror or e}; {kept}. Free "
                           "space (or fix the folder) and continue with --resume auto") from None
        self.last_checkpoint = path
        return path

    def _read_resume(self, resume: str) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint ``--resume`` names, loaded and checked (format, kind, architecture,
        finite weights), or None for ``auto`` in a folder without any checkpoint. Rank 0 picks
        the file of ``auto`` and every rank loads that one; an error reaches every rank."""
        ckpt: dict[str, Any] | None = None
        if resume == "auto":
            found: tuple[Path | None, str] = (None, "")
            if self.dist.is_main:
                try:
                    path, ckpt = resume_auto_choice(self.run_dir, self.log)
                    found = (path, "")
                except CheckpointError as e:
                    found = (None, str(e))
            chosen, error = self.dist.broadcast_object(found)
            if error:
                raise CheckpointError(error)
            if chosen is None:
                return None
            path = chosen
        else:
            path = Path(resume)
        if ckpt is None:
            ckpt = load_checkpoint(path)
        ours = ckpt.get("moco", {})
        if not isinstance(ours, dict) or int(ours.get("format", 1)) > CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} was written by a newer moco (checkpoint format "
                                  f"{ours.get('format') if isinstance(ours, dict) else '?'}); "
                                  "upgrade moco to resume it")
        arch = ckpt.get("arch")
        if arch is not None and arch != self.cfg.arch:
            raise CheckpointError(f"{path} is a {arch} checkpoint but --arch is {self.cfg.arch}")
        kind = describe_contents(ckpt)
        if ours.get("kind") == "lincls" or kind != "a MoCo pretraining checkpoint":
            raise CheckpointError(f"{path} is {kind}, not a pretraining checkpoint: --resume "
                                  "takes a checkpoint_NNNN.pth.tar written by moco pretrain (or "
                                  "main_moco.py); to start from a backbone, train from scratch")
        check_finite(model_state(ckpt, path), path, "model")
        return path, ckpt

    def _resume(self, found: tuple[Path, dict[str, Any]] | None) -> None:
        if found is None:
            self.log(f"--resume auto: no checkpoint in {self.run_dir}, starting from scratch")
            if self.dist.is_main:  # epochs logged by an attempt killed before its first save
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            return
        path, ckpt = found
        ours = ckpt.get("moco", {})
        _warn_config_changes(ours.get("config"), self.cfg, path, self.log)
        state = from_original_layout(model_state(ckpt, path))
        try:
            self.model.load_state_dict(state)
        except RuntimeError:
            raise CheckpointError(
                f"{path} does not match this model ({self.cfg.arch}, mlp={self.cfg.mlp}, "
                f"dim={self.cfg.moco_dim}, K={self.cfg.moco_k}): "
                f"{state_mismatch(self.model, state)}") from None
        if "optimizer" in ckpt:
            self.optimizer.load_state_dict(_query_only_optimizer_state(ckpt["optimizer"], self.optimizer))
        s = self.state
        s.epoch = int(ckpt.get("epoch", 0))
        s.epoch_step = int(ours.get("epoch_step", 0))
        s.global_step = int(ours.get("global_step", 0))
        partial = ours.get("partial", {})
        s.loss_sum, s.acc_sum = partial.get("loss_sum", 0.0), partial.get("acc_sum", 0.0)
        s.seconds = partial.get("seconds", 0.0)
        s.knn_random_init = ours.get("knn_random_init")
        if "shuffle_rng" in ours:
            self.shuffle_rng.set_state(ours["shuffle_rng"])
        if self.scaler is not None and ours.get("scaler"):
            self.scaler.load_state_dict(ours["scaler"])
        if ours.get("rng"):
            _set_global_rng_state(ours["rng"])
        if hasattr(self.train_loader, "bad_images"):
            self.train_loader.bad_images = set(ours.get("bad_images", []))
        if hasattr(self.train_loader, "load_state_dict"):
            self.train_loader.load_state_dict(ours.get("loader", {}), s.epoch_step)
        self.last_checkpoint = path
        if self.dist.is_main:  # the other ranks keep no history: they log nothing
            s.history = [h for h in read_metrics(self.run_dir / "metrics.jsonl") if h["epoch"] <= s.epoch]
            text = "".join(json.dumps(h) + "\n" for h in s.history)
            _replace_file(self.run_dir / "metrics.jsonl", lambda tmp: tmp.write_text(text))
        self.log(f"resumed from {path}: epoch {s.epoch}, step {s.epoch_step} of the next epoch")

    def _prune(self) -> None:
        """Keep the newest ``cfg.keep_last`` checkpoints (0 keeps all)."""
        if self.cfg.keep_last <= 0 or not self.dist.is_main:
            return
        ckpts = list_checkpoints(self.run_dir)
        for p in ckpts[: -self.cfg.keep_last]:
            if p != self.last_checkpoint:
                p.unlink(missing_ok=True)

    # ----- evaluation ---------------------------------------------------------------------
    def _eval_batches(self, source: ImageSource) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return eval_batches(self.cfg, source, self.device, self.workers)

    def _knn_monitor(self) -> tuple[ImageSource, ImageSource, int, int] | None:
        """The monitor's bank and queries (class-balanced subsets when --knn-bank-images /
        --knn-query-images ask: the ImageNet presets' cheap monitor), this rank's shard of each,
        and their full sizes. Built once (the decoded-image cache is per source object)."""
        if self._knn_sources is None and self.knn_bank is not None and self.knn_query is not None:
            cfg, world, rank = self.cfg, self.dist.world_size, self.dist.rank
            parts, sizes = [], []
            for src, n in ((self.knn_bank, cfg.knn_bank_images), (self.knn_query, cfg.knn_query_images)):
                if 0 < n < len(src):
                    src = src.subset(class_balanced_subset(src.labels or [], n, cfg.seed))
                sizes.append(len(src))
                # Every rank extracts every world-th image; gathered in order afterwards.
                parts.append(src.subset(shard(len(src), rank, world)) if len(src) >= world else src)
            self._knn_sources = (parts[0], parts[1], sizes[0], sizes[1])
            if sizes != [len(self.knn_bank), len(self.knn_query)]:
                self.log(f"kNN monitor: class-balanced subsets, {sizes[0]} of the "
                         f"{len(self.knn_bank)} train images as the bank, {sizes[1]} of the "
                         f"{len(self.knn_query)} val/test images as queries")
        return self._knn_sources

    def knn(self) -> tuple[float, float] | None:
        """Weighted kNN top-1/top-5 of the test split (or its subset) against the train split's
        (or its subset's) features, computed on the device.

        Under torchrun every rank extracts the features of its share of the images with rank
        0's BN statistics (rank 0's f_q is the one saved) and all get the same result: no rank
        waits for another's evaluation (which, at ImageNet scale, could pass --dist-timeout).
        """
        sources = self._knn_monitor()
        if sources is None:
            return None
        bank_src, query_src, n_bank, n_query = sources
        encoder = self.model.encoder_q
        self.dist.broadcast_buffers(encoder)
        net = strip_head(encoder) if self.cfg.knn_features == "backbone" else encoder
        dt, dev = self.autocast_dtype, self.device
        feats = []
        for src, n in ((bank_src, n_bank), (query_src, n_query)):
            f, y = extract_features(net, self._eval_batches(src), dev, autocast_dtype=dt,
                                    out_device=dev)
            feats.append((gather_shards(f, n), gather_shards(y, n)) if len(src) < n else (f, y))
        (bank, bank_labels), (query, query_labels) = feats
        return knn_accuracy(query, query_labels, bank, bank_labels,
                            k=self.cfg.knn_k, t=self.cfg.knn_t)

    def staleness(self, epoch: int) -> Staleness:
        """The queue's keys against fresh ones on the model as it is (moco.staleness)."""
        assert isinstance(self.model, MoCo), "validated: --staleness-every needs --mechanism moco"
        seed = self.cfg.seed * 1_000_003 + epoch + 3  # a generator no training shuffle uses
        return measure_staleness(
            self.model, self.train_loader,
            lambda: make_key_shuffle(self.shuffle_bn, self.dist, torch.Generator().manual_seed(seed)),
            batches=self.cfg.staleness_batches, epoch=epoch, autocast_dtype=self.autocast_dtype)

    # ----- training -----------------------------------------------------------------------
    def run(self) -> PretrainResult:
        cfg, s = self.cfg, self.state
        stop = _StopFlag()
        # Signal handlers can only be set from the main thread (a run in a thread has none).
        old_handlers = ({sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
                        if threading.current_thread() is threading.main_thread() else {})
        ckpt_path: Path | None = None
        try:
            self.log(self.describe())
            if s.epoch == 0 and s.epoch_step == 0 and cfg.knn_every > 0 and s.knn_random_init is None:
                r = self.knn()
                if r is not None:
                    s.knn_random_init = r[0]
                    self.log(f"kNN top-1 of the randomly initialised network: {r[0]:.2f}%")
                elif self.knn_bank is None:
                    self.log("train/ is unlabeled: kNN evaluation is skipped")
                else:
                    self.log("no labeled val/ or test/ split: kNN evaluation is skipped")
            first_epoch, t_start = s.epoch, time.perf_counter()
            while s.epoch < cfg.epochs:
                if self._budget_spent(first_epoch, t_start):
                    ckpt_path = newest_checkpoint(self.run_dir) if ckpt_path is None else ckpt_path
                    if ckpt_path is None:
                        ckpt_path = self.save()
                    self.log(f"stopped after epoch {s.epoch} of {cfg.epochs} "
                             f"({self._budget_text()}); saved {ckpt_path}\n{self.resume_hint()}")
                    return PretrainResult(self.run_dir, ckpt_path, s.history, s.knn_random_init, True)
                self._train_epoch(stop)
                if self._stop_agreed(stop):
                    ckpt_path = self.save()
                    self._prune()
                    self.log(f"stopped by signal {stop.signal} at epoch {s.epoch + 1} step "
                             f"{s.epoch_step}; saved {ckpt_path}\n{self.resume_hint()}")
                    return PretrainResult(self.run_dir, ckpt_path, s.history, s.knn_random_init, True)
                ckpt_path = self.save()
                self._prune()
            if ckpt_path is None:
                ckpt_path = newest_checkpoint(self.run_dir) or self.save()
            return PretrainResult(self.run_dir, ckpt_path, s.history, s.knn_random_init)
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            self.close()

    def _budget_spent(self, first_epoch: int, t_start: float) -> bool:
        """Whether ``--stop-after-epochs`` or ``--time-limit`` ends this invocation before the
        next epoch (the schedule still spans ``--epochs``). The time limit is judged on whole
        epochs: stop when one more epoch as long as the mean so far would pass it."""
        cfg, s = self.cfg, self.state
        if cfg.stop_after_epochs and s.epoch >= cfg.stop_after_epochs:
            return True
        done = s.epoch - first_epoch
        if cfg.time_limit and done > 0:
            elapsed = time.perf_counter() - t_start
            return elapsed + elapsed / done > cfg.time_limit * 60
        return False

    def _budget_text(self) -> str:
        cfg = self.cfg
        if cfg.stop_after_epochs and self.state.epoch >= cfg.stop_after_epochs:
            return f"--stop-after-epochs {cfg.stop_after_epochs}"
        return f"another epoch would pass --time-limit {cfg.time_limit:g} min"

    def _train_epoch(self, stop: _StopFlag) -> None:
        cfg, s = self.cfg, self.state
        lr = epoch_lr(cfg, s.epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        steps = self.train_loader.steps()
        batches = self._stop_on_bad_data(self.train_loader.batches(s.epoch, s.epoch_step))
        bar = tqdm(total=steps, initial=s.epoch_step, desc=f"epoch {s.epoch + 1}/{cfg.epochs}",
                   disable=not self.progress, dynamic_ncols=True, leave=False)
        t0 = time.perf_counter()
        seconds_before = s.seconds
        self._meter = meter = EpochMeter(self.device, s.loss_sum, s.acc_sum)
        # Nothing is read back from the device between log points (moco.training_step); under
        # torchrun the ranks agree on a stop request at log points only (an all-reduce).
        for batch in batches:
            r = train_step(self.train_model, self.optimizer, batch, self.shuffle,
                           self.autocast_dtype, self.scaler)
            meter.add(r, s.global_step + 1)
            s.epoch_step += 1
            s.global_step += 1
            s.seconds = seconds_before + time.perf_counter() - t0
            bar.update(1)
            log_point = s.global_step % cfg.print_freq == 0
            saving = bool(cfg.save_every_steps and s.global_step % cfg.save_every_steps == 0
                          and s.epoch_step < steps)
            stopping = (log_point or not self.dist.enabled) and self._stop_agreed(stop)
            if log_point or saving or stopping:
                self._read_meter()  # raises if a step diverged: nothing is saved after it
            if log_point:
                done = s.epoch_step
                ips = (done * cfg.batch_size) / max(s.seconds, 1e-9)
                bar.set_postfix(loss=f"{s.loss_sum / done:.3f}", acc1=f"{s.acc_sum / done:.1f}",
                                img_s=f"{ips:.0f}", lr=f"{lr:.4g}")
                self.runlog.scalar("step/loss", float(r.loss), s.global_step)
                self.runlog.scalar("step/acc1", float(r.acc1), s.global_step)
            if stopping:
                bar.close()
                return
            if saving:
                self.save()
                self._prune()
        bar.close()
        self._read_meter()
        s.seconds = seconds_before + time.perf_counter() - t0  # the GPU's work included
        self._meter = None
        n = s.epoch_step
        train_seconds = s.seconds
        knn = None
        if cfg.knn_every > 0 and ((s.epoch + 1) % cfg.knn_every == 0 or s.epoch + 1 == cfg.epochs):
            knn = self.knn()
        stale = None
        if cfg.staleness_every > 0 and (s.epoch + 1) % cfg.staleness_every == 0:
            stale = self.staleness(s.epoch)
        record = {
            "epoch": s.epoch + 1, "step": s.global_step, "loss": s.loss_sum / n,
            "acc1": s.acc_sum / n, "lr": lr, "knn_top1": knn[0] if knn else None,
            "knn_top5": knn[1] if knn else None,
            "images_per_s": n * cfg.batch_size / max(train_seconds, 1e-9),
            "seconds": time.perf_counter() - t0 + seconds_before,
            "knn_random_init": s.knn_random_init,
            "machine": self.machine,
            **(stale.as_record() if stale else {}),
        }
        bad = getattr(self.train_loader, "bad_images", None)
        if bad is not None:  # distinct unreadable images replaced so far (--on-bad-image skip)
            record["bad_images"] = len(bad)
            if bad:
                self.log(f"--on-bad-image skip: {len(bad)} unreadable image(s) replaced so far, "
                         f"e.g. {self._source_name(min(bad))}")
        s.history.append(record)
        self.runlog.epoch(record, s.history)
        knn_txt = f", kNN top-1 {knn[0]:.2f}%" if knn else ""
        if stale:
            knn_txt += f", loss vs queue / fresh keys {stale.queue_loss:.3f} / {stale.fresh_loss:.3f}"
        self.log(f"epoch {s.epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f}, pretext acc@1 "
                 f"{record['acc1']:.1f}%{knn_txt}, {record['images_per_s']:.0f} img/s, "
                 f"{record['seconds']:.0f} s")
        s.epoch += 1
        s.epoch_step = 0
        s.loss_sum = s.acc_sum = s.seconds = 0.0

    def _read_meter(self) -> None:
        """Bring the epoch's sums from the device into ``self.state`` (a log point: the host
        waits for the device); a step whose loss was not finite stops the run, naming it."""
        if self._meter is None:
            return
        s = self.state
        bad = self._meter.divergence()
        if bad is not None:
            epoch_step = bad.global_step - (s.global_step - s.epoch_step)
            raise RunError(self._diverged(bad.loss, epoch_step, bad.global_step))
        s.loss_sum, s.acc_sum = self._meter.sums()

    def _diverged(self, loss: float, epoch_step: int, global_step: int) -> str:
        """What diverged, where, and which checkpoint (if any) holds finite weights."""
        s = self.state
        bad = first_nonfinite(self.model.state_dict())
        weights = (f"; after that step {bad[0]} holds {bad[1]} NaN/Inf value(s)" if bad else "")
        if not self.dist.is_main:
            kept = "rank 0 names the checkpoint to resume from"
        else:
            good, newest = newest_finite_checkpoint(self.run_dir)
            if good is None:
                kept = f"no checkpoint with finite weights was saved in {self.run_dir}"
            elif good == newest:
                kept = (f"the newest checkpoint, {good}, has finite weights and is kept: "
                        "continue with --resume auto")
            else:
                kept = (f"the newest checkpoint with finite weights is {good} ({newest} already "
                        f"holds NaN/Inf): continue with --resume {good}")
        return (f"the training loss (InfoNCE) became {loss} at epoch {s.epoch + 1}, step "
                f"{epoch_step} (global step {global_step}){weights}: training "
                f"diverged and was stopped; {kept}. Lower --lr (now {self.cfg.lr:g}) or check "
                "the data, or start again")

    def _source_name(self, index: int) -> str:
        files = self.train_source.files
        if files is None and hasattr(self.train_source, "sample_name"):  # a tar shard member
            return str(self.train_source.sample_name(index))
        return str(files[index]) if files is not None else f"image {index}"

    def resume_hint(self) -> str:
        """The command that continues this run (the run folder's config.yaml holds the rest)."""
        return (f"resume with: moco pretrain {shlex.quote(str(self.cfg.data))} --output "
                f"{shlex.quote(str(self.run_dir))} --resume auto")

    def _stop_on_bad_data(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """The loader's batches; an unreadable image (``--on-bad-image stop``) saves the steps
        done so far before the DataError goes up, so a rerun with ``--on-bad-image skip
        --resume auto`` loses nothing."""
        try:
            yield from batches
        except DataError as e:
            where = ""
            self._read_meter()  # the steps done so far, into the checkpoint
            if self.state.global_step > 0 and not self.dist.enabled:
                where = (f"; the {self.state.global_step} steps done are saved in {self.save()}: "
                         "continue with --resume auto")
            raise DataError(f"{e}{where}") from None

    def _stop_agreed(self, stop: _StopFlag) -> bool:
        """Whether any rank has been asked to stop. Every rank gets the same answer at the same
        step (an all-reduce under torchrun), so all of them stop there and rank 0 saves."""
        agreed = self.dist.agree_signal(stop.signal)
        if agreed is not None:
            stop.signal = agreed
        return agreed is not None

    def _dictionary(self) -> str:
        """The negatives of each query, as the mechanism draws them (MoCo v1 Figure 2)."""
        cfg = self.cfg
        if cfg.mechanism == "end-to-end":
            return f"dictionary = the batch's other {cfg.batch_size - 1} keys"
        if cfg.mechanism == "memory-bank":
            return (f"K {cfg.moco_k} sampled from a bank of {len(self.train_source)}, bank "
                    f"momentum {cfg.bank_momentum}")
        return f"K {cfg.moco_k}, m {cfg.moco_m}"

    def describe(self) -> str:
        cfg = self.cfg
        prec = precision_name(self.autocast_dtype)
        w = self.dist.world_size
        procs = f" = {w} processes x {cfg.batch_size // w} ({self.dist.backend})" if w > 1 else ""
        lr = (f"lr {cfg.effective_lr:.6g} (--lr {cfg.lr:g} x {cfg.batch_size}/256, --lr-scale linear)"
              if cfg.lr_scale == "linear" else f"lr {cfg.lr:g}")
        return (f"{'MoCo' if cfg.mechanism == 'moco' else cfg.mechanism} pretraining: {cfg.arch}{' (CIFAR stem)' if cfg.cifar_stem else ''}, "
                f"{len(self.train_source)} images from {cfg.data}, {cfg.image_size} px, batch "
                f"{cfg.batch_size}{procs}, {lr}, {self._dictionary()}, T {cfg.moco_t}, "
                f"{'MLP' if cfg.mlp else 'linear'} head, aug {cfg.aug}, shuffle-BN {self.shuffle_bn}"
                f"{f' ({cfg.bn_splits} splits)' if self.shuffle_bn == 'split' else ''}, device "
                f"{self.device}, {prec}, {self.workers} workers -> {self.run_dir}")


def _replace_file(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file next to ``path``, then rename it over ``path``: a kill never
    leaves ``path`` half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _global_rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python global RNG states, as tensors and plain data (so
    ``weights_only`` loading accepts them). Training draws nothing from them (augmentations are
    seeded per sample, the key shuffle has its own generator); they are kept so that code
    added around the loop resumes the same too."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def _set_global_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["gauss"]))
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))


_RESUME_FREE = RESUME_FREE  # settings a resumed run may change (declared in MocoConfig)


def _warn_config_changes(saved: Any, cfg: MocoConfig, path: Path, log: Log) -> None:
    """Log the settings that differ from the ones the checkpoint was trained with."""
    if not isinstance(saved, dict):
        return
    now = cfg.to_dict()
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in sorted(now)
               if k in saved and k not in _RESUME_FREE and saved[k] != now[k]]
    if changed:
        log(f"warning: resuming {path} with changed settings ({'; '.join(changed)}); the run "
            "continues, but not as the uninterrupted run would have")


def _query_only_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Accept the original's optimizer state, whose one group lists f_q's then f_k's parameters
    (f_k never has state): keep the first len(f_q) entries so it loads into our f_q-only SGD."""
    n = sum(len(g["params"]) for g in optimizer.param_groups)
    groups = state.get("param_groups", [])
    if len(groups) == 1 and len(groups[0]["params"]) == 2 * n:
        kept = groups[0]["params"][:n]
        state = {"state": {k: v for k, v in state["state"].items() if k in set(kept)},
                 "param_groups": [{**groups[0], "params": kept}]}
    return state


def _first_line(e: BaseException) -> str:
    """The first line of an error, without gloo's ``[source.cc:123]`` prefix."""
    return re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0] if str(e) else type(e).__name__)[:300]


def pretrain(cfg: MocoConfig, *, log: Log = print, progress: bool = True,
             overwrite: bool = False) -> PretrainResult:
    """Train MoCo as ``cfg`` says and return where the checkpoint and metrics are.

    Under torchrun, a collective that fails (a rank died, or waited past ``--dist-timeout``)
    becomes a :class:`RunError`; the process group is left at the end either way.
    """
    try:
        return Pretrainer(cfg, log=log, progress=progress, overwrite=overwrite).run()
    except RuntimeError as e:
        if isinstance(e, RunError) or not is_communication_error(e):
            raise
        raise RunError(
            f"communication between the processes failed: {_first_line(e)}. A rank "
            f"died or stalled for more than --dist-timeout {cfg.dist_timeout:g} min; see the "
            f"other ranks' output for the cause. Checkpoints are in {cfg.output}; continue with "
            "--resume auto") from e
    finally:
        shutdown_distributed()
