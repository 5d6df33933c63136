"""No command writes what it reads: outputs against inputs, by path and by file identity.

Two paths name the same file when they resolve to the same place (symbolic links followed)
or when they are the same file on disk (``st_dev`` and ``st_ino``: hard links). An output is
refused when it is one of the command's input files, or lies inside an input folder (a data
folder is never written to: a file written there could become an input of the next run).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from moco.core.errors import OutputError

Inputs = Mapping[str, "str | Path | Iterable[Path] | None"]


def _resolved(p: Path) -> Path:
    try:
        return p.expanduser().resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare as written
        return Path(os.path.abspath(p.expanduser()))


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` are the same file: the same resolved path, or (both existing)
    the same inode on the same device (a hard link, a bind mount)."""
    pa, pb = Path(a), Path(b)
    if _resolved(pa) == _resolved(pb):
        return True
    try:
        return os.path.samefile(pa, pb)
    except (OSError, ValueError):
        return False


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (symbolic links resolved; also the
    nearest existing parent of ``path`` compared by identity, for bind mounts)."""
    p, f = _resolved(Path(path)), _resolved(Path(folder))
    if p == f or f in p.parents:
        return True
    try:
        fst = f.stat()
    except OSError:
        return False
    for parent in (p, *p.parents):
        try:
            st = parent.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino):
            return True
    return False


def check_output(out: str | Path, flag: str, *, files: Inputs | None = None,
                 folders: Inputs | None = None) -> None:
    """Refuse writing ``out`` (given as ``flag``) when it is one of the input ``files``
    ({what: path or paths}) or lies inside one of the input ``folders`` ({what: folder}).
    Raises :class:`~moco.core.errors.OutputError` naming both and what to do."""
    for what, value in (files or {}).items():
        paths = _paths(value)
        if len(paths) > 16:  # many inputs (every image of a folder): one stat each at most
            paths = _same_among(Path(out), paths)
        for p in paths:
            if same_file(out, p):
                link = "" if _resolved(Path(out)) == _resolved(p) else " (a link to it)"
                raise OutputError(f"{flag} {out} is {what} {p}{link}: a command never writes "
                                  "over its input; choose another file")
    for what, value in (folders or {}).items():
        for f in _paths(value):
            if is_inside(out, f):
                raise OutputError(f"{flag} {out} is inside {what} {f}, which is never written "
                                  "to (a file written there could become an input); choose a "
                                  "place outside it")


def _same_among(out: Path, paths: list[Path]) -> list[Path]:
    """The few of ``paths`` that may be ``out``: the same absolute or resolved path, or (when
    ``out`` exists with more than one link) the same inode."""
    names = {os.path.abspath(out), str(_resolved(out))}
    hits = [p for p in paths if os.path.abspath(p) in names]
    try:
        st = os.stat(out)
    except OSError:
        return hits
    if st.st_nlink > 1:
        for p in paths:
            try:
                sp = os.stat(p)
            except OSError:
                continue
            if (sp.st_dev, sp.st_ino) == (st.st_dev, st.st_ino):
                hits.append(p)
    return hits


def _paths(value: str | Path | Iterable[Path] | None) -> list[Path]:
    if value is None or value == "":
        return []
    if isinstance(value, (str, Path)):
        return [Path(value)]
    return [Path(v) for v in value]


def check_writable_parent(out: str | Path, flag: str) -> None:
    """Refuse ``out`` early when its folder does not exist or it is a folder itself, so a long
    computation does not end in a failed write."""
    p = Path(out)
    if p.is_dir():
        raise OutputError(f"{flag} {p} is a folder; give a file name")
    if p.exists() and not p.is_file():
        raise OutputError(f"{flag} {p} is not a regular file (a device, a pipe, a socket): it "
                          "would be replaced by the output; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{flag} {p}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{flag} {p}: the folder {parent} is not writable; choose another place")
