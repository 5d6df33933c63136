"""A grid checked whole before anything trains: every run gets the checks ``moco pretrain``
makes before its first step, so that a bad run fails before the first run starts, in one line
naming the run and the key.

:func:`check_settings` (every run of the grid): the run's settings (types, ranges, choices,
combinations), the device and precision, the ``--shuffle-bn`` mode of one process, and the
architecture (built on PyTorch's ``meta`` device: known, its BatchNorms fed more than one
value per channel at the image size). :func:`check_data` (the runs that are to train): the
data folder exists and can be listed, the output is not inside it, ``--train-subset`` has
labeled images, one batch fits the training set, the kNN monitor's splits have the same
classes, ``--staleness-every`` fits an epoch, a memory bank fits in memory. Each data folder
is listed once for the whole grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moco.ablation.grid import AblationSpec, RunSpec, run_config
from moco.core.errors import AblationError, DataError, MocoError
from moco.data.splits import DatasetSplits, find_dataset, knn_splits
from moco.engine.config import MocoConfig
from moco.engine.config_checks import check_buildable, check_staleness_images
from moco.engine.world import resolve_for_world
from moco.utils.distributed import DistContext
from moco.utils.paths import check_output
from moco.utils.runtime import resolve_device, resolve_precision
from moco.utils.settings import show_value

#: Listed data folders: (data, on_bad_image, cache_dir) -> its splits.
Datasets = dict[tuple[str, str, str], DatasetSplits]


class RunWhere:
    """Names a run and where each of its settings was set, for its errors."""

    def __init__(self, spec: AblationSpec, run: RunSpec,
                 overrides: dict[str, Any] | None = None) -> None:
        self.spec, self.run, self.overrides = spec, run, overrides or {}

    def label(self) -> str:
        """``grid.yaml: run 'r7' (runs[6])``."""
        src = f"{self.spec.source}: " if self.spec.source is not None else ""
        origin = f" ({self.run.origin})" if self.run.origin else ""
        return f"{src}run '{self.run.name}'{origin}"

    def set_in(self, key: str) -> str:
        """Where the run's value of ``key`` comes from."""
        if key in self.overrides:
            return "set on the command line"
        if key in self.run.settings:
            return f"set in the {self.run.origin}" if self.run.origin == "grid" else \
                f"set in {self.run.origin or 'the run'}"
        if key in self.spec.base:
            return "set in base"
        parts = [str(p) for p in (self.spec.config_path,) if p is not None]
        parts += [f"preset {self.spec.preset}"] if self.spec.preset else []
        return "from " + " or ".join([*parts, "the defaults"])

    @contextmanager
    def about(self, cfg: MocoConfig, key: str | None = None) -> Iterator[None]:
        """Turn a check's error into one line naming the run (and ``key``, its value and
        where it was set, when the check is about one key)."""
        try:
            yield
        except (MocoError, OSError) as e:
            text = (str(e).strip().splitlines() or [type(e).__name__])[0]
            what = (f": key '{key}' = {show_value(getattr(cfg, key))} ({self.set_in(key)})"
                    if key else "")
            raise AblationError(f"{self.label()}{what}: {text}") from None


def check_settings(spec: AblationSpec, run: RunSpec, run_dir: Path,
                   overrides: dict[str, Any] | None = None) -> MocoConfig:
    """The run's config in ``run_dir``, checked as pretrain checks it before reading data;
    :class:`AblationError` names the run and what is wrong."""
    where = RunWhere(spec, run, overrides)
    try:
        cfg = run_config(spec, run, run_dir, overrides)
    except MocoError as e:
        raise AblationError(f"{where.label()}: {e}") from None
    with where.about(cfg):
        cfg.validate()
    with where.about(cfg):
        device = resolve_device(cfg.device)
        resolve_precision(cfg.precision, device)
        mode = resolve_for_world(cfg, DistContext(), device)
        check_buildable(cfg, mode)
    return cfg


def check_data(spec: AblationSpec, run: RunSpec, cfg: MocoConfig, output: Path, *,
               overrides: dict[str, Any] | None = None, datasets: Datasets | None = None) -> None:
    """The run's data against its settings, as pretrain checks them before it writes
    anything (``datasets``: the folders listed so far, shared by the runs of a grid)."""
    where = RunWhere(spec, run, overrides)
    with where.about(cfg):
        check_output(output, "--output", folders={"the data folder": cfg.data})
    with where.about(cfg, "data"):
        splits = _listed(cfg, {} if datasets is None else datasets)
        if cfg.knn_every > 0:
            knn_splits(splits, cfg.data, required=False, hint=", or pass --knn-every 0 to "
                       "pretrain without the kNN monitor")
    with where.about(cfg, "train_subset"):
        if cfg.train_subset and not splits.train.labeled:
            raise DataError("--train-subset needs a labeled train/ folder (it is class-balanced)")
    n = min(cfg.train_subset, len(splits.train)) if cfg.train_subset else len(splits.train)
    with where.about(cfg, "batch_size"):
        if n < cfg.batch_size:
            subset = f" (--train-subset {cfg.train_subset})" if cfg.train_subset else ""
            raise DataError(f"the data has {n} training images{subset}, fewer than one batch of "
                            f"{cfg.batch_size}; lower the batch size or use more images")
    with where.about(cfg):
        check_staleness_images(cfg, n // cfg.batch_size * cfg.batch_size)
        if cfg.mechanism == "memory-bank":
            device = resolve_device(cfg.device)
            check_buildable(cfg, resolve_for_world(cfg, DistContext(), device), 1, n)


def _listed(cfg: MocoConfig, datasets: Datasets) -> DatasetSplits:
    """``cfg.data``'s splits, listed once per folder and policy."""
    key = (cfg.data, cfg.on_bad_image, cfg.cache_dir)
    if key not in datasets:
        datasets[key] = find_dataset(cfg.data, cfg.on_bad_image, cfg.cache_dir or None)
    return datasets[key]
