"""Checkpoints in the original ``main_moco.py`` layout (REFERENCE.md §7), saved atomically and
loaded without executing code (``torch.load(weights_only=True)``).

Top level: ``epoch`` (finished epochs), ``arch``, ``state_dict`` (``module.queue``,
``module.queue_ptr``, ``module.encoder_q.*``, ``module.encoder_k.*``), ``optimizer``; plus our
own ``moco`` entry with what an exact resume needs (step, config, RNG states, history).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

PREFIX = "module."
_OURS_TO_ORIGINAL = {"key_queue.queue": "queue", "key_queue.queue_ptr": "queue_ptr"}
_ORIGINAL_TO_OURS = {v: k for k, v in _OURS_TO_ORIGINAL.items()}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the reason and the fix."""


def to_original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``MoCo.state_dict()`` -> the original's keys: queue first, every key ``module.``."""
    out = {PREFIX + _OURS_TO_ORIGINAL[k]: v for k, v in state.items() if k in _OURS_TO_ORIGINAL}
    out.update({PREFIX + k: v for k, v in state.items() if k not in _OURS_TO_ORIGINAL})
    return out


def from_original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original's keys (with or without ``module.``) -> our ``MoCo.state_dict()`` keys."""
    out = {}
    for k, v in state.items():
        k = k[len(PREFIX):] if k.startswith(PREFIX) else k
        out[_ORIGINAL_TO_OURS.get(k, k)] = v
    return out


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``:
    a crash mid-save never leaves a broken file under the final name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU, tensors and plain data only. Raises :class:`CheckpointError`
    for a missing, truncated or foreign file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"{p} is not a readable checkpoint (truncated, corrupt, or not saved by torch.save): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    except Exception as e:  # pickle.UnpicklingError for objects weights_only refuses
        raise CheckpointError(
            f"{p} holds objects that cannot be loaded safely (weights_only=True): "
            f"{str(e).splitlines()[0]}"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p} is not a checkpoint: it holds a {type(obj).__name__}, not a dict")
    return obj


def model_state(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The model weights of a loaded checkpoint (``state_dict``, or a bare state dict)."""
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} has no 'state_dict' of tensors: not a MoCo checkpoint")
    return state


def encoder_q_state(ckpt: dict[str, Any], *, keep_head: bool = False,
                    path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The query encoder's weights under torchvision names (``conv1.weight``, ...), with the
    original ``main_lincls.py`` logic: keep ``module.encoder_q.*``, drop ``encoder_q.fc*``
    unless ``keep_head``. Accepts keys with or without ``module.``."""
    state = model_state(ckpt, path)
    out = {}
    for k, v in state.items():
        k = k[len(PREFIX):] if k.startswith(PREFIX) else k
        if k.startswith("encoder_q.") and (keep_head or not k.startswith("encoder_q.fc")):
            out[k[len("encoder_q."):]] = v
    if not out:
        raise CheckpointError(f"{path} has no encoder_q weights: not a MoCo pretraining checkpoint")
    return out
