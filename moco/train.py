"""The pretraining loop: builds everything from a :class:`MocoConfig` and runs it.

The step does not care about device, precision or process count: those come in as a device,
an autocast dtype, an optional grad scaler and a :class:`KeyShuffle`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from moco.backbones import strip_head
from moco.checkpoint import (
    CheckpointError,
    atomic_save,
    from_original_layout,
    load_checkpoint,
    model_state,
    to_original_layout,
)
from moco.config import MocoConfig, save_yaml
from moco.data import DataError, ImageSource, class_balanced_subset, find_dataset
from moco.distributed import (
    DistContext,
    init_distributed,
    is_communication_error,
    make_key_shuffle,
    per_rank_batch,
    resolve_for_world,
    shutdown_distributed,
    wrap_ddp,
)
from moco.knn import extract_features, knn_accuracy
from moco.loader import Batch, TrainLoader, eval_batches, make_train_loader
from moco.loss import top1_accuracy
from moco.model import MoCo, build_encoder
from moco.runlog import RunLog, read_metrics
from moco.schedule import learning_rate
from moco.shuffle_bn import KeyShuffle

Log = Callable[[str], None]
CHECKPOINT_GLOB = "checkpoint_*.pth.tar"


class RunError(RuntimeError):
    """A run that cannot start or must stop, with a message that says why and what to do."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto``: bf16 on CUDA (fp16 on old cards), fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise RunError("--precision fp16 needs CUDA; on the CPU use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def default_workers(device: torch.device, processes_here: int = 1) -> int:
    """Loader workers per process (``-j -1``): this machine's cores shared by its processes."""
    cores = max(1, (os.cpu_count() or 1) // processes_here)
    return min(8, cores) if device.type == "cuda" else max(1, cores - 1)


def build_model(cfg: MocoConfig, device: torch.device) -> MoCo:
    """Query encoder (+head, SplitBN if asked), key encoder copy and queue, seeded by ``cfg.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        encoder = build_encoder(cfg.arch, cfg.moco_dim, mlp=cfg.mlp, cifar_stem=cfg.cifar_stem,
                                bn_splits=cfg.bn_splits if cfg.shuffle_bn in ("split", "auto") else 1)
    model = MoCo(encoder, dim=cfg.moco_dim, k=cfg.moco_k, m=cfg.moco_m, t=cfg.moco_t,
                 symmetric=cfg.symmetric, generator=torch.Generator().manual_seed(cfg.seed + 1))
    model = model.to(device)
    if cfg.compile:  # the encoders; the queue, shuffles and momentum update stay eager
        for child in model.children():
            child.compile()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def build_optimizer(cfg: MocoConfig, model: MoCo) -> torch.optim.SGD:
    """SGD over f_q only (f_k is trained by momentum); wd on every tensor, as the original."""
    return torch.optim.SGD(model.encoder_q.parameters(), lr=cfg.effective_lr, momentum=cfg.momentum,
                           weight_decay=cfg.wd)


def epoch_lr(cfg: MocoConfig, epoch: int) -> float:
    e = epoch + 1 if cfg.cos_one_based else epoch
    return learning_rate(cfg.effective_lr, e, cfg.epochs, cos=cfg.cos, milestones=cfg.schedule,
                         warmup_epochs=cfg.warmup_epochs)


@dataclass
class StepResult:
    loss: float
    acc1: float


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    shuffle: KeyShuffle,
    autocast_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None = None,
) -> StepResult:
    """One optimisation step on a batch of two views [B,3,H,W] already on the device."""
    with torch.autocast(batch.im_q.device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        out = model(batch.im_q, batch.im_k, shuffle, batch.index)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(out.loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        out.loss.backward()
        optimizer.step()
    return StepResult(float(out.loss.detach()), top1_accuracy(out.logits))


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
    """Set by SIGTERM/SIGINT: the loop finishes the current step, saves and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        self.signal = signum


def _existing_run(run_dir: Path) -> bool:
    return any((run_dir / n).exists() for n in ("config.yaml", "metrics.jsonl")) or any(
        run_dir.glob(CHECKPOINT_GLOB))


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint in ``run_dir`` that loads (``--resume auto``)."""
    for p in sorted(run_dir.glob(CHECKPOINT_GLOB), key=lambda p: p.stat().st_mtime, reverse=True):
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
        self.device = resolve_device(cfg.device)
        self.dist = dist if dist is not None else init_distributed(self.device, cfg.dist_timeout)
        self.device = self.dist.local_device(self.device)
        # --shuffle-bn auto resolved (ddp under torchrun, split on one process) after checking
        # that -b (the global batch) splits evenly over the ranks and that every rank got the
        # same settings. self.cfg keeps the requested mode: N processes' runs resume on M.
        self.shuffle_bn = resolve_for_world(cfg, self.dist, self.device)
        self.cfg = cfg
        self.log: Log = log if self.dist.is_main else (lambda _msg: None)
        self.progress = progress and self.dist.is_main
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        self.run_dir = Path(cfg.output)
        self.dist.on_main(lambda: self._prepare_run_dir(overwrite))  # one writer
        splits = find_dataset(cfg.data)
        self.train_source: ImageSource = splits.train
        if cfg.train_subset:
            if not splits.train.labeled:
                raise DataError("--train-subset needs a labeled train/ folder (it is class-balanced)")
            idx = class_balanced_subset(splits.train.labels or [], cfg.train_subset, cfg.seed)
            self.train_source = splits.train.subset(idx)
        self.knn_bank = splits.train if splits.train.labeled else None
        self.knn_query = splits.test if splits.test is not None and splits.test.labeled else None
        self.model = build_model(dataclasses.replace(cfg, shuffle_bn=self.shuffle_bn), self.device)
        self.optimizer = build_optimizer(cfg, self.model)
        # The module the training step calls: DDP-wrapped under torchrun. self.model stays the
        # bare MoCo, so checkpoints carry no DDP "module." prefix of their own.
        self.train_model: nn.Module = wrap_ddp(self.model, self.dist, self.device,
                                               sync_bn=self.shuffle_bn == "syncbn")
        self.scaler = (torch.amp.GradScaler("cuda")
                       if self.autocast_dtype == torch.float16 else None)
        self.shuffle_rng = torch.Generator().manual_seed(cfg.seed + 2)
        self.shuffle: KeyShuffle = make_key_shuffle(self.shuffle_bn, self.dist, self.shuffle_rng)
        self.state = TrainState()
        self.workers = cfg.workers if cfg.workers >= 0 else default_workers(self.device, self.dist.local_world_size)
        # The loader's batch is this process's slice of the global batch.
        self.train_loader: TrainLoader = make_train_loader(
            dataclasses.replace(cfg, batch_size=per_rank_batch(cfg.batch_size, self.dist.world_size)),
            self.train_source, self.device, self.workers, self.dist.rank, self.dist.world_size)
        self.runlog = RunLog(self.run_dir, enabled=self.dist.is_main)
        if cfg.resume:
            self._resume(cfg.resume)
        if self.dist.is_main:
            save_yaml(cfg, self.run_dir / "config.yaml")

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
        if _existing_run(self.run_dir) and not self.cfg.resume:
            if not overwrite:
                raise RunError(
                    f"{self.run_dir} already holds a run; pass --resume auto to continue it, "
                    "--overwrite to replace it, or choose another --output")
            for p in list(self.run_dir.glob(CHECKPOINT_GLOB)) + [self.run_dir / "metrics.jsonl"]:
                p.unlink(missing_ok=True)

    def checkpoint_dict(self) -> dict[str, Any]:
        s = self.state
        return {
            "epoch": s.epoch,
            "arch": self.cfg.arch,
            "state_dict": to_original_layout(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "moco": {
                "format": 1,
                "config": self.cfg.to_dict(),
                "epoch_step": s.epoch_step,
                "global_step": s.global_step,
                "partial": {"loss_sum": s.loss_sum, "acc_sum": s.acc_sum, "seconds": s.seconds},
                "knn_random_init": s.knn_random_init,
                "shuffle_rng": self.shuffle_rng.get_state(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
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
        self.dist.on_main(lambda: atomic_save(self.checkpoint_dict(), path))
        return path

    def _resume(self, resume: str) -> None:
        if resume == "auto":  # rank 0 picks, so that every rank loads the same file
            path = self.dist.broadcast_object(
                newest_checkpoint(self.run_dir) if self.dist.is_main else None)
        else:
            path = Path(resume)
        if path is None:
            self.log(f"--resume auto: no checkpoint in {self.run_dir}, starting from scratch")
            return
        ckpt = load_checkpoint(path)
        arch = ckpt.get("arch")
        if arch is not None and arch != self.cfg.arch:
            raise CheckpointError(f"{path} is a {arch} checkpoint but --arch is {self.cfg.arch}")
        try:
            self.model.load_state_dict(from_original_layout(model_state(ckpt, path)))
        except RuntimeError as e:
            raise CheckpointError(
                f"{path} does not match this model ({self.cfg.arch}, mlp={self.cfg.mlp}, "
                f"dim={self.cfg.moco_dim}, K={self.cfg.moco_k}): {str(e).splitlines()[0]} "
                f"{' '.join(str(e).splitlines()[1:3])}") from None
        if "optimizer" in ckpt:
            self.optimizer.load_state_dict(_query_only_optimizer_state(ckpt["optimizer"], self.optimizer))
        ours = ckpt.get("moco", {})
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
        if self.dist.is_main:  # the other ranks keep no history: they log nothing
            s.history = [h for h in read_metrics(self.run_dir / "metrics.jsonl") if h["epoch"] <= s.epoch]
            (self.run_dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in s.history))
        self.log(f"resumed from {path}: epoch {s.epoch}, step {s.epoch_step} of the next epoch")

    def _prune(self) -> None:
        """Keep the newest ``cfg.keep_last`` checkpoints (0 keeps all)."""
        if self.cfg.keep_last <= 0 or not self.dist.is_main:
            return
        ckpts = sorted(self.run_dir.glob(CHECKPOINT_GLOB), key=lambda p: p.stat().st_mtime)
        for p in ckpts[: -self.cfg.keep_last]:
            p.unlink(missing_ok=True)

    # ----- evaluation ---------------------------------------------------------------------
    def _eval_batches(self, source: ImageSource) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return eval_batches(self.cfg, source, self.device, self.workers)

    def knn(self) -> tuple[float, float] | None:
        """Weighted kNN top-1/top-5 of the test split against the train split's features.

        Under torchrun only rank 0 evaluates (its f_q, whose buffers are the ones saved); the
        other ranks get None and wait for it at their next collective (--dist-timeout).
        """
        if self.knn_bank is None or self.knn_query is None or not self.dist.is_main:
            return None
        encoder = self.model.encoder_q
        net = strip_head(encoder) if self.cfg.knn_features == "backbone" else encoder
        dt = self.autocast_dtype
        bank, bank_labels = extract_features(net, self._eval_batches(self.knn_bank), self.device,
                                             autocast_dtype=dt)
        query, query_labels = extract_features(net, self._eval_batches(self.knn_query), self.device,
                                               autocast_dtype=dt)
        return knn_accuracy(query.to(self.device), query_labels, bank, bank_labels,
                            k=self.cfg.knn_k, t=self.cfg.knn_t)

    # ----- training -----------------------------------------------------------------------
    def run(self) -> PretrainResult:
        cfg, s = self.cfg, self.state
        stop = _StopFlag()
        old_handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
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
            while s.epoch < cfg.epochs:
                self._train_epoch(stop)
                if self._stop_agreed(stop):
                    ckpt_path = self.save()
                    self.log(f"stopped by signal {stop.signal} at epoch {s.epoch + 1} step "
                             f"{s.epoch_step}; saved {ckpt_path}\nresume with: moco pretrain "
                             f"{cfg.data} --output {self.run_dir} --resume auto")
                    return PretrainResult(self.run_dir, ckpt_path, s.history, s.knn_random_init, True)
                ckpt_path = self.save()
                self._prune()
            if ckpt_path is None:
                ckpt_path = newest_checkpoint(self.run_dir) or self.save()
            return PretrainResult(self.run_dir, ckpt_path, s.history, s.knn_random_init)
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            self.runlog.close()

    def _train_epoch(self, stop: _StopFlag) -> None:
        cfg, s = self.cfg, self.state
        lr = epoch_lr(cfg, s.epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        steps = self.train_loader.steps()
        batches = self.train_loader.batches(s.epoch, s.epoch_step)
        bar = tqdm(total=steps, initial=s.epoch_step, desc=f"epoch {s.epoch + 1}/{cfg.epochs}",
                   disable=not self.progress, dynamic_ncols=True, leave=False)
        t0 = time.perf_counter()
        seconds_before = s.seconds
        for batch in batches:
            r = train_step(self.train_model, self.optimizer, batch, self.shuffle,
                           self.autocast_dtype, self.scaler)
            if not math.isfinite(r.loss):
                raise RunError(
                    f"the loss became {r.loss} at epoch {s.epoch + 1}, step {s.epoch_step + 1} "
                    f"(global step {s.global_step + 1}): training diverged. The last good checkpoint "
                    f"is kept in {self.run_dir}; lower --lr or check the data, then --resume auto")
            s.epoch_step += 1
            s.global_step += 1
            s.loss_sum += r.loss
            s.acc_sum += r.acc1
            s.seconds = seconds_before + time.perf_counter() - t0
            done = s.epoch_step
            ips = (done * cfg.batch_size) / max(s.seconds, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{s.loss_sum / done:.3f}", acc1=f"{s.acc_sum / done:.1f}",
                            img_s=f"{ips:.0f}", lr=f"{lr:.4g}")
            if s.global_step % cfg.print_freq == 0:
                self.runlog.scalar("step/loss", r.loss, s.global_step)
                self.runlog.scalar("step/acc1", r.acc1, s.global_step)
            if self._stop_agreed(stop):
                bar.close()
                return
            if cfg.save_every_steps and s.global_step % cfg.save_every_steps == 0 and s.epoch_step < steps:
                self.save()
                self._prune()
        bar.close()
        n = s.epoch_step
        train_seconds = s.seconds
        knn = None
        if cfg.knn_every > 0 and ((s.epoch + 1) % cfg.knn_every == 0 or s.epoch + 1 == cfg.epochs):
            knn = self.knn()
        record = {
            "epoch": s.epoch + 1, "step": s.global_step, "loss": s.loss_sum / n,
            "acc1": s.acc_sum / n, "lr": lr, "knn_top1": knn[0] if knn else None,
            "knn_top5": knn[1] if knn else None,
            "images_per_s": n * cfg.batch_size / max(train_seconds, 1e-9),
            "seconds": time.perf_counter() - t0 + seconds_before,
            "knn_random_init": s.knn_random_init,
        }
        s.history.append(record)
        self.runlog.epoch(record, s.history)
        knn_txt = f", kNN top-1 {knn[0]:.2f}%" if knn else ""
        self.log(f"epoch {s.epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f}, pretext acc@1 "
                 f"{record['acc1']:.1f}%{knn_txt}, {record['images_per_s']:.0f} img/s, "
                 f"{record['seconds']:.0f} s")
        s.epoch += 1
        s.epoch_step = 0
        s.loss_sum = s.acc_sum = s.seconds = 0.0

    def _stop_agreed(self, stop: _StopFlag) -> bool:
        """Whether any rank has been asked to stop. Every rank gets the same answer at the same
        step (an all-reduce under torchrun), so all of them stop there and rank 0 saves."""
        agreed = self.dist.agree_signal(stop.signal)
        if agreed is not None:
            stop.signal = agreed
        return agreed is not None

    def describe(self) -> str:
        cfg = self.cfg
        prec = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]
        w = self.dist.world_size
        procs = f" = {w} processes x {cfg.batch_size // w} ({self.dist.backend})" if w > 1 else ""
        lr = (f"lr {cfg.effective_lr:.6g} (--lr {cfg.lr:g} x {cfg.batch_size}/256, --lr-scale linear)"
              if cfg.lr_scale == "linear" else f"lr {cfg.lr:g}")
        return (f"MoCo pretraining: {cfg.arch}{' (CIFAR stem)' if cfg.cifar_stem else ''}, "
                f"{len(self.train_source)} images from {cfg.data}, {cfg.image_size} px, batch "
                f"{cfg.batch_size}{procs}, {lr}, K {cfg.moco_k}, m {cfg.moco_m}, T {cfg.moco_t}, "
                f"{'MLP' if cfg.mlp else 'linear'} head, aug {cfg.aug}, shuffle-BN {self.shuffle_bn}"
                f"{f' ({cfg.bn_splits} splits)' if self.shuffle_bn == 'split' else ''}, device "
                f"{self.device}, {prec}, {self.workers} workers -> {self.run_dir}")


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
