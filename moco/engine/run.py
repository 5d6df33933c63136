"""The parts of a pretraining run, built from a :class:`MocoConfig` by one function,
:func:`build_run`: where it trains (:class:`~moco.engine.build.Runtime`: device, process
group, precision, workers), its data (:class:`RunData`), the model, optimizer, grad scaler,
key shuffle and training loader (:class:`RunParts`). Every input is checked here, before the
run folder is touched.

The loop that trains the parts is :class:`moco.engine.loop.Pretrainer`; their checkpoints
are :class:`moco.engine.checkpointer.Checkpointer`'s.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moco.core.errors import ConfigError, MocoError
from moco.core.global_bn import sync_batchnorm_for
from moco.core.method_base import PretrainingMethod
from moco.core.methods import method_spec
from moco.core.seeding import KEY_SHUFFLE, stream_generator
from moco.core.shuffle_bn import KeyShuffle, make_key_shuffle
from moco.data.batches import TrainLoader
from moco.data.datasets import class_balanced_subset
from moco.data.loaders import make_train_loader
from moco.data.source import DataError, ImageSource
from moco.data.splits import find_dataset, knn_splits
from moco.engine.build import Runtime, build_model, build_optimizer, describe_run
from moco.engine.config import MocoConfig
from moco.engine.config_checks import check_buildable, check_staleness_images, run_advice
from moco.engine.config_sources import load_yaml
from moco.engine.monitoring import RunMonitor, build_run_monitor
from moco.engine.world import resolve_for_world
from moco.utils.distributed import DistContext, init_distributed, per_rank_batch, wrap_ddp
from moco.utils.logs import Log, quiet
from moco.utils.machine import describe_machine
from moco.utils.paths import check_output
from moco.utils.runtime import (
    configure_backends,
    default_workers,
    needs_grad_scaler,
    resolve_device,
    resolve_precision,
)

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunData:
    """The training images (a class-balanced subset with ``--train-subset``) and the kNN
    monitor's bank (the labeled train split) and queries (val/ or test/), None when absent."""

    train: ImageSource
    knn_bank: ImageSource | None
    knn_query: ImageSource | None

    def name_of(self, index: int) -> str:
        """Training image ``index``: its file, or its tar shard member."""
        files = self.train.files
        if files is None and hasattr(self.train, "sample_name"):  # a tar shard member
            return str(self.train.sample_name(index))
        return str(files[index]) if files is not None else f"image {index}"

    def knn_bank_size(self, cfg: MocoConfig) -> int | None:
        """How many images the kNN monitor's bank holds (None: no monitor)."""
        if cfg.knn_every <= 0 or self.knn_bank is None or self.knn_query is None:
            return None
        n = len(self.knn_bank)
        return min(n, cfg.knn_bank_images) if cfg.knn_bank_images else n

    def size(self) -> dict[str, int]:
        """The training set's size as a checkpoint records it: images and classes (0 for
        unlabeled images)."""
        return {"images": len(self.train), "classes": len(self.train.classes)}


@dataclass
class RunParts:
    """Everything a run trains with. ``model`` is the bare module (its state dict is what
    checkpoints hold); ``train_model`` is what the step calls (DDP-wrapped under torchrun);
    ``monitor`` the training monitor (health signals, online probe; rank 0)."""

    cfg: MocoConfig
    runtime: Runtime
    data: RunData
    model: PretrainingMethod
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    shuffle_rng: torch.Generator  # the key shuffle's generator (saved in checkpoints)
    shuffle: KeyShuffle
    train_loader: TrainLoader
    monitor: RunMonitor = dataclasses.field(default_factory=RunMonitor)  # health + probe

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def dist(self) -> DistContext:
        return self.runtime.dist

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output)

    def describe(self) -> str:
        """One line: what this run trains, on what, where (logged when it starts)."""
        return describe_run(self.cfg, self.runtime, len(self.data.train))


