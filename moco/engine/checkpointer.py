"""The checkpoints of a pretraining run: what one holds, saving it (atomically, rank 0),
reading and checking the one ``--resume`` names, restoring a run from it, and pruning old ones.

A checkpoint holds the original ``main_moco.py`` keys (``epoch``, ``arch``, ``state_dict`` in the
original layout, ``optimizer``) and our ``moco`` entry
(:class:`~moco.engine.run_state.MocoEntry`): the position inside the epoch, the running sums,
the RNG states and the loader's position, so that a resumed run continues bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from moco.core.errors import RunError
from moco.engine.config_sources import run_folder_config, save_yaml
from moco.engine.run_state import (
    MocoEntry,
    TrainState,
    check_resumable,
    global_rng_state,
    query_only_optimizer_state,
    set_global_rng_state,
    warn_config_changes,
    warn_data_changes,
)
from moco.engine.rundir import checkpoint_name, find_resume, prune_checkpoints
from moco.utils.checkpoint import (
    CheckpointError,
    atomic_save,
    model_state,
    state_mismatch,
)
from moco.utils.logs import Log
from moco.utils.runlog import read_metrics, write_metrics

if TYPE_CHECKING:
    from moco.engine.run import RunParts

#: A checkpoint read for ``--resume``: its path and its contents.
Found = tuple[Path, dict[str, Any]]


class Checkpointer:
    """Saves, resumes and prunes the checkpoints of one run (``parts``, at ``state``).
    ``last`` is the newest checkpoint this run wrote or read (the one a failed save names)."""

    def __init__(self, parts: RunParts, state: TrainState, log: Log) -> None:
        self.parts = parts
        self.state = state
        self.log = log
        self.run_dir = parts.run_dir
        self.last: Path | None = None

    def state_dict(self) -> dict[str, Any]:
        """The original's keys and our :class:`~moco.engine.run_state.MocoEntry`."""
        p, loader = self.parts, self.parts.train_loader
        entry = MocoEntry.of(
            self.state, config=p.cfg.to_dict(), shuffle_rng=p.shuffle_rng.get_state(),
            scaler=p.scaler.state_dict() if p.scaler is not None else None,
            rng=global_rng_state(), bad_images=sorted(loader.bad_images),
            loader=loader.state_dict(), data=self.parts.data.size(), monitor=p.monitor.state_dict())
        return {
            "epoch": self.state.epoch,
            "arch": p.cfg.arch,
            "state_dict": p.model.checkpoint_state(),  # the method's layout
            "optimizer": p.optimizer.state_dict(),
            "moco": entry.to_dict(),
        }

    def save(self) -> Path:
        """Write the checkpoint of the current position (rank 0 writes; the others wait for it
        and fail with it, so none races ahead). A failed write names the last good one."""
        path = self.run_dir / checkpoint_name(self.state.epoch, self.state.epoch_step)
        try:
            self.parts.dist.on_main(lambda: atomic_save(self.state_dict(), path))
        except OSError as e:  # disk full, folder removed, quota, I/O error
            kept = (f"the previous checkpoint {self.last} is intact" if self.last is not None
                    else "no checkpoint was saved before")
            raise RunError(f"cannot save the checkpoint {path}: {e.strerror or e}; {kept}. Free "
                           "space (or fix the folder) and continue with --resume auto") from None
        self.last = path
        return path

    def prune(self) -> None:
        """Keep the newest ``--keep-last`` checkpoints (0 keeps all) and the last one written."""
        if self.parts.dist.is_main:
            prune_checkpoints(self.run_dir, self.parts.cfg.keep_last, self.last)

    def find(self, resume: str) -> Found | None:
        """The checkpoint ``--resume`` names, loaded and checked (format, kind, architecture,
        finite weights), or None for ``auto`` in a folder without any checkpoint."""
        found = find_resume(resume, self.run_dir, self.parts.dist, self.log)
        if found is not None:
            check_resumable(found[1], found[0], self.parts.cfg.arch, self.parts.cfg.mechanism)
        return found

    def restore(self, found: Found | None) -> None:
        """Continue the run from ``found`` (:meth:`find`): weights, optimizer, position, RNG
        states, loader; the metrics of later epochs are dropped from ``metrics.jsonl``. None:
        no checkpoint in the folder, the run starts from scratch."""
        if found is None:
            self.log(f"--resume auto: no checkpoint in {self.run_dir}, starting from scratch")
            if self.parts.dist.is_main:  # epochs logged by an attempt killed before its first save
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            return
        path, ckpt = found
        entry = MocoEntry.from_dict(ckpt.get("moco", {}))
        warn_config_changes(entry.config, self.parts.cfg, path, self.log)
        warn_data_changes(entry.data, self.parts.data.size(),
                          (path, self.parts.cfg.data, self.run_dir), self.log)
        self._load_model(path, ckpt)
        entry.restore(self.state, int(ckpt.get("epoch", 0)))
        self._load_streams(entry)
        self.last = path
        if self.parts.dist.is_main:  # the other ranks keep no history: they log nothing
            metrics = self.run_dir / "metrics.jsonl"
            self.state.history = [h for h in read_metrics(metrics, self.log)
                                  if isinstance(h.get("epoch"), int) and h["epoch"] <= self.state.epoch]
            write_metrics(metrics, self.state.history)
        s = self.state
        self.log(f"resumed from {path}: epoch {s.epoch}, step {s.epoch_step} of the next epoch")

    def _load_model(self, path: Path, ckpt: dict[str, Any]) -> None:
        """The weights and buffers (in the method's checkpoint layout) and the optimizer's
        state."""
        p, cfg = self.parts, self.parts.cfg
        state = p.model.state_from_checkpoint(model_state(ckpt, path))
        try:
            p.model.load_state_dict(state)
        except RuntimeError:
            raise CheckpointError(
                f"{path} does not match this model ({cfg.arch}, mlp={cfg.mlp}, "
                f"dim={cfg.moco_dim}, K={cfg.moco_k}): "
                f"{state_mismatch(p.model, state)}") from None
        if "optimizer" in ckpt:
            p.optimizer.load_state_dict(query_only_optimizer_state(ckpt["optimizer"], p.optimizer))

    def _load_streams(self, entry: MocoEntry) -> None:
        """The key shuffle's generator, the grad scaler, the global RNGs, the loader, the
        training monitor's probe."""
        p, loader = self.parts, self.parts.train_loader
        if entry.shuffle_rng is not None:
            p.shuffle_rng.set_state(entry.shuffle_rng)
        if p.scaler is not None and entry.scaler:
            p.scaler.load_state_dict(entry.scaler)
        if entry.rng:
            set_global_rng_state(entry.rng)
        loader.bad_images = set(entry.bad_images)
        loader.load_state_dict(entry.loader, self.state.epoch_step)
        p.monitor.load_state_dict(entry.monitor, self.log)

    def write_config(self) -> None:
        """The run folder's ``config.yaml`` (rank 0)."""
        if self.parts.dist.is_main:
            save_yaml(run_folder_config(self.parts.cfg), self.run_dir / "config.yaml")
