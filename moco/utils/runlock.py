"""An advisory lock on a run folder: one writing process at a time.

:class:`RunLock` takes ``fcntl.flock`` on ``FOLDER/.lock`` and writes its pid, host and start
time into it. The kernel releases the lock when the process ends, however it ends, so a lock
file left by a killed process is taken over (with a message naming that process). A second
process that finds the lock held refuses with the holder's pid. Within one process, a new
lock on a folder replaces the process's earlier one (a library user may build a second
trainer on the same folder).

The holder deletes the lock file when it releases it. A process that took the lock checks
afterwards that the file it locked is still the one under the name (else it lost a race with
that deletion and tries again), so two processes never hold locks on two files of one name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from moco.core.errors import FolderInUseError
from moco.utils.logs import Log

LOCK_NAME = ".lock"
_log = logging.getLogger(__name__)
_HELD: dict[str, RunLock] = {}  # folder (resolved) -> the lock this process holds on it


class RunLock:
    """``with RunLock(folder):`` or ``lock = RunLock(folder).acquire()`` ... ``lock.release()``."""

    def __init__(self, folder: str | Path, *, what: str = "run folder",
                 log: Log | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.log = log or _log.warning
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`~moco.core.errors.FolderInUseError` naming the process
        that holds it. On a file system without locks (some network mounts) it warns and goes
        on unlocked."""
        key = str(self.folder.resolve())
        earlier = _HELD.get(key)
        if earlier is not None and earlier is not self:
            earlier.release()
        for _attempt in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                return self._refuse(fd, e)
            if _same_inode(fd, self.path):
                break
            os.close(fd)  # the holder deleted the file between our open and our lock: again
        else:
            raise FolderInUseError(f"cannot take the lock {self.path}: it keeps being replaced "
                                   "by another process")
        previous = _read(fd)
        if previous.get("pid") and previous.get("pid") != str(os.getpid()):
            self.log(f"{self.folder}: taking over the lock left by {_describe(previous)}, which "
                     "is no longer running (killed?)")
        _write(fd, f"pid {os.getpid()}\nhost {socket.gethostname()}\nsince "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._fd = fd
        _HELD[key] = self
        return self

    def _refuse(self, fd: int, e: OSError) -> RunLock:
        """The lock is held by another process (refuse, naming it), or the file system has
        no locks (warn and go on)."""
        holder = _read(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise FolderInUseError(
                f"{self.folder} is in use by {_describe(holder)}; two processes writing "
                f"one {self.what} would mix their files: wait for it to finish or stop it "
                "(or choose another folder)") from None
        self.log(f"cannot lock {self.path} ({e.strerror}): going on without a lock; do not "
                 f"start a second process on this {self.what}")
        return self

    def release(self) -> None:
        """Delete the lock file and release the lock (safe to call twice)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        for key, lock in list(_HELD.items()):
            if lock is self:
                del _HELD[key]
        with contextlib.suppress(OSError):
            if _same_inode(fd, self.path):
                self.path.unlink()  # still locked: a process that opened it re-checks
        with contextlib.suppress(OSError):
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def _same_inode(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read(fd: int) -> dict[str, str]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", "replace")
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key:
            out[key] = value.strip()
    return out


def _write(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, text.encode())
    os.fsync(fd)


def _describe(holder: dict[str, str]) -> str:
    pid = holder.get("pid")
    if not pid:
        return "another process"
    where = f" on {holder['host']}" if holder.get("host") else ""
    since = f", since {holder['since']}" if holder.get("since") else ""
    return f"process {pid}{where}{since}"
