"""A pretraining run: everything built from a :class:`MocoConfig` (data, model, optimizer,
loader, key shuffle), where it is (:class:`~moco.engine.run_state.TrainState`), its
checkpoints (saved, resumed, pruned), its evaluation (the kNN monitor, the queue's staleness)
and its description. The loop that trains it is :class:`moco.engine.loop.Pretrainer`.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moco.core.errors import ConfigError, RunError
from moco.core.model import MoCo
from moco.core.seeding import KEY_SHUFFLE, STALENESS, epoch_generator, stream_generator
from moco.core.shuffle_bn import KeyShuffle, make_key_shuffle
from moco.data.batches import TrainLoader
from moco.data.datasets import class_balanced_subset
from moco.data.loaders import make_train_loader
from moco.data.source import DataError, ImageSource
from moco.data.splits import find_dataset, knn_splits
from moco.engine.build import build_model, build_optimizer, describe_run
from moco.engine.config import MocoConfig
from moco.engine.config_checks import check_buildable, check_staleness_images
from moco.engine.config_sources import save_yaml
from moco.engine.evaluation import MonitorSources, monitor_knn, monitor_sources
from moco.engine.run_state import (
    MocoEntry,
    TrainState,
    check_resumable,
    global_rng_state,
    query_only_optimizer_state,
    set_global_rng_state,
    warn_config_changes,
)
from moco.engine.rundir import (
    checkpoint_name,
    find_resume,
    prepare_run_dir,
    prune_checkpoints,
)
from moco.engine.staleness import Staleness, measure_staleness
from moco.engine.training_step import EpochMeter
from moco.engine.world import resolve_for_world
from moco.utils.checkpoint import (
    CheckpointError,
    atomic_save,
    from_original_layout,
    model_state,
    state_mismatch,
    to_original_layout,
)
from moco.utils.distributed import (
    DistContext,
    init_distributed,
    per_rank_batch,
    wrap_ddp,
)
from moco.utils.logs import Log
from moco.utils.machine import describe_machine
from moco.utils.paths import check_output
from moco.utils.runlock import RunLock
from moco.utils.runlog import RunLog, read_metrics, write_metrics
from moco.utils.runtime import (
    configure_backends,
    default_workers,
    needs_grad_scaler,
    resolve_device,
    resolve_precision,
)

_log = logging.getLogger(__name__)


class TrainingRun:
    """One pretraining run, built and checked before its folder is touched; resumed from a
    checkpoint when ``cfg.resume`` says. :class:`~moco.engine.loop.Pretrainer` trains it."""

    def __init__(self, cfg: MocoConfig, *, log: Log = _log.info, progress: bool = True,
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
        self._knn_sources: MonitorSources | None = None
        self.shuffle_rng = stream_generator(cfg.seed, KEY_SHUFFLE)
        self.shuffle: KeyShuffle = make_key_shuffle(self.shuffle_bn, self.dist, self.shuffle_rng)
        self.state = TrainState()
        self.workers = cfg.workers if cfg.workers >= 0 else default_workers(self.device, self.dist.local_world_size)
        # The loader's batch is this process's slice of the global batch.
        self.train_loader: TrainLoader = make_train_loader(
            dataclasses.replace(cfg.input_settings(),
                                batch_size=per_rank_batch(cfg.batch_size, self.dist.world_size)),
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
                save_yaml(cfg, self.run_dir / "config.yaml")
        except BaseException:
            self.close()  # no TensorBoard writer thread, no lock left behind
            raise

    def close(self) -> None:
        """Close the run's logs and release the run folder's lock (``run()`` does it)."""
        if getattr(self, "runlog", None) is not None:
            self.runlog.close()
        if self.lock is not None:
            self.lock.release()

    def _prepare_run_dir(self, overwrite: bool) -> None:
        self.lock = prepare_run_dir(self.run_dir, resume=bool(self.cfg.resume),
                                    overwrite=overwrite, log=self.log)

    def checkpoint_dict(self) -> dict[str, Any]:
        """The original's keys and our :class:`~moco.engine.run_state.MocoEntry`."""
        entry = MocoEntry.of(
            self.state, config=self.cfg.to_dict(), shuffle_rng=self.shuffle_rng.get_state(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            rng=global_rng_state(),
            bad_images=sorted(getattr(self.train_loader, "bad_images", ())),
            loader=getattr(self.train_loader, "state_dict", dict)())
        return {
            "epoch": self.state.epoch,
            "arch": self.cfg.arch,
            "state_dict": to_original_layout(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "moco": entry.to_dict(),
        }

    def save(self) -> Path:
        path = self.run_dir / checkpoint_name(self.state.epoch, self.state.epoch_step)
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
        finite weights), or None for ``auto`` in a folder without any checkpoint."""
        found = find_resume(resume, self.run_dir, self.dist, self.log)
        if found is not None:
            check_resumable(found[1], found[0], self.cfg.arch)
        return found

    def _resume(self, found: tuple[Path, dict[str, Any]] | None) -> None:
        if found is None:
            self.log(f"--resume auto: no checkpoint in {self.run_dir}, starting from scratch")
            if self.dist.is_main:  # epochs logged by an attempt killed before its first save
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            return
        path, ckpt = found
        entry = MocoEntry.from_dict(ckpt.get("moco", {}))
        warn_config_changes(entry.config, self.cfg, path, self.log)
        state = from_original_layout(model_state(ckpt, path))
        try:
            self.model.load_state_dict(state)
        except RuntimeError:
            raise CheckpointError(
                f"{path} does not match this model ({self.cfg.arch}, mlp={self.cfg.mlp}, "
                f"dim={self.cfg.moco_dim}, K={self.cfg.moco_k}): "
                f"{state_mismatch(self.model, state)}") from None
        if "optimizer" in ckpt:
            self.optimizer.load_state_dict(query_only_optimizer_state(ckpt["optimizer"], self.optimizer))
        s = self.state
        entry.restore(s, int(ckpt.get("epoch", 0)))
        if entry.shuffle_rng is not None:
            self.shuffle_rng.set_state(entry.shuffle_rng)
        if self.scaler is not None and entry.scaler:
            self.scaler.load_state_dict(entry.scaler)
        if entry.rng:
            set_global_rng_state(entry.rng)
        if hasattr(self.train_loader, "bad_images"):
            self.train_loader.bad_images = set(entry.bad_images)
        if hasattr(self.train_loader, "load_state_dict"):
            self.train_loader.load_state_dict(entry.loader, s.epoch_step)
        self.last_checkpoint = path
        if self.dist.is_main:  # the other ranks keep no history: they log nothing
            s.history = [h for h in read_metrics(self.run_dir / "metrics.jsonl") if h["epoch"] <= s.epoch]
            write_metrics(self.run_dir / "metrics.jsonl", s.history)
        self.log(f"resumed from {path}: epoch {s.epoch}, step {s.epoch_step} of the next epoch")

    def _prune(self) -> None:
        """Keep the newest ``cfg.keep_last`` checkpoints (0 keeps all)."""
        if self.dist.is_main:
            prune_checkpoints(self.run_dir, self.cfg.keep_last, self.last_checkpoint)

    def _knn_monitor(self) -> MonitorSources | None:
        """The monitor's bank and queries (:func:`~moco.engine.evaluation.monitor_sources`),
        built once (the decoded-image cache is per source object)."""
        if self._knn_sources is None and self.knn_bank is not None and self.knn_query is not None:
            self._knn_sources = monitor_sources(self.cfg, self.knn_bank, self.knn_query,
                                                self.dist, self.log)
        return self._knn_sources

    def knn(self) -> tuple[float, float] | None:
        """Weighted kNN top-1/top-5 of the test split (or its subset) against the train split's
        (or its subset's) features, computed on the device (every rank gets the same)."""
        sources = self._knn_monitor()
        if sources is None:
            return None
        return monitor_knn(self.model.encoder_q, sources, self.cfg, self.dist, self.workers,
                           self.device, self.autocast_dtype)

    def staleness(self, epoch: int) -> Staleness:
        """The queue's keys against fresh ones on the model as it is (moco.engine.staleness)."""
        assert isinstance(self.model, MoCo), "validated: --staleness-every needs --mechanism moco"
        return measure_staleness(
            self.model, self.train_loader,
            lambda: make_key_shuffle(self.shuffle_bn, self.dist,
                                     epoch_generator(self.cfg.seed, epoch, STALENESS)),
            batches=self.cfg.staleness_batches, epoch=epoch, autocast_dtype=self.autocast_dtype)

    def _source_name(self, index: int) -> str:
        files = self.train_source.files
        if files is None and hasattr(self.train_source, "sample_name"):  # a tar shard member
            return str(self.train_source.sample_name(index))
        return str(files[index]) if files is not None else f"image {index}"

    def resume_hint(self) -> str:
        """The command that continues this run (the run folder's config.yaml holds the rest)."""
        return (f"resume with: moco pretrain {shlex.quote(str(self.cfg.data))} --output "
                f"{shlex.quote(str(self.run_dir))} --resume auto")

    def describe(self) -> str:
        """One line: what this run trains, on what, where (logged when it starts)."""
        return describe_run(self.cfg, images=len(self.train_source), shuffle_bn=self.shuffle_bn,
                            device=self.device, autocast_dtype=self.autocast_dtype,
                            workers=self.workers, run_dir=self.run_dir,
                            world_size=self.dist.world_size, backend=self.dist.backend)
