"""Checkpoints in the original ``main_moco.py`` layout, saved atomically and
loaded without executing code (``torch.load(weights_only=True)``).

Top level: ``epoch`` (finished epochs), ``arch``, ``state_dict`` (``module.queue``,
``module.queue_ptr``, ``module.encoder_q.*``, ``module.encoder_k.*``), ``optimizer``; plus our
own ``moco`` entry with what an exact resume needs (step, config, RNG states, history).
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch

from moco.core.errors import CheckpointError
from moco.utils.atomic import atomic_write

PREFIX = "module."
_OURS_TO_ORIGINAL = {"key_queue.queue": "queue", "key_queue.queue_ptr": "queue_ptr"}
_ORIGINAL_TO_OURS = {v: k for k, v in _OURS_TO_ORIGINAL.items()}



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
    """``torch.save`` through the one atomic write (:mod:`moco.utils.atomic`): a crash, a
    kill or a full disk mid-save never leaves a broken file under the final name, and the
    previous file of that name stays intact until the rename."""
    atomic_write(path, lambda f: torch_save(obj, f))


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


def check_is_file(p: Path) -> None:
    """:class:`CheckpointError` unless ``p`` is a file: a folder is named as one (with its
    newest checkpoint, when it is a run folder), a missing path as missing."""
    if p.is_dir():
        inside = sorted(p.glob("checkpoint_*.pth.tar"), key=lambda c: c.stat().st_mtime)
        hint = (f"; the newest checkpoint in it is {inside[-1]}" if inside else
                "; give a checkpoint file (e.g. RUN/checkpoint_0199.pth.tar)")
        raise CheckpointError(f"{p} is a folder, not a checkpoint file{hint}")
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if not p.is_file():
        raise CheckpointError(f"{p} is not a regular file (a device or a pipe?): not a checkpoint")


def _refusal(e: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, without torch's advice to load
    it unsafely: the Python object it holds (``GLOBAL os.system``)."""
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m and m.group(1).startswith("numpy"):
        return (f"it holds numpy arrays ({m.group(1)}): a pickle such as a detectron2 export, "
                "not a torch checkpoint")
    if m:
        return f"it holds the Python object {m.group(1)}"
    return "it holds Python objects beyond tensors and plain data"


def read_head(p: Path, n: int) -> bytes:
    """The first ``n`` bytes of the checkpoint file ``p`` (:func:`check_is_file` first); a file
    that cannot be read is a :class:`CheckpointError` naming its permissions."""
    check_is_file(p)
    try:
        with p.open("rb") as f:
            return f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read the checkpoint {p}: {e.strerror or e}; fix its "
                              "permissions") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU, tensors and plain data only. Raises :class:`CheckpointError`
    for a missing, truncated or foreign file."""
    p = Path(path)
    unreadable = f"{p} is not a readable checkpoint (truncated, corrupt, or not saved by torch.save)"
    head = read_head(p, 4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # zip, or a legacy pickle
        raise CheckpointError(f"{unreadable}: it is neither a torch.save zip file nor a pickle"
                              f"{' (it is empty)' if not head else ''}")
    try:
        with p.open("rb") as f:  # a file object: torch.load would read a *.safetensors name as safetensors
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):  # UnpicklingError
            raise CheckpointError(
                f"{p} cannot be loaded safely: {_refusal(e)}, and loading it could run code; "
                "it is refused (a checkpoint of moco, main_moco.py or torchvision holds tensors "
                "only)") from None
        if isinstance(e, (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError,
                          KeyError, IndexError, TypeError, AttributeError)) or (
                type(e).__name__ == "UnpicklingError"):
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise CheckpointError(f"{unreadable}: {first}") from None
        raise
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p} is not a checkpoint: it holds a {type(obj).__name__}, not a dict")
    return obj


def describe_contents(obj: dict[str, Any]) -> str:
    """What kind of file a loaded dict looks like, for 'X is ..., not a pretraining
    checkpoint' messages (never the whole key list)."""
    ours = obj.get("moco")
    if isinstance(ours, dict) and ours.get("kind") == "lincls":
        return "a moco lincls checkpoint (a linear classifier)"
    state = obj.get("state_dict", obj)
    keys = [str(k) for k in state] if isinstance(state, dict) else []
    bare = [k[len(PREFIX):] if k.startswith(PREFIX) else k for k in keys]
    if any(k.startswith("encoder_q.") for k in bare):
        return "a MoCo pretraining checkpoint"
    if "conv1.weight" in bare or any(k.startswith("layer1.") for k in bare):
        return "a bare backbone state dict (e.g. moco export --format torchvision)"
    if "model" in obj and obj.get("__author__") == "MOCO":
        return "a detectron2 export"
    sample = ", ".join(bare[:3])
    return (f"a dict of {len(keys)} entries ({sample}{', ...' if len(bare) > 3 else ''})"
            if keys else "a dict without weights")


def first_nonfinite(state: dict[str, Any]) -> tuple[str, int] | None:
    """(name, count) of the first floating-point tensor of ``state`` holding NaN or Inf."""
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel():
            bad = int((~torch.isfinite(v)).sum())
            if bad:
                return k, bad
    return None


def check_finite(state: dict[str, Any], path: str | Path, what: str = "checkpoint") -> None:
    """:class:`CheckpointError` naming the first tensor of ``state`` with NaN/Inf values: the
    weights of a diverged run give NaN features, kNN figures and exports."""
    bad = first_nonfinite(state)
    if bad is not None:
        name, n = bad
        raise CheckpointError(
            f"{path}: {what} tensor {name} holds {n} NaN/Inf value(s): the weights come from a "
            "diverged run; use an earlier checkpoint of that run (or train again with a lower "
            "--lr)")


def state_mismatch(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> str:
    """How ``state`` differs from ``module.state_dict()``, in one short line: counts and the
    first few names (not torch's list of every key)."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    shapes = [k for k in want if k in got and want[k] != got[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of its {len(want)} tensors missing (e.g. "
                     f"{', '.join(missing[:2])})")
    if extra:
        parts.append(f"{len(extra)} unexpected (e.g. {', '.join(extra[:2])})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape (e.g. {k}: {list(got[k])} in the file, "
                     f"{list(want[k])} in the model)")
    return "; ".join(parts) or "no difference in names or shapes"


def model_state(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The model weights of a loaded checkpoint (``state_dict``, or a bare state dict)."""
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} has no 'state_dict' of tensors: it is "
                              f"{describe_contents(ckpt)}, not a MoCo checkpoint")
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
