"""The pretraining loop: :class:`Pretrainer` trains the parts of a run
(:func:`moco.engine.run.build_run`) epoch by epoch, saves (:class:`~moco.engine.checkpointer.Checkpointer`),
stops on a budget, a signal or a divergence; :func:`pretrain` is the one call.

The model and optimizer factories are in :mod:`moco.engine.build`, the run folder and
checkpoint names in :mod:`moco.engine.rundir`, the checkpoint's ``moco`` entry and the epoch
record in :mod:`moco.engine.run_state`, the kNN monitor in :mod:`moco.engine.evaluation`, the
training step in :mod:`moco.engine.training_step`. The step does not care about device,
precision or process count: those come in as a device, an autocast dtype, an optional grad
scaler and a :class:`~moco.core.shuffle_bn.KeyShuffle`.
"""

from __future__ import annotations

import logging
import math
import re
import shlex
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from moco.core.errors import RunError
from moco.data.batches import Batch
from moco.data.source import DataError
from moco.engine.build import step_lr
from moco.engine.checkpointer import Checkpointer, Found
from moco.engine.config import MocoConfig
from moco.engine.evaluation import Features, KnnMonitor
from moco.engine.run import RunParts, build_run
from moco.engine.run_state import EpochRecord, PretrainResult, TrainState
from moco.engine.rundir import finite_checkpoint_advice, newest_checkpoint, prepare_run_dir
from moco.engine.staleness import Staleness, run_staleness
from moco.engine.training_step import EpochMeter, StepResult, train_step
from moco.utils.checkpoint import first_nonfinite
from moco.utils.distributed import DistContext, is_communication_error, shutdown_distributed
from moco.utils.logs import Log, quiet
from moco.utils.runlock import RunLock
from moco.utils.runlog import RunLog
from moco.utils.signals import StopFlag, stop_on_signals

_log = logging.getLogger(__name__)


class _Clock:
    """The training seconds of an epoch: those before a resume plus the time since ``start``."""

    def __init__(self, before: float) -> None:
        self.before, self.start = before, time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start


