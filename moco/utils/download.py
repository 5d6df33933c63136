"""Files from the internet for users (released weights, data sets): streamed, resumable,
checksum-verified and atomic, into the user cache folder.

:func:`download` guarantees, whatever happens on the way:

* **nothing half-written under the final name.** Bytes go to ``NAME.part`` beside the target;
  the part file gets the final name (``os.replace``, then the folder fsynced, as
  :mod:`moco.utils.atomic`) only once it is complete and its checksum matches;
* **resumable.** A part file left by an interrupted download is continued with an HTTP
  ``Range`` request; a server that ignores ``Range`` (answers 200) restarts the file cleanly
  from byte 0;
* **verified.** The entry's sha256 or md5 (whichever it has; a published prefix of at least 8
  hex digits is compared as a prefix) is checked before the rename; a mismatch removes the part
  file (a resume would keep the bad bytes);
* **one clear line** (:class:`~moco.core.errors.DownloadError`) offline, on an HTTP error or a
  connection closed early, naming the URL and how to pass a local copy instead;
* **one process per file.** A second process downloading the same file waits for the first
  (``flock`` on a hidden lock file beside the target), then finds the finished file.

Where: :func:`user_cache_dir` (``$MOCO_CACHE``, else ``~/.cache/moco``; ``weights/`` and
``datasets/`` below it). Mirrors: ``mirror=`` or ``$MOCO_MIRROR``, a base URL (or a local
folder) that holds the files under their own names. A progress bar (tqdm) is shown on stderr
when it is a terminal, or when ``progress=True``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moco.core.errors import DownloadError
from moco.utils.atomic import atomic_file, fsync_dir
from moco.utils.logs import on_terminal

_log = logging.getLogger(__name__)

CACHE_ENV = "MOCO_CACHE"
MIRROR_ENV = "MOCO_MIRROR"
PART_SUFFIX = ".part"
CHUNK = 1 << 16
MIN_PREFIX = 8  # a published checksum prefix shorter than this is refused
_ALGORITHMS = {"sha256": 64, "md5": 32}  # name -> full hex length


def user_cache_dir(kind: str | None = None) -> Path:
    """``$MOCO_CACHE``, else ``~/.cache/moco`` (the folder of the decoded-image cache too);
    with ``kind`` (``"weights"``, ``"datasets"``) that subfolder."""
    env = os.environ.get(CACHE_ENV)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "moco"
    return root / kind if kind else root


@dataclass(frozen=True)
class Checksum:
    """An expected digest: ``algorithm`` ``sha256`` or ``md5``, ``digest`` lower-case hex, the
    whole digest or a published prefix (the MoCo README lists the first 8 hex digits of md5)."""

    algorithm: str
    digest: str

    def __post_init__(self) -> None:
        full = _ALGORITHMS.get(self.algorithm)
        if full is None:
            raise ValueError(f"unknown checksum algorithm {self.algorithm!r}; use sha256 or md5")
        d = self.digest.lower()
        if not (MIN_PREFIX <= len(d) <= full) or any(c not in "0123456789abcdef" for c in d):
            raise ValueError(f"{self.algorithm} checksum {self.digest!r}: expected {MIN_PREFIX} "
                             f"to {full} hex digits")
        object.__setattr__(self, "digest", d)

    @property
    def is_prefix(self) -> bool:
        return len(self.digest) < _ALGORITHMS[self.algorithm]

    def matches(self, hexdigest: str) -> bool:
        return hexdigest.lower().startswith(self.digest)

    def describe(self) -> str:
        return f"{self.algorithm} {self.digest}" + (" (published prefix)" if self.is_prefix else "")


def make_checksum(sha256: str | None = None, md5: str | None = None) -> Checksum | None:
    """The checksum to verify: sha256 when given, else md5, else None."""
    if sha256:
        return Checksum("sha256", sha256)
    return Checksum("md5", md5) if md5 else None


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of the file at ``path``, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mirrored(url: str, mirror: str | None = None) -> str:
    """``url``, or the same file name under ``mirror`` (else ``$MOCO_MIRROR``): a base URL
    (``https://host/path``, ``file:///folder``) or a local folder."""
    base = mirror if mirror is not None else os.environ.get(MIRROR_ENV, "")
    if not base:
        return url
    name = Path(urllib.parse.urlparse(url).path).name
    if "://" not in base:
        base = Path(base).expanduser().resolve().as_uri()
    return f"{base.rstrip('/')}/{urllib.parse.quote(name)}"


def part_path(dest: Path) -> Path:
    """Where the bytes of ``dest`` accumulate until they are complete and verified."""
    return dest.with_name(dest.name + PART_SUFFIX)


@contextlib.contextmanager
def _one_writer(dest: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``.NAME.lock`` beside ``dest`` (released by the kernel
    when the process dies, however it dies)."""
    fd = os.open(dest.with_name(f".{dest.name}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            _log.info(f"waiting for another process that is downloading {dest.name}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _hint(dest: Path, hint: str | None) -> str:
    return hint or (f"download it on a machine with internet and put it at {dest}, or set "
                    f"{MIRROR_ENV} to a folder or URL that holds it")


def _open(source: str, offset: int, timeout: float, dest: Path, hint: str | None) -> Any:
    """The response to GET ``source`` (from byte ``offset`` when > 0)."""
    headers = {"User-Agent": "momentum-contrast"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(source, headers=headers),
                                      timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:  # our part file is longer than the file: start again
            return None
        raise DownloadError(f"cannot download {source}: HTTP {e.code} {e.reason}; check the URL "
                            f"(or {MIRROR_ENV}), or {_hint(dest, hint)}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"cannot download {source} ({reason}): no connection to it; "
                            f"{_hint(dest, hint)}") from None


def _start_and_total(resp: Any, offset: int) -> tuple[int, int | None]:
    """Where the response's bytes start in the file and the file's whole size, when known.
    A server that ignores ``Range`` answers 200 with the whole file: start 0."""
    length = resp.headers.get("Content-Length")
    if offset and getattr(resp, "status", None) == 206:
        rng = resp.headers.get("Content-Range", "")  # "bytes START-END/TOTAL"
        try:
            span, _, total = rng.split(" ", 1)[1].partition("/")
            start = int(span.split("-")[0])
            return start, (int(total) if total.strip() not in ("", "*") else None)
        except (IndexError, ValueError):
            return 0, None
    return 0, (int(length) if length and length.isdigit() else None)


def _progress_bar(show: bool | None, total: int | None, initial: int, name: str) -> Any:
    from tqdm import tqdm

    visible = on_terminal() if show is None else show
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=name, disable=not visible, leave=False)  # tqdm writes to stderr


@dataclass
class _Request:
    source: str
    dest: Path
    progress: bool | None
    timeout: float
    hint: str | None


def _stream(req: _Request) -> None:
    """Append the missing bytes of ``req.source`` to the part file (from byte 0 when the
    server does not resume). Raises :class:`DownloadError` when the connection ends before
    the size the server announced: the part file is kept for the next attempt."""
    part = part_path(req.dest)
    offset = part.stat().st_size if part.exists() else 0
    resp = _open(req.source, offset, req.timeout, req.dest, req.hint)
    if resp is None:  # 416: the part file cannot be continued
        part.unlink()
        offset = 0
        resp = _open(req.source, 0, req.timeout, req.dest, req.hint)
    failed: BaseException | None = None
    with resp:
        start, total = _start_and_total(resp, offset)
        resume = bool(offset) and start == offset
        if offset and not resume:
            _log.info(f"{req.source} cannot be resumed (the server sends the whole file): "
                      "downloading it from the start")
        with open(part, "ab" if resume else "wb") as f, \
                _progress_bar(req.progress, total, start if resume else 0, req.dest.name) as bar:
            try:
                for chunk in iter(lambda: resp.read(CHUNK), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:  # reset, timeout, short read
                failed = e
            f.flush()
            os.fsync(f.fileno())
    size = part.stat().st_size
    if failed is not None or (total is not None and size < total):
        of = f" of {total:,}" if total is not None else ""
        why = f"({failed})" if failed is not None else "(the connection closed)"
        raise DownloadError(f"the download of {req.source} stopped after {size:,}{of} bytes "
                            f"{why}; run the same command again to resume it ({part.name} is "
                            f"kept), or {_hint(req.dest, req.hint)}")


def _verify(path: Path, want: Checksum | None, what: str, *, remove: bool) -> None:
    """Compare ``path`` with ``want``; on a mismatch remove it (``remove``) and raise."""
    if want is None:
        _log.warning(f"{what} has no published checksum: not verified (sha256 "
                     f"{file_digest(path)})")
        return
    got = file_digest(path, want.algorithm)
    if want.matches(got):
        return
    if remove:
        path.unlink(missing_ok=True)
    raise DownloadError(f"{what} has {want.algorithm} {got[:max(len(want.digest), 16)]}, expected "
                        f"{want.describe()}: the file is damaged or not the published one"
                        f"{' (removed)' if remove else ''}; download it again, from another "
                        f"mirror ({MIRROR_ENV}) if it happens again")


def download(url: str, dest: str | Path, *, sha256: str | None = None, md5: str | None = None,
             mirror: str | None = None, progress: bool | None = None, timeout: float = 30.0,
             hint: str | None = None) -> Path:
    """Download ``url`` to ``dest`` (see the module docstring) and return ``dest``.

    An existing ``dest`` is returned as is (only a complete, verified file ever gets that
    name). ``mirror`` (else ``$MOCO_MIRROR``) replaces the URL's origin; ``progress``: a bar
    on stderr (None: when stderr is a terminal); ``timeout``: seconds without data before
    giving up; ``hint``: how to pass a local copy, for the offline message.
    """
    dest = Path(dest)
    want = make_checksum(sha256, md5)
    source = mirrored(url, mirror)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _one_writer(dest):
        if dest.is_file():
            return dest
        _log.info(f"downloading {source} to {dest}")
        _stream(_Request(source, dest, progress, timeout, hint))
        part = part_path(dest)
        _verify(part, want, f"the download of {source}", remove=True)
        os.replace(part, dest)
        fsync_dir(dest.parent)
    return dest


def verify_file(path: str | Path, *, sha256: str | None = None, md5: str | None = None) -> Path:
    """``path`` after checking it against the checksum given (a local copy of a download);
    :class:`DownloadError` naming the file when it is missing or does not match."""
    p = Path(path)
    if not p.is_file():
        raise DownloadError(f"{p} is not a file; pass the downloaded file itself")
    _verify(p, make_checksum(sha256, md5), str(p), remove=False)
    return p


def import_file(src: str | Path, dest: str | Path, *, sha256: str | None = None,
                md5: str | None = None) -> Path:
    """Copy a local copy ``src`` of a download to ``dest`` after checking its checksum (the
    way to fill the cache on a machine without internet). Atomic; ``src`` is never changed."""
    src, dest = verify_file(src, sha256=sha256, md5=md5), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _one_writer(dest), open(src, "rb") as fin, atomic_file(dest) as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    part_path(dest).unlink(missing_ok=True)
    return dest
