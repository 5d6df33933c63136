"""Is a file a detectron2 export, and is it up to date? (no detectron2 needed)

A detectron2 export (``moco export --format detectron2``, the original
``convert-pretrain-to-detectron2.py``) is a pickle of ``{"model": {name: numpy array},
"__author__": ..., "matching_heuristics": True}`` with detectron2's ResNet names
(``stem.conv1.weight``, ``res2.0.conv1.weight``, ...). It is read here with an unpickler that
accepts numpy arrays and nothing else, so checking a file never runs code from it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from moco.core.errors import Detectron2Error

#: The globals a pickle of numpy arrays refers to (numpy 1 and 2 module names).
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


#: The first pickle of the legacy ``torch.save`` format (torch/serialization.py's magic number).
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it holds the Python object {module}.{name}")


def _why_not(path: Path) -> str | None:
    """Why ``path`` is not a detectron2 export, or None when it is one."""
    try:
        with path.open("rb") as f:
            if f.read(2) == b"PK":
                return "it is a torch.save zip file (a checkpoint or a torchvision export)"
            f.seek(0)
            obj = _ArraysOnly(f).load()
    except pickle.UnpicklingError as e:
        return str(e) if str(e).startswith("it holds") else f"it is not a pickle ({e})"
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        return f"it is not a readable pickle ({type(e).__name__}: {str(e)[:80]})"
    if obj == _TORCH_LEGACY_MAGIC:
        return "it is a torch.save file (legacy format: a checkpoint, not an export)"
    model = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(model, dict) or not model:
        return "it is not a dict with a 'model' entry of named arrays"
    if "stem.conv1.weight" not in model or not any(str(k).startswith("res2.") for k in model):
        return "its 'model' has no detectron2 ResNet names (stem.conv1.weight, res2.*)"
    return None


def check_detectron2_weights(path: str | Path, flag: str = "--weights") -> None:
    """:class:`Detectron2Error` (one line: the file, why, the fix) unless ``path`` is a
    detectron2 export."""
    p = Path(path)
    if p.is_dir():
        raise Detectron2Error(f"{flag} {p} is a folder, not a detectron2 export; give a .pkl file "
                              "name (the printed moco export command writes it)")
    try:
        why = _why_not(p)
    except OSError as e:
        raise Detectron2Error(f"{flag} {p} cannot be read: {e.strerror or e}") from None
    if why is not None:
        raise Detectron2Error(f"{flag} {p} is not a detectron2 export: {why}; pass the .pkl "
                              "that moco export --format detectron2 wrote, or a new file name "
                              "(or leave --weights out) to have the export command printed")


def is_stale(weights: str | Path, checkpoint: str | Path) -> bool:
    """Whether the export ``weights`` is older than the ``checkpoint`` it was made from (the
    checkpoint was written again since: a resumed or longer run)."""
    return Path(weights).stat().st_mtime < Path(checkpoint).stat().st_mtime
