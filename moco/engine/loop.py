"""The pretraining loop: :class:`Pretrainer` trains a :class:`~moco.engine.run.TrainingRun`
epoch by epoch, saves, stops on a budget, a signal or a divergence; :func:`pretrain` is the
one call.

What the run is built from is in :mod:`moco.engine.run` (the model and optimizer factories in
:mod:`moco.engine.build`), the run folder and checkpoint names in :mod:`moco.engine.rundir`,
the checkpoint's ``moco`` entry in :mod:`moco.engine.run_state`, the kNN monitor in
:mod:`moco.engine.evaluation`, the training step in :mod:`moco.engine.training_step`. The step
does not care about device, precision or process count: those come in as a device, an
autocast dtype, an optional grad scaler and a :class:`~moco.core.shuffle_bn.KeyShuffle`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from moco.core.errors import RunError
from moco.data.batches import Batch
from moco.data.source import DataError
from moco.engine.build import step_lr
from moco.engine.config import MocoConfig
from moco.engine.run import TrainingRun
from moco.engine.run_state import (
    PretrainResult,
)
from moco.engine.rundir import (
    finite_checkpoint_advice,
    newest_checkpoint,
)
from moco.engine.training_step import EpochMeter, train_step
from moco.utils.checkpoint import (
    first_nonfinite,
)
from moco.utils.distributed import (
    is_communication_error,
    shutdown_distributed,
)
from moco.utils.logs import Log
from moco.utils.signals import StopFlag, stop_on_signals

_log = logging.getLogger(__name__)


class Pretrainer(TrainingRun):
    """Owns one pretraining run. ``run()`` trains to ``cfg.epochs`` and returns the result."""

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
        self.log(self.describe())
        if s.epoch == 0 and s.epoch_step == 0 and cfg.knn_every > 0 and s.knn_random_init is None:
            r = self.knn()
            if r is not None:
                s.knn_random_init = r[0]
                self.log(f"kNN top-1 of the randomly initialised network: {r[0]:.2f}%")
            elif self.knn_bank is None:
                self.log("the training images are unlabeled (no class folders): kNN evaluation "
                         "is skipped")
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

    def _train_epoch(self, stop: StopFlag) -> None:
        cfg, s = self.cfg, self.state
        self.model.train()
        steps = self.train_loader.steps()
        lr = self._set_lr(s.epoch_step, steps)
        ramp = s.epoch < cfg.warmup_epochs  # the warmup sets the lr per step, the schedule per epoch
        batches = self._stop_on_bad_data(self.train_loader.batches(s.epoch, s.epoch_step))
        bar = tqdm(total=steps, initial=s.epoch_step, desc=f"epoch {s.epoch + 1}/{cfg.epochs}",
                   disable=not self.progress, dynamic_ncols=True, leave=False)
        t0 = time.perf_counter()
        seconds_before = s.seconds
        self._meter = meter = EpochMeter(self.device, s.loss_sum, s.acc_sum)
        # Nothing is read back from the device between log points (moco.engine.training_step); under
        # torchrun the ranks agree on a stop request at log points only (an all-reduce).
        for batch in batches:
            if ramp:
                lr = self._set_lr(s.epoch_step, steps)
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

    def _set_lr(self, step: int, steps: int) -> float:
        lr = step_lr(self.cfg, self.state.epoch, step, steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

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
        kept = (finite_checkpoint_advice(self.run_dir) if self.dist.is_main
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
            if self.state.global_step > 0 and not self.dist.enabled:
                where = (f"; the {self.state.global_step} steps done are saved in {self.save()}: "
                         "continue with --resume auto")
            raise DataError(f"{e}{where}") from None

    def _stop_agreed(self, stop: StopFlag) -> bool:
        """Whether any rank has been asked to stop. Every rank gets the same answer at the same
        step (an all-reduce under torchrun), so all of them stop there and rank 0 saves."""
        agreed = self.dist.agree_signal(stop.signal)
        if agreed is not None:
            stop.signal = agreed
        return agreed is not None


def _first_line(e: BaseException) -> str:
    """The first line of an error, without gloo's ``[source.cc:123]`` prefix."""
    return re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0] if str(e) else type(e).__name__)[:300]


def pretrain(cfg: MocoConfig, *, log: Log = _log.info, progress: bool = True,
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
