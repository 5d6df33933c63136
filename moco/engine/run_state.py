"""Where a run is, what it returns, and the typed schema of the ``moco`` entry of a
pretraining checkpoint.

A checkpoint written by ``moco pretrain`` holds the original ``main_moco.py`` keys (``epoch``,
``arch``, ``state_dict``, ``optimizer``) and one more, ``moco``: :class:`MocoEntry`. Its keys
on disk are the same as before the schema was typed (:meth:`MocoEntry.to_dict`), and
:meth:`MocoEntry.from_dict` reads a missing key with the default a resume always used, so
older checkpoints and the original's (which have no ``moco`` entry) resume as before.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moco.engine.config import RESUME_FREE, MocoConfig
from moco.eval.monitor import summary
from moco.utils.checkpoint import CheckpointError, check_finite, describe_contents, model_state
from moco.utils.logs import Log

CHECKPOINT_FORMAT = 1  # version of the "moco" entry; a newer one is refused on resume


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
    metric_sums: dict[str, float] = field(default_factory=dict)  # the method's own metrics


@dataclass
class EpochRecord:
    """One finished epoch: a line of ``metrics.jsonl`` (:meth:`to_dict`).

    ``loss`` and ``acc1`` are the epoch's means over its steps; ``lr`` the last step's;
    ``knn`` the monitor's (top-1, top-5) or None; ``images_per_s`` over the training time,
    ``seconds`` including the evaluations; ``staleness`` the queue's measurement
    (``staleness_*`` keys); ``bad_images`` the distinct unreadable images replaced so far
    (None: the key is left out); ``samples`` the images the epoch read, all processes together
    (every sample once per epoch, the remainder of a batch rotating between epochs);
    ``monitor`` the training monitor's keys (``loss_chance``, ``health_*``, ``probe_*``:
    :mod:`moco.engine.monitoring`); ``metrics`` the epoch means of the
    method's own metrics (:attr:`~moco.core.method_base.StepOutput.metrics`), last. ``acc1``
    is None for a method without logits."""

    epoch: int
    step: int
    loss: float
    acc1: float | None
    lr: float
    knn: tuple[float, float] | None
    images_per_s: float
    seconds: float
    knn_random_init: float | None
    machine: str
    staleness: dict[str, float] = field(default_factory=dict)
    bad_images: int | None = None
    samples: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    monitor: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The line as written, in the order of every ``metrics.jsonl`` written so far."""
        d: dict[str, Any] = {
            "epoch": self.epoch, "step": self.step, "loss": self.loss, "acc1": self.acc1,
            "lr": self.lr, "knn_top1": self.knn[0] if self.knn else None,
            "knn_top5": self.knn[1] if self.knn else None, "images_per_s": self.images_per_s,
            "seconds": self.seconds, "knn_random_init": self.knn_random_init,
            "machine": self.machine, **self.staleness,
        }
        if self.bad_images is not None:
            d["bad_images"] = self.bad_images
        if self.samples is not None:
            d["samples"] = self.samples
        d.update(self.monitor)
        d.update(self.metrics)
        return d

    def describe(self, epochs: int) -> str:
        """The epoch's log line (of ``epochs``): loss (and its chance level), pretext acc@1,
        kNN, the queue's staleness, the health signals and the probe, images read, speed."""
        chance = self.monitor.get("loss_chance")
        loss = f"loss {self.loss:.4f}" + (f" (chance {chance:.3f})" if chance else "")
        knn = f", kNN top-1 {self.knn[0]:.2f}%" if self.knn else ""
        if self.staleness:
            knn += (f", loss vs queue / fresh keys {self.staleness['staleness_queue_loss']:.3f}"
                    f" / {self.staleness['staleness_fresh_loss']:.3f}")
        health = summary(self.monitor)
        acc = f", pretext acc@1 {self.acc1:.1f}%" if self.acc1 is not None else ""
        return (f"epoch {self.epoch}/{epochs}: {loss}{acc}{knn}{', ' + health if health else ''}, "
                f"{self.samples} images read, {self.images_per_s:.0f} img/s, "
                f"{self.seconds:.0f} s")


@dataclass
class PretrainResult:
    """What :func:`moco.engine.loop.pretrain` returns: the run folder, the newest checkpoint,
    one record per epoch (the lines of ``metrics.jsonl``: loss, acc1, lr, knn_top1, ...), the
    untrained network's kNN top-1, and whether a budget or a signal stopped it early."""

    run_dir: Path
    checkpoint: Path
    history: list[dict[str, Any]]
    knn_random_init: float | None
    stopped_early: bool = False