class Pretrainer:
    """Owns one pretraining run: its parts (:func:`~moco.engine.run.build_run`), its
    checkpoints, its run folder and logs. Every input is checked and the ``--resume``
    checkpoint read before the run folder is touched. ``run()`` trains to ``cfg.epochs`` and
    returns the result."""

    def __init__(self, cfg: MocoConfig, *, log: Log = _log.info, progress: bool = False,
                 overwrite: bool = False, dist: DistContext | None = None) -> None:
        self.parts: RunParts = build_run(cfg, dist=dist, log=log)
        self.cfg = cfg
        # The parts most used, by their usual names.
        p = self.parts
        self.model, self.device, self.run_dir = p.model, p.device, p.run_dir
        self.workers, self.autocast_dtype = p.runtime.workers, p.runtime.autocast_dtype
        self.optimizer, self.train_loader, self.shuffle_rng = p.optimizer, p.train_loader, p.shuffle_rng
        self.knn_bank, self.knn_query = p.data.knn_bank, p.data.knn_query
        self.log: Log = log if self.parts.dist.is_main else quiet
        self.progress = progress and self.parts.dist.is_main
        self.state = TrainState()
        self.checkpoints = Checkpointer(self.parts, self.state, self.log)
        self.monitor = KnnMonitor(cfg, self.parts.runtime, self.parts.data.knn_bank,
                                  self.parts.data.knn_query, self.log)
        self.lock: RunLock | None = None  # the run folder's lock (rank 0)
        self._meter: EpochMeter | None = None  # the current epoch's sums, on the device
        found = self.checkpoints.find(cfg.resume) if cfg.resume else None
        self._open(overwrite or cfg.overwrite, found)

    def _open(self, overwrite: bool, found: Found | None) -> None:
        """Prepare and lock the run folder (one writer; ``overwrite`` deletes the old run),
        open the logs, restore the ``--resume`` checkpoint, write ``config.yaml``."""
        def lock() -> None:
            self.lock = prepare_run_dir(self.run_dir, resume=bool(self.cfg.resume),
                                        overwrite=overwrite, log=self.log)

        self.parts.dist.on_main(lock)
        try:
            self.runlog = RunLog(self.run_dir, enabled=self.parts.dist.is_main)
            if self.cfg.resume:
                self.checkpoints.restore(found)
            self.checkpoints.write_config()
        except BaseException:
            self.close()  # no TensorBoard writer thread, no lock left behind
            raise

    # ----- checkpoints, folder, description ----------------------------------------------------
    def checkpoint_dict(self) -> dict[str, Any]:
        """The checkpoint of the current position (:meth:`Checkpointer.state_dict`)."""
        return self.checkpoints.state_dict()

    def save(self) -> Path:
        return self.checkpoints.save()

    def close(self) -> None:
        """Close the run's logs and release the run folder's lock (``run()`` does it)."""
        self.parts.monitor.close()
        if getattr(self, "runlog", None) is not None:
            self.runlog.close()
        if self.lock is not None:
            self.lock.release()

    def describe(self) -> str:
        """One line: what this run trains, on what, where (logged when it starts)."""
        return self.parts.describe()

    def resume_hint(self) -> str:
        """The command that continues this run (the run folder's config.yaml holds the rest)."""
        return (f"resume with: moco pretrain {shlex.quote(str(self.cfg.data))} --output "
                f"{shlex.quote(str(self.run_dir))} --resume auto")

    # ----- evaluation --------------------------------------------------------------------------
    def knn(self) -> tuple[float, float] | None:
        """Weighted kNN top-1/top-5 of the test split (or its subset) against the train split's
        (or its subset's) features, computed on the device (every rank gets the same)."""
        return self.monitor(self.model.evaluation_encoder())

    def held_out_features(self) -> Features | None:
        """The last :meth:`knn`'s query features and labels, for the online probe (once)."""
        return self.monitor.take_queries()

    def staleness(self, epoch: int) -> Staleness:
        """The queue's keys against fresh ones on the model as it is (moco.engine.staleness)."""
        return run_staleness(self.parts, epoch)

    # ----- the run -----------------------------------------------------------------------------
    def run(self) -> PretrainResult:
        """Train to ``cfg.epochs`` (or until a budget or a signal stops it, saved), then close
        the run's logs and release its folder."""
        stop = StopFlag()
        try:
            with stop_on_signals(stop):
                return self._run(stop)
        finally:
            self.close()

    def _run(self, stop: StopFlag) -> PretrainResult:
        cfg, s = self.cfg, self.state
        ckpt_path: Path | None = None
        self._untrained_knn()
        first_epoch, t_start = s.epoch, time.perf_counter()
        while s.epoch < cfg.epochs:
            if self._budget_spent(first_epoch, t_start):
                ckpt_path = ckpt_path or newest_checkpoint(self.run_dir) or self.save()
                self.log(f"stopped after epoch {s.epoch} of {cfg.epochs} "
                         f"({self._budget_text()}); saved {ckpt_path}\n{self.resume_hint()}")
                return PretrainResult(self.run_dir, ckpt_path, s.history, s.knn_random_init, True)
            self._train_epoch(stop)
            if self._stop_agreed(stop):
                ckpt_path = self.save()
                self.checkpoints.prune()
                self.log(f"stopped by signal {stop.signal} at epoch {s.epoch + 1} step "
                         f"{s.epoch_step}; saved {ckpt_path}\n{self.resume_hint()}")
                return PretrainResult(self.run_dir, ckpt_path, s.history, s.knn_random_init, True)
            ckpt_path = self.save()
            self.checkpoints.prune()
        if ckpt_path is None:
            ckpt_path = newest_checkpoint(self.run_dir) or self.save()
        return PretrainResult(self.run_dir, ckpt_path, s.history, s.knn_random_init)

    def _untrained_knn(self) -> None:
        """Before the first step of a run: the kNN top-1 of the randomly initialised network
        (the baseline of the plot), or why there is none."""
        s = self.state
        if s.epoch or s.epoch_step or self.cfg.knn_every <= 0 or s.knn_random_init is not None:
            return
        r = self.knn()
        if r is not None:
            s.knn_random_init = r[0]
            self.log(f"kNN top-1 of the randomly initialised network: {r[0]:.2f}%")
        else:
            self.log(self.monitor.absent_reason())

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

    # ----- one epoch ---------------------------------------------------------------------------
    def _train_epoch(self, stop: StopFlag) -> None:
        """One epoch (the rest of it after a mid-epoch resume): its steps, then its
        evaluations and record. A stop request ends it early, unrecorded (the caller saves)."""
        clock = _Clock(self.state.seconds)
        lr = self._train_steps(stop, clock)
        if lr is not None:
            self._close_epoch(lr, clock)

    def _train_steps(self, stop: StopFlag, clock: _Clock) -> float | None:
        """The epoch's steps; the last lr set, or None when a stop request ended them. Nothing
        is read back from the device between log points (moco.engine.training_step); under
        torchrun the ranks agree on a stop request at log points only (an all-reduce)."""
        cfg, s, p = self.cfg, self.state, self.parts
        p.model.train()
        steps = p.train_loader.steps()
        lr = self._set_lr(s.epoch_step, steps)
        batches = self._stop_on_bad_data(p.train_loader.batches(s.epoch, s.epoch_step))
        bar = tqdm(total=steps, initial=s.epoch_step, desc=f"epoch {s.epoch + 1}/{cfg.epochs}",
                   disable=not self.progress, dynamic_ncols=True, leave=False)
        self._meter = meter = EpochMeter(p.device, s.loss_sum, s.acc_sum, s.metric_sums)
        try:
            for batch in batches:
                lr = self._set_lr(s.epoch_step, steps)  # and the method's momentum
                r = train_step(p.train_model, p.optimizer, batch, p.shuffle,
                               p.runtime.autocast_dtype, p.scaler)
                meter.add(r, s.global_step + 1)
                p.monitor.after_step(batch)  # the online probe's step
                s.epoch_step += 1
                s.global_step += 1
                s.seconds = clock.seconds()
                bar.update(1)
                if not self._after_step(stop, steps, r, lr, bar):
                    return None
        finally:
            bar.close()
        return lr

    def _after_step(self, stop: StopFlag, steps: int, r: StepResult, lr: float, bar: Any) -> bool:
        """The step's log point, save and stop check; False when the run must stop now."""
        cfg, s = self.cfg, self.state
        log_point = s.global_step % cfg.print_freq == 0
        saving = bool(cfg.save_every_steps and s.global_step % cfg.save_every_steps == 0
                      and s.epoch_step < steps)
        stopping = (log_point or not self.parts.dist.enabled) and self._stop_agreed(stop)
        if log_point or saving or stopping:
            self._read_meter()  # raises if a step diverged: nothing is saved after it
        if log_point:
            done = s.epoch_step
            ips = (done * cfg.batch_size) / max(s.seconds, 1e-9)
            bar.set_postfix(loss=f"{s.loss_sum / done:.3f}", acc1=f"{s.acc_sum / done:.1f}",
                            img_s=f"{ips:.0f}", lr=f"{lr:.4g}")
            scalars = {"loss": r.loss, **({"acc1": r.acc1} if r.acc1 is not None else {}),
                       **r.metrics}
            for name, value in scalars.items():
                self.runlog.scalar(f"step/{name}", float(value), s.global_step)
        if stopping:
            return False
        if saving:
            self.save()
            self.checkpoints.prune()
        return True

    def _close_epoch(self, lr: float, clock: _Clock) -> None:
        """The epoch's sums read back, its evaluations, its record (metrics.jsonl, TensorBoard,
        the plot, the log line); the state moves to the next epoch."""
        s = self.state
        self._read_meter()
        s.seconds = clock.seconds()  # the device's work included
        self._meter = None
        record = self._epoch_record(lr, clock)
        s.history.append(record.to_dict())
        self.runlog.epoch(s.history[-1], s.history, (*record.monitor, *record.metrics))
        self.log(record.describe(self.cfg.epochs))
        self.parts.monitor.warn(s.history, self.log)  # collapsed, stuck, ...
        s.epoch += 1
        s.epoch_step = 0
        s.loss_sum = s.acc_sum = s.seconds = 0.0
        s.metric_sums = {}

    def _epoch_record(self, lr: float, clock: _Clock) -> EpochRecord:
        """The record of the epoch just trained, with its kNN and staleness evaluations."""
        cfg, s = self.cfg, self.state
        n, train_seconds = s.epoch_step, s.seconds
        knn = None
        if cfg.knn_every > 0 and ((s.epoch + 1) % cfg.knn_every == 0 or s.epoch + 1 == cfg.epochs):
            knn = self.knn()
        stale = None
        if cfg.staleness_every > 0 and (s.epoch + 1) % cfg.staleness_every == 0:
            stale = self.staleness(s.epoch)
        monitor = self.parts.monitor.record(s.loss_sum / n, self.held_out_features())
        loader = self.parts.train_loader
        bad = loader.bad_images
        if bad:  # distinct unreadable images replaced so far (--on-bad-image skip)
            self.log(f"--on-bad-image skip: {len(bad)} unreadable image(s) replaced so far, "
                     f"e.g. {self.parts.data.name_of(min(bad))}")
        return EpochRecord(
            epoch=s.epoch + 1, step=s.global_step, loss=s.loss_sum / n,
            acc1=None if math.isnan(s.acc_sum) else s.acc_sum / n,
            lr=lr, knn=knn, images_per_s=n * cfg.batch_size / max(train_seconds, 1e-9),
            seconds=clock.seconds(), knn_random_init=s.knn_random_init,
            machine=self.parts.runtime.machine,
            staleness=stale.as_record() if stale else {},
            bad_images=len(bad), samples=loader.samples_read * self.parts.dist.world_size,
            metrics={k: v / n for k, v in s.metric_sums.items()},
            monitor=monitor)

    def _set_lr(self, step: int, steps: int) -> float:
        """Before ``step`` of the epoch: the optimizer's lr (``--lr-schedule``) and the
        method's EMA momentum (its schedule at t = epoch + step / steps)."""
        epoch = self.state.epoch
        lr = step_lr(self.cfg, epoch, step, steps)
        for g in self.parts.optimizer.param_groups:
            g["lr"] = lr
        self.parts.model.set_progress(epoch + step / steps, self.cfg.epochs)
        return lr

    # ----- divergence, bad data, stop requests -------------------------------------------------
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
        s.metric_sums = self._meter.metric_sums()

    def _diverged(self, loss: float, epoch_step: int, global_step: int) -> str:
        """What diverged, where, and which checkpoint (if any) holds finite weights."""
        s = self.state
        bad = first_nonfinite(self.model.state_dict())
        weights = (f"; after that step {bad[0]} holds {bad[1]} NaN/Inf value(s)" if bad else "")
        kept = (finite_checkpoint_advice(self.run_dir) if self.parts.dist.is_main
                else "rank 0 names the checkpoint to resume from")
        return (f"the training loss (InfoNCE) became {loss} at epoch {s.epoch + 1}, step "
                f"{epoch_step} (global step {global_step}){weights}: training "
                f"diverged and was stopped; {kept}. Lower --lr (now {self.cfg.lr:g}) or check "
                "the data, or start again")

    def _stop_on_bad_data(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """The loader's batches; an unreadable image (``--on-bad-image stop``) saves the steps
        done so far before the DataError goes up, so a rerun with ``--on-bad-image skip
        --resume auto`` loses nothing."""
        try:
            yield from batches
        except DataError as e:
            where = ""
            self._read_meter()  # the steps done so far, into the checkpoint
            if self.state.global_step > 0 and not self.parts.dist.enabled:
                where = (f"; the {self.state.global_step} steps done are saved in {self.save()}: "
                         "continue with --resume auto")
            raise DataError(f"{e}{where}") from None

    def _stop_agreed(self, stop: StopFlag) -> bool:
        """Whether any rank has been asked to stop. Every rank gets the same answer at the same
        step (an all-reduce under torchrun), so all of them stop there and rank 0 saves."""
        agreed = self.parts.dist.agree_signal(stop.signal)
        if agreed is not None:
            stop.signal = agreed
        return agreed is not None


def _first_line(e: BaseException) -> str:
    """The first line of an error, without gloo's ``[source.cc:123]`` prefix."""
    return re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0] if str(e) else type(e).__name__)[:300]


def pretrain(cfg: MocoConfig, *, log: Log = _log.info, progress: bool = False,
             overwrite: bool = False) -> PretrainResult:
    """Train as ``cfg`` says and return where the checkpoint and metrics are. ``progress``:
    show progress bars on stderr (the ``moco`` command does on a terminal); ``overwrite``
    (or ``cfg.overwrite``): replace a run already in ``cfg.output``.

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
