"""Checkpoints in the original ``main_moco.py`` layout (REFERENCE.md §7), saved atomically and
loaded without executing code (``torch.load(weights_only=True)``).

Top level: ``epoch`` (finished epochs), ``arch``, ``state_dict`` (``module.queue``,
``module.queue_ptr``, ``module.encoder_q.*``, ``module.encoder_k.*``), ``optimizer``; plus our
own ``moco`` entry with what an exact resume needs (step, config, RNG states, history).
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, cast

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


TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | Path, name_glob: str = "*") -> list[Path]:
    """Delete the ``.<name>.XXXX.tmp`` files that an :func:`atomic_save` killed mid-write left
    in ``folder``, for final names matching ``name_glob`` (never a file under a final name).
    Call only while no save into ``folder`` is running."""
    removed = []
    for p in Path(folder).glob(f".{name_glob}.*{TMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``
    (and fsync the folder): a crash or a kill mid-save never leaves a broken file under the
    final name, and the previous file of that name stays intact until the rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 -> a normal file's mode
            torch_save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def torch_save(obj: Any, f: BinaryIO) -> None:
    """``torch.save(obj, f)`` that raises the ``OSError`` of a failed write (``ENOSPC`` for a
    full disk) instead of torch's RuntimeError "unexpected pos"."""
    writer = _FailedWriteKeeper(f)
    try:
        torch.save(obj, cast(BinaryIO, writer))  # write() is all torch.save uses
    except RuntimeError as e:
        if writer.error is None:
            raise
        raise writer.error from e


class _FailedWriteKeeper(io.RawIOBase):
    """Forwards writes to ``file`` and keeps the ``OSError`` of a failed one (disk full, quota,
    I/O error), which ``torch.save`` would report only as a RuntimeError "unexpected pos"."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__()
        self.file = file
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        try:
            return self.file.write(b)
        except OSError as e:
            self.error = self.error or e
            raise


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every OS/filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU, tensors and plain data only. Raises :class:`CheckpointError`
    for a missing, truncated or foreign file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    unreadable = f"{p} is not a readable checkpoint (truncated, corrupt, or not saved by torch.save)"
    try:
        with p.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{unreadable}: {e.strerror}") from None
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # zip, or a legacy pickle
        raise CheckpointError(f"{unreadable}: it is neither a torch.save zip file nor a pickle"
                              f"{' (it is empty)' if not head else ''}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"{unreadable}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
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
