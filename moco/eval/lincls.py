"""Linear classification on frozen features: the protocol of ``main_lincls.py`` (MoCo v1 §4.1).

Set-up, in the original's order (§8.2): the torchvision network with a new ``fc``
(D -> classes), every parameter but ``fc.weight``/``fc.bias`` frozen, ``fc`` initialised
N(0, 0.01) with zero bias, the pretrained query encoder loaded (its head dropped; exactly
``fc.weight`` and ``fc.bias`` missing), SGD over the 2 ``fc`` tensors (lr 30, momentum 0.9,
wd 0). Training (§8.3): the whole model in ``eval()`` mode (BN keeps the pretrained
statistics), batch 256, 100 epochs, lr x0.1 at epochs 60 and 80 (or cosine with ``cos``),
RandomResizedCrop (scale 0.08-1) + flip; validation with resize + center crop; top-1/top-5
after every epoch; ``checkpoint.pth.tar`` (last) and ``model_best.pth.tar`` in the original
layout (``epoch``, ``arch``, ``state_dict`` with ``module.`` keys, ``best_acc1``,
``optimizer``). After the first trained epoch :func:`sanity_check` verifies that no backbone
tensor changed (§8.4).

Many processes (``torchrun``, as the original's DDP): ``-b`` is the global batch, each process
computes part of every batch (:mod:`moco.eval.lincls_data`), the frozen backbone runs without
gradients (optionally under bf16 autocast, ``precision``) and only ``fc`` is wrapped in
DistributedDataParallel, whose gradient averaging gives every process the same update; the
result equals a single process's up to float rounding. Rank 0 writes the files.

Resumable like pretraining: atomic saves; SIGTERM/SIGINT finish the step, save a mid-epoch
checkpoint and return (exit 0); ``resume="auto"`` continues from the run folder exactly (data
order and augmentation depend only on (seed, epoch, position)).

``fast`` mode (for CPUs): the frozen backbone's features of every train and val image are
computed once, without augmentation (resize + center crop), and the same ``fc``, optimizer,
batch and schedule are trained on them. The price is no crop/flip augmentation of the train
set, which usually lowers the accuracy a little.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moco.core.errors import RunError
from moco.data.source import DataError, ImageSource, class_mismatch
from moco.data.splits import find_dataset
from moco.eval import lincls_data as batches
from moco.eval.config import LinclsConfig
from moco.eval.layouts import is_vit_state
from moco.eval.lincls_engine import LinearEngine
from moco.eval.lincls_protocol import (
    SanityCheckError,
    accuracy,
    autocast_dtype,
    build_linear_model,
    divergence_warning,
    linear_optimizer,
    sanity_check,
    set_frozen_mode,
    train_transform,
)
from moco.eval.lincls_state import (
    BEST,
    LAST,
    atomic_copy,
    check_resume_matches,
    prepare_run_dir,
    read_linear_checkpoint,
    resume_path,
)
from moco.eval.pretrained import describe_encoder, read_encoder
from moco.utils.checkpoint import CheckpointError, atomic_save, model_state, state_mismatch
from moco.utils.distributed import (
    DistContext,
    check_same_settings,
    init_distributed,
    shutdown_distributed,
)
from moco.utils.logs import Log
from moco.utils.paths import check_output
from moco.utils.runlock import RunLock
from moco.utils.runlog import write_metrics
from moco.utils.runtime import default_workers
from moco.utils.runtime import resolve_device as _resolve_device
from moco.utils.schedule import learning_rate
from moco.utils.signals import StopFlag, stop_on_signals

_log = logging.getLogger(__name__)
__all__ = ["LinclsConfig", "LinclsResult", "LinearClassification", "SanityCheckError",
           "accuracy", "build_linear_model", "linear_classification", "linear_optimizer",
           "sanity_check", "set_frozen_mode", "train_transform"]


@dataclass
class LinclsResult:
    run_dir: Path
    best_acc1: float
    last: dict[str, Any] | None
    history: list[dict[str, Any]]
    stopped_by: int | None = None  # the signal that stopped the run (a checkpoint was saved)


class LinearClassification:
    """One ``moco lincls`` run (one process of it under torchrun). ``run()`` trains (or
    evaluates) and returns the result."""

    def __init__(self, cfg: LinclsConfig, *, log: Log = _log.info, progress: bool = True,
                 ctx: DistContext | None = None, overwrite: bool = False) -> None:
        cfg.validate()
        self.cfg, self.overwrite = cfg, overwrite
        self._join(ctx, log, progress)
        self.run_dir = Path(cfg.output)
        check_output(self.run_dir, "--output", folders={"the data folder": cfg.data})
        for name in (LAST, BEST, "metrics.jsonl", "lincls.json"):  # never over the input
            check_output(self.run_dir / name, "--output",
                         files={"the input checkpoint (--pretrained)": cfg.pretrained})
        self.lock: RunLock | None = None
        self._read_data()
        self.start_epoch, self.start_step, self.best_acc1 = 0, 0, 0.0
        self.partial = [0.0, 0.0, 0.0]  # loss sum, correct, images of an interrupted epoch
        resume_ckpt = self._resume_checkpoint()
        self._build(resume_ckpt)
        self.history: list[dict[str, Any]] = []

    def _join(self, ctx: DistContext | None, log: Log, progress: bool) -> None:
        """This process's device, process group, log and autocast dtype."""
        cfg = self.cfg
        device = _resolve_device(cfg.device)
        self.dist = ctx if ctx is not None else init_distributed(device, cfg.dist_timeout)
        check_same_settings(self.dist, asdict(cfg))
        self.device = self.dist.local_device(device)
        self.log = log if self.dist.is_main else (lambda _m: None)
        self.progress = progress and self.dist.is_main
        self.dtype = autocast_dtype(cfg.precision, self.device)
        self.workers = cfg.workers if cfg.workers >= 0 else default_workers(self.device)

    def _read_data(self) -> None:
        """The labeled train and val (or test) splits, with the same classes."""
        data = self.cfg.data
        splits = find_dataset(data)
        if not splits.train.labeled:
            raise DataError(f"{data}/train is unlabeled: linear classification needs one "
                            "sub-folder per class")
        if splits.test is None or not splits.test.labeled:
            raise DataError(f"{data} has no labeled val/ or test/ split to evaluate on")
        if splits.train.classes != splits.test.classes:
            raise DataError(class_mismatch(splits.train, splits.test))
        self.train_source: ImageSource = splits.train
        self.val_source: ImageSource = splits.test
        self.classes = splits.train.classes

    def _resume_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint ``--resume`` names (None: start from --pretrained), checked against
        this run's --pretrained and classes before anything is trained or written."""
        cfg = self.cfg
        self.resume_from = resume_path(cfg.resume, self.run_dir)
        if cfg.resume and cfg.resume != "auto" and self.resume_from is not None \
                and not self.resume_from.exists():
            raise CheckpointError(f"--resume {cfg.resume} does not exist")
        self.resumed_pretrained = ""
        if self.resume_from is None:
            return None
        ckpt = read_linear_checkpoint(self.resume_from)
        self.resumed_pretrained = str((ckpt.get("moco") or {}).get("pretrained") or "")
        check_resume_matches(ckpt, self.resume_from, cfg.pretrained, self.classes)
        return ckpt

    def pretrained_record(self) -> str:
        """The encoder this classifier is trained on, as its checkpoint records it: the absolute
        path of --pretrained, else the one the resumed checkpoint recorded."""
        if self.cfg.pretrained:
            return str(Path(self.cfg.pretrained).absolute())
        return self.resumed_pretrained

    def _build(self, resume_ckpt: dict[str, Any] | None) -> None:
        """The linear model on the frozen encoder, its optimizer (both resumed from
        ``resume_ckpt`` when given) and the engine that trains and evaluates it."""
        cfg = self.cfg
        source = cfg.pretrained or (str(self.resume_from) if self.resume_from else "")
        if not source:
            raise CheckpointError(f"--resume auto: no {LAST} in {self.run_dir} and no "
                                  "--pretrained to start from")
        w = read_encoder(source)
        self.info = describe_encoder(w, cfg.arch, source)
        ours = (resume_ckpt or {}).get("moco", {})
        for key in ("image_size", "mean", "std"):
            if key in ours:
                setattr(self.info, key, tuple(ours[key]) if key != "image_size" else ours[key])
        self.image_size = cfg.image_size or self.info.image_size
        self.model = build_linear_model(self.info, w.backbone, len(self.classes), cfg.seed)
        self.vit = is_vit_state(w.backbone)  # MoCo v3's lincls lr differs for ViTs
        self.lr = cfg.effective_lr(self.vit)
        self.optimizer = linear_optimizer(self.model, self.lr, cfg.momentum, cfg.wd)
        if resume_ckpt is not None:
            self._load_resume(resume_ckpt)
        self.model.to(self.device)
        for st in self.optimizer.state.values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    st[k] = v.to(self.device)
        self.engine = LinearEngine(
            self.model, self.optimizer, self.dist, self.device, self.dtype, self.info.backbone_dim,
            self.image_size, self.info.mean, self.info.std, cfg.batch_size, cfg.seed,
            self.workers, self.progress, self.train_source, self.val_source)

    # ----- checkpoints --------------------------------------------------------------------
    def _load_resume(self, ckpt: dict[str, Any]) -> None:
        path = self.resume_from
        state = {(k[len("module."):] if k.startswith("module.") else k): v
                 for k, v in model_state(ckpt, path or "checkpoint").items()}
        try:
            self.model.load_state_dict(state)
        except RuntimeError:
            raise CheckpointError(f"{path} does not fit this model ({self.info.arch}, "
                                  f"{len(self.classes)} classes): "
                                  f"{state_mismatch(self.model, state)}") from None
        if "optimizer" in ckpt and not self.cfg.evaluate:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        ours = ckpt.get("moco", {})
        self.start_epoch = int(ckpt.get("epoch", 0))
        self.start_step = int(ours.get("step", 0)) if not self.cfg.evaluate else 0
        if self.start_step and self.dist.is_main:  # the interrupted epoch's sums, counted once
            self.partial = [float(x) for x in ours.get("partial", [0.0, 0.0, 0.0])]
        self.best_acc1 = float(ckpt["best_acc1"])
        where = f", step {self.start_step} of epoch {self.start_epoch + 1}" if self.start_step else ""
        self.log(f"resumed from {path}: epoch {self.start_epoch}{where}, best acc@1 "
                 f"{self.best_acc1:.2f}")

    def checkpoint_dict(self, epoch: int, step: int = 0,
                        partial: list[float] | None = None) -> dict[str, Any]:
        """The original lincls layout (§8.3) plus our ``moco`` entry; ``epoch`` = finished
        epochs, ``step`` = steps done in the next one (a mid-epoch stop)."""
        return {
            "epoch": epoch,
            "arch": self.info.arch,
            "state_dict": {f"module.{k}": v.detach().cpu() for k, v in self.model.state_dict().items()},
            "best_acc1": self.best_acc1,
            "optimizer": self.optimizer.state_dict(),
            "moco": {"format": 1, "kind": "lincls", "config": asdict(self.cfg),
                     "classes": list(self.classes), "cifar_stem": self.info.cifar_stem,
                     "image_size": self.image_size, "mean": list(self.info.mean),
                     "std": list(self.info.std), "pretrained": self.pretrained_record(),
                     "step": step, "partial": partial or [0.0, 0.0, 0.0]},
        }

    # ----- run ----------------------------------------------------------------------------
    def run(self) -> LinclsResult:
        cfg = self.cfg
        if cfg.evaluate:
            acc1, acc5 = self.engine.validate()
            self.log(f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}")
            rec = {"epoch": self.start_epoch, "acc1": acc1, "acc5": acc5}
            return LinclsResult(self.run_dir, self.best_acc1, rec, [rec])
        resuming = self.resume_from is not None
        self.lock = self.dist.on_main(self._lock_run_dir)  # a second process refuses
        try:
            kept = self.dist.on_main(lambda: prepare_run_dir(
                self.run_dir, resuming=resuming, start_epoch=self.start_epoch,
                overwrite=self.overwrite, settings=asdict(cfg)))
            self.history = list(kept or [])
            self.log(self.describe())
            stop = StopFlag()
            with stop_on_signals(stop):
                return self._loop(stop)
        finally:
            if self.lock is not None:
                self.lock.release()

    def _lock_run_dir(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return RunLock(self.run_dir, what="lincls run folder", log=self.log).acquire()

    def _loop(self, stop: StopFlag) -> LinclsResult:
        cfg = self.cfg
        feats: tuple[Any, Any] = (None, None)
        if cfg.fast and self.start_epoch < cfg.epochs:
            t0 = time.perf_counter()
            feats = (self.engine.features(self.train_source, "train features"),
                     self.engine.features(self.val_source, "val features"))
            self.log(f"features of {len(self.train_source) + len(self.val_source)} images in "
                     f"{time.perf_counter() - t0:.1f} s")
        last: dict[str, Any] | None = None
        bar = tqdm(total=cfg.epochs, initial=self.start_epoch, desc="lincls", unit="epoch",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                t0 = time.perf_counter()
                lr = learning_rate(self.lr, epoch, cfg.epochs, cos=cfg.cos, milestones=cfg.schedule)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                start = self.start_step if epoch == self.start_epoch else 0
                sums, step = self.engine.train_epoch(epoch, start, self.partial, stop, feats[0])
                if stop.signal is not None and step < batches.num_steps(len(self.train_source),
                                                                        cfg.batch_size):
                    self._save_interrupted(epoch, step, sums, stop.signal)
                    return LinclsResult(self.run_dir, self.best_acc1, last, self.history, stop.signal)
                last = self._finish_epoch(epoch, lr, sums, feats[1], t0)
                self._show(bar, last)
                if stop.signal is not None:  # the signal came with the epoch's last step
                    self.log(f"stopped by signal {stop.signal} after epoch {epoch + 1}; saved "
                             f"{self.run_dir / LAST}; continue with --resume auto")
                    return LinclsResult(self.run_dir, self.best_acc1, last, self.history, stop.signal)
        finally:
            bar.close()
        if last is not None:
            self.log(f" * Acc@1 {last['acc1']:.3f} Acc@5 {last['acc5']:.3f}; best Acc@1 "
                     f"{self.best_acc1:.3f} -> {self.run_dir / BEST}")
        return LinclsResult(self.run_dir, self.best_acc1, last, self.history)

    def _save_interrupted(self, epoch: int, step: int, sums: list[float], signal: int) -> None:
        """A mid-epoch checkpoint: ``step`` steps of epoch ``epoch`` done, their sums kept."""
        total = self.engine.all_sum(sums)
        path = self.run_dir / LAST
        self.dist.on_main(lambda: atomic_save(self.checkpoint_dict(epoch, step, total), path))
        self.log(f"stopped by signal {signal} at epoch {epoch + 1} step {step}; saved {path}\n"
                 f"resume with: moco lincls ... --output {self.run_dir} --resume auto")

    def _finish_epoch(self, epoch: int, lr: float, sums: list[float], val_feats: Any,
                      t0: float) -> dict[str, Any]:
        """Validate after a trained epoch, record and save it (the first one checked by
        :func:`sanity_check`); a non-finite loss stops the run."""
        cfg = self.cfg
        loss_sum, correct, n = self.engine.all_sum(sums)
        loss, train_acc1 = loss_sum / n, 100.0 * correct / n
        if not math.isfinite(loss):
            raise RunError(f"the linear classifier's cross-entropy loss became {loss} at "
                           f"epoch {epoch + 1} (the frozen backbone's weights are "
                           f"finite): lower --lr (now {self.lr:g}) and run again")
        warning = divergence_warning(loss, len(self.classes), self.lr, cfg.fast)
        if warning:
            self.log(f"warning: {warning}")
        acc1, acc5 = self.engine.validate(val_feats)
        is_best = acc1 > self.best_acc1
        self.best_acc1 = max(acc1, self.best_acc1)
        last = {"epoch": epoch + 1, "lr": lr, "loss": loss, "train_acc1": train_acc1,
                "acc1": acc1, "acc5": acc5, "best_acc1": self.best_acc1,
                "seconds": time.perf_counter() - t0, "fast": cfg.fast,
                "processes": self.dist.world_size}
        self.history.append(last)
        self.dist.on_main(lambda: self._save_epoch(epoch, last, is_best))
        if epoch == self.start_epoch and cfg.pretrained:
            self.dist.on_main(lambda: sanity_check(self.model.state_dict(), cfg.pretrained))
        return last

    def _show(self, bar: Any, last: dict[str, Any]) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}", acc1=f"{last['acc1']:.2f}",
                        acc5=f"{last['acc5']:.2f}", best=f"{self.best_acc1:.2f}",
                        lr=f"{last['lr']:.3g}")
        if not self.progress:
            self.log(f"epoch {last['epoch']}/{self.cfg.epochs}: loss {last['loss']:.4f}, lr "
                     f"{last['lr']:.4g}, Acc@1 {last['acc1']:.2f} Acc@5 {last['acc5']:.2f} "
                     f"(best {self.best_acc1:.2f})")

    def _save_epoch(self, epoch: int, record: dict[str, Any], is_best: bool) -> None:
        write_metrics(self.run_dir / "metrics.jsonl", self.history)
        atomic_save(self.checkpoint_dict(epoch + 1), self.run_dir / LAST)
        if is_best:
            atomic_copy(self.run_dir / LAST, self.run_dir / BEST)

    def describe(self) -> str:
        c, i = self.cfg, self.info
        prec = "bf16 backbone" if self.dtype == torch.bfloat16 else "fp32"
        procs = f", {self.dist.world_size} processes" if self.dist.enabled else ""
        return (f"linear classification{' (fast: cached features)' if c.fast else ''}: "
                f"{i.arch}{' (CIFAR stem)' if i.cifar_stem else ''} from "
                f"{c.pretrained or self.resume_from} ({i.layout}), {len(self.classes)} classes, "
                f"{len(self.train_source)} train / {len(self.val_source)} val images at "
                f"{self.image_size} px, {self.lr_text()}, batch {c.batch_size}, {c.epochs} epochs, "
                f"device {self.device}, {prec}{procs} -> {self.run_dir}")


    def lr_text(self) -> str:
        """The lr and its rule ("lr 0.4 = base 0.1 x 1024 / 256" with ``lr_scale`` linear)."""
        c = self.cfg
        if c.lr_scale != "linear":
            return f"lr {self.lr:g}"
        return f"lr {self.lr:g} = base {c.base_lr(self.vit):g} x {c.batch_size} / 256"


def linear_classification(cfg: LinclsConfig, *, log: Log = _log.info, progress: bool = True,
                          ctx: DistContext | None = None, overwrite: bool = False) -> LinclsResult:
    """Run the linear protocol as ``cfg`` says (see the module docstring); ``overwrite``
    replaces a run already in ``cfg.output`` (as :func:`moco.engine.loop.pretrain`'s). Under
    torchrun without ``ctx``, the process group is joined here and left at the end."""
    try:
        return LinearClassification(cfg, log=log, progress=progress, ctx=ctx,
                                    overwrite=overwrite).run()
    finally:
        if ctx is None:
            shutdown_distributed()
