"""One writer per store: an advisory lock file holding the holder's pid and host.

Local stores use ``fcntl.flock``: the kernel drops the lock when its holder dies, so a
lock file naming a dead pid is *stale*, reported with a warning and taken over. Remote
(fsspec) stores cannot flock: a lock object naming a dead pid on this host raises
StaleLockError unless ``break_lock=True``.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path

import fsspec

from .errors import StaleLockError, StoreLockedError


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"


class StaleLockWarning(UserWarning):
    """A previous writer died without releasing its lock; the lock was taken over."""


class WriterLock:
    """Exclusive writer lock for the store at ``root`` (a local path or an fsspec URL)."""

    def __init__(self, root: str, name: str = ".trajstore.lock", break_lock: bool = False):
        self.root, self.name, self.break_lock = root, name, break_lock
        self._fd: int | None = None
        self._remote = "://" in root and not root.startswith("file://")
        self._fs, self._path = (None, None)

    def acquire(self) -> "WriterLock":
        """Take the lock or raise StoreLockedError / StaleLockError naming the holder."""
        if self._remote:
            self._acquire_remote()
        else:
            self._acquire_local()
        return self

    def _local_path(self) -> Path:
        root = self.root.removeprefix("file://")
        return Path(root) / self.name

    def _acquire_local(self) -> None:
        path = self._local_path()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_json(os.pread(fd, 4096, 0))
            os.close(fd)
            raise StoreLockedError(
                f"store {self.root} is being written by {_describe(holder)}; one writer per store. "
                "Stop that process, or open the store with mode='r' to read it",
                holder,
            ) from None
        previous = _read_json(os.pread(fd, 4096, 0))
        if previous.get("pid") and previous != {} and not (
            previous.get("pid") == os.getpid() and previous.get("host") == socket.gethostname()
        ):
            warnings.warn(
                f"store {self.root}: broke a stale lock left by {_describe(previous)}, which is no longer "
                "running (it was killed or crashed); resuming after its last committed snapshot",
                StaleLockWarning,
                stacklevel=4,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _acquire_remote(self) -> None:
        fs, path = fsspec.core.url_to_fs(self.root)
        self._fs, self._path = fs, f"{path.rstrip('/')}/{self.name}"
        if fs.exists(self._path):
            holder = _read_json(fs.cat_file(self._path))
            same_host = holder.get("host") == socket.gethostname()
            if not self.break_lock:
                if same_host and not _pid_alive(int(holder.get("pid", -1))):
                    raise StaleLockError(
                        f"store {self.root} has a stale lock from {_describe(holder)}, which is no longer "
                        "running; open with break_lock=True to take it over",
                        holder,
                    )
                raise StoreLockedError(
                    f"store {self.root} is locked by {_describe(holder)}; if that writer is gone, "
                    "open with break_lock=True",
                    holder,
                )
        fs.pipe_file(self._path, json.dumps(_holder()).encode())

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
        elif self._fs is not None:
            try:
                self._fs.rm_file(self._path)
            except FileNotFoundError:
                pass
            self._fs = None


def _read_json(raw: bytes) -> dict:
    try:
        return json.loads(raw.decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