def build_run(cfg: MocoConfig, *, dist: DistContext | None = None, log: Log = _log.info) -> RunParts:
    """Check ``cfg`` and build the run's parts; nothing is written. ``dist``: the process
    group (default: joined from torchrun's environment, or one process). Rank 0 logs the
    run's summary line first, then the warnings of :func:`run_advice`."""
    cfg.validate()
    check_output(cfg.output, "--output", folders={"the data folder": cfg.data})
    runtime = resolve_runtime(cfg, dist)
    data = find_run_data_named(cfg)
    check_buildable(cfg, runtime.shuffle_bn, runtime.dist.world_size, len(data.train))
    say = log if runtime.dist.is_main else quiet
    say(describe_run(cfg, runtime, len(data.train)))
    for advice in run_advice(cfg, len(data.train), data.knn_bank_size(cfg),
                             shuffle_bn=runtime.shuffle_bn, world_size=runtime.dist.world_size):
        say(f"warning: {advice}")
    model = build_model(dataclasses.replace(cfg, shuffle_bn=runtime.shuffle_bn), runtime.device,
                        num_samples=len(data.train))
    optimizer = build_optimizer(cfg, model)
    if runtime.dist.enabled and not method_spec(cfg.mechanism).shuffle_bn:
        sync_batchnorm_for(model, runtime.device.type)  # the global batch's BN (MoCo v3 §5)
    # The module the training step calls: DDP-wrapped under torchrun. parts.model stays the
    # bare module, so checkpoints carry no DDP "module." prefix of their own.
    train_model = wrap_ddp(model, runtime.dist, runtime.device,
                           sync_bn=runtime.shuffle_bn == "syncbn")
    scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(runtime.autocast_dtype) else None
    shuffle_rng = stream_generator(cfg.seed, KEY_SHUFFLE)
    shuffle = make_key_shuffle(runtime.shuffle_bn, runtime.dist, shuffle_rng)
    loader = train_loader(cfg, runtime, data.train)
    monitor = build_run_monitor(cfg, runtime.device, (runtime.dist.rank, runtime.dist.world_size),
                                runtime.autocast_dtype, data.train, model, say)
    return RunParts(cfg, runtime, data, model, train_model, optimizer, scaler, shuffle_rng,
                    shuffle, loader, monitor)


def resolve_runtime(cfg: MocoConfig, dist: DistContext | None = None) -> Runtime:
    """The device (this rank's under torchrun), the process group, the ``--shuffle-bn`` mode
    for this process count, the precision and the workers; the backends are configured."""
    device = resolve_device(cfg.device)
    dist = dist if dist is not None else init_distributed(device, cfg.dist_timeout)
    device = dist.local_device(device)
    configure_backends(device)
    machine = describe_machine(device)  # named in every epoch record
    # --shuffle-bn auto resolved (ddp under torchrun, split on one process) after checking
    # that -b (the global batch) splits evenly over the ranks and that every rank got the
    # same settings. cfg keeps the requested mode: N processes' runs resume on M.
    mode = resolve_for_world(cfg, dist, device)
    if cfg.staleness_every and dist.world_size > 1:
        raise ConfigError("--staleness-every is a single-process diagnostic; run it without "
                          "torchrun, or drop it (it has no effect on the training)")
    dtype = resolve_precision(cfg.precision, device)
    workers = cfg.workers if cfg.workers >= 0 else default_workers(device, dist.local_world_size)
    return Runtime(device, dist, mode, dtype, workers, machine)


def find_run_data(cfg: MocoConfig) -> RunData:
    """The training images and the kNN monitor's splits of ``cfg.data``, checked as ``moco
    knn`` checks them (classes that differ between the splits are an error)."""
    splits = find_dataset(cfg.data, cfg.on_bad_image, cfg.cache_dir or None)
    train = splits.train
    if cfg.train_subset:
        if not splits.train.labeled:
            raise DataError("--train-subset needs a labeled train/ folder (it is class-balanced)")
        train = train.subset(class_balanced_subset(splits.train.labels or [], cfg.train_subset,
                                                   cfg.seed))
    pair = knn_splits(splits, cfg.data, required=False, hint=", or pass --knn-every 0 to "
                      "pretrain without the kNN monitor") if cfg.knn_every > 0 else None
    return RunData(train, splits.train if splits.train.labeled else None,
                   pair[1] if pair is not None else None)


def find_run_data_named(cfg: MocoConfig) -> RunData:
    """:func:`find_run_data`; when resuming with the data folder of the run folder's
    ``config.yaml`` (no DATA given), its errors name that file."""
    try:
        return find_run_data(cfg)
    except DataError as e:
        saved = Path(cfg.output) / "config.yaml"
        if not cfg.resume or saved_data(saved) != cfg.data:
            raise
        raise DataError(f"{e} (DATA from {saved}, the saved configuration of the run being "
                        "resumed): pass DATA to use the folder where the images are now") from None


def saved_data(path: Path) -> str | None:
    """The ``data`` of a run folder's ``config.yaml``, or None when it has none."""
    try:
        return str(load_yaml(path).get("data")) if path.is_file() else None
    except MocoError:
        return None


def train_loader(cfg: MocoConfig, runtime: Runtime, source: ImageSource) -> TrainLoader:
    """The training loader; its batch is this process's slice of the global batch. A batch
    larger than the data, or too few images for ``--staleness-every``, fails here."""
    dist = runtime.dist
    loader = make_train_loader(
        dataclasses.replace(cfg.input_settings(),
                            batch_size=per_rank_batch(cfg.batch_size, dist.world_size)),
        source, runtime.device, runtime.workers, dist.rank, dist.world_size)
    check_staleness_images(cfg, loader.steps() * cfg.batch_size)
    return loader