@dataclass
class MocoEntry:
    """The ``"moco"`` entry of a pretraining checkpoint (format :data:`CHECKPOINT_FORMAT`).

    On disk::

        {"format": 1, "config": {MocoConfig fields}, "epoch_step": int, "global_step": int,
         "partial": {"loss_sum": float, "acc_sum": float, "seconds": float,
                     "metric_sums": {name: float} (only for a method that logs metrics)},
         "knn_random_init": float | None, "shuffle_rng": uint8 tensor (the key shuffle's
         generator), "scaler": GradScaler state | None, "rng": global RNG states,
         "bad_images": [int], "loader": {a streaming loader's position},
         "data": {"images": int, "classes": int} (the training set it was trained on),
         "monitor": {the training monitor's state: its online probe} (when it runs)}

    The finished epochs are the checkpoint's top-level ``epoch``, as in the original.
    ``partial`` holds the sums of the epoch in progress (a save mid-epoch).
    """

    config: dict[str, Any] | None = None
    epoch_step: int = 0
    global_step: int = 0
    loss_sum: float = 0.0
    acc_sum: float = 0.0
    seconds: float = 0.0
    metric_sums: dict[str, float] = field(default_factory=dict)
    knn_random_init: float | None = None
    shuffle_rng: torch.Tensor | None = None
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    bad_images: list[int] = field(default_factory=list)
    loader: dict[str, Any] = field(default_factory=dict)
    data: dict[str, int] = field(default_factory=dict)
    monitor: dict[str, Any] | None = None
    format: int = CHECKPOINT_FORMAT

    def to_dict(self) -> dict[str, Any]:
        """The entry as stored (the key order of every checkpoint written so far)."""
        partial: dict[str, Any] = {"loss_sum": self.loss_sum, "acc_sum": self.acc_sum,
                                   "seconds": self.seconds}
        if self.metric_sums:
            partial["metric_sums"] = dict(self.metric_sums)
        return {
            "format": self.format,
            "config": self.config,
            "epoch_step": self.epoch_step,
            "global_step": self.global_step,
            "partial": partial,
            "knn_random_init": self.knn_random_init,
            "shuffle_rng": self.shuffle_rng,
            "scaler": self.scaler,
            "rng": self.rng,
            "bad_images": self.bad_images,
            # where a streaming loader is in its epoch (tar shards' layout), if it keeps it
            "loader": self.loader,
            # the training set's size (older checkpoints have none)
            **({"data": dict(self.data)} if self.data else {}),
            **({"monitor": self.monitor} if self.monitor is not None else {}),
        }

    @classmethod
    def from_dict(cls, entry: Any) -> MocoEntry:
        """An entry as stored; each missing key (an older checkpoint, or the original's, which
        has no entry: ``{}``) has its default."""
        d: dict[str, Any] = entry if isinstance(entry, dict) else {}
        partial = d.get("partial", {})
        return cls(config=d.get("config"), epoch_step=int(d.get("epoch_step", 0)),
                   global_step=int(d.get("global_step", 0)),
                   loss_sum=partial.get("loss_sum", 0.0), acc_sum=partial.get("acc_sum", 0.0),
                   seconds=partial.get("seconds", 0.0),
                   metric_sums=dict(partial.get("metric_sums", {})),
                   knn_random_init=d.get("knn_random_init"),
                   shuffle_rng=d.get("shuffle_rng"), scaler=d.get("scaler"), rng=d.get("rng"),
                   bad_images=list(d.get("bad_images", [])), loader=d.get("loader", {}),
                   data=dict(d.get("data") or {}), monitor=d.get("monitor"),
                   format=int(d.get("format", 1)))

    @classmethod
    def of(cls, state: TrainState, **kept: Any) -> MocoEntry:
        """The entry of a run at ``state`` (``kept``: config, shuffle_rng, scaler, rng,
        bad_images, loader, data, monitor)."""
        return cls(epoch_step=state.epoch_step, global_step=state.global_step,
                   loss_sum=state.loss_sum, acc_sum=state.acc_sum, seconds=state.seconds,
                   metric_sums=dict(state.metric_sums), knn_random_init=state.knn_random_init,
                   **kept)

    def restore(self, state: TrainState, epoch: int) -> None:
        """Put the position and sums of the checkpoint (``epoch`` finished) into ``state``."""
        state.epoch, state.epoch_step, state.global_step = epoch, self.epoch_step, self.global_step
        state.loss_sum, state.acc_sum, state.seconds = self.loss_sum, self.acc_sum, self.seconds
        state.metric_sums = dict(self.metric_sums)
        state.knn_random_init = self.knn_random_init


def check_resumable(ckpt: dict[str, Any], path: Path, arch: str, mechanism: str = "moco") -> None:
    """:class:`CheckpointError` unless ``ckpt`` is a pretraining checkpoint of ``arch`` and of
    the method ``mechanism`` with finite weights, written by this moco or an older one (any
    registered method, in its own layout) or by ``main_moco.py`` (MoCo's)."""
    ours = ckpt.get("moco", {})
    if not isinstance(ours, dict) or int(ours.get("format", 1)) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was written by a newer moco (checkpoint format "
                              f"{ours.get('format') if isinstance(ours, dict) else '?'}); "
                              "upgrade moco to resume it")
    saved_arch = ckpt.get("arch")
    if saved_arch is not None and saved_arch != arch:
        raise CheckpointError(f"{path} is a {saved_arch} checkpoint but --arch is {arch}")
    kind = describe_contents(ckpt)
    saved = ours.get("config")
    pretraining = isinstance(saved, dict) and isinstance(ckpt.get("state_dict"), dict)
    if ours.get("kind") == "lincls" or not (pretraining or kind == "a MoCo pretraining checkpoint"):
        raise CheckpointError(f"{path} is {kind}, not a pretraining checkpoint: --resume "
                              "takes a checkpoint_NNNN.pth.tar written by moco pretrain (or "
                              "main_moco.py); to start from a backbone, train from scratch")
    method = saved.get("mechanism", "moco") if isinstance(saved, dict) else "moco"
    if method != mechanism:
        raise CheckpointError(f"{path} was trained with --mechanism {method}, not {mechanism}: "
                              f"resume it with --mechanism {method} (a method of your own must "
                              "be registered again before resuming), or start a new run")
    check_finite(model_state(ckpt, path), path, "model")


def global_rng_state() -> dict[str, Any]:
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


def set_global_rng_state(state: dict[str, Any]) -> None:
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


def warn_config_changes(saved: Any, cfg: MocoConfig, path: Path, log: Log) -> None:
    """Log the settings that differ from the ones the checkpoint was trained with."""
    if not isinstance(saved, dict):
        return
    now = cfg.to_dict()
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in sorted(now)
               if k in saved and k not in _RESUME_FREE and saved[k] != now[k]]
    if changed:
        log(f"warning: resuming {path} with changed settings ({'; '.join(changed)}); the run "
            "continues, but not as the uninterrupted run would have")


def query_only_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Accept the original's optimizer state, whose one group lists f_q's then f_k's parameters
    (f_k never has state): keep the first len(f_q) entries so it loads into our f_q-only SGD."""
    n = sum(len(g["params"]) for g in optimizer.param_groups)
    groups = state.get("param_groups", [])
    if len(groups) == 1 and len(groups[0]["params"]) == 2 * n:
        kept = groups[0]["params"][:n]
        state = {"state": {k: v for k, v in state["state"].items() if k in set(kept)},
                 "param_groups": [{**groups[0], "params": kept}]}
    return state


def describe_data(data: dict[str, int]) -> str:
    """"5000 images of 10 classes" ("5000 unlabeled images" without classes)."""
    images, classes = data.get("images", 0), data.get("classes", 0)
    return f"{images} images of {classes} classes" if classes else f"{images} unlabeled images"


def warn_data_changes(saved: dict[str, int], now: dict[str, int], where: tuple[Path, str, Path],
                      log: Log) -> None:
    """Say when a run resumes on a training set of another size than its checkpoint's
    (``where``: the checkpoint, the data folder, the run folder), and how to start fresh."""
    if not saved or saved == now:
        return
    path, data, run_dir = where
    log(f"warning: {path} was trained on {describe_data(saved)}, {data} has "
        f"{describe_data(now)}: the run continues on these images, not as the uninterrupted "
        "run would have (another epoch length and image order; per-image state such as a "
        f"memory bank may not fit). To start fresh on them instead, pass --overwrite (replaces "
        f"the run in {run_dir}) or another --output")
