"""One writer per store: an advisory lock holding its holder's record (pid, host, boot, pid namespace, start).

Local stores (plain paths and ``file://`` URLs) use ``fcntl.flock``: the kernel drops the
lock when its holder dies, so a lock file naming a dead pid is *stale*, reported with a
warning and taken over.

Object stores cannot flock. There the lock is an object created with an atomic conditional
create (S3 ``PutObject`` with ``If-None-Match: *``): of two writers racing for it, the
object store lets exactly one create it and answers the other ``412 Precondition Failed``.
The object outlives a killed holder, so a lock naming a dead pid on this host raises
StaleLockError and any other holder StoreLockedError, until the caller passes
``break_lock=True`` (delete the object, then conditionally create our own). Filesystems
with no conditional create (any fsspec filesystem that is neither local nor S3) fall back to
check-then-put, with a :class:`NonAtomicLockWarning`.

The lock file holds a JSON record of its holder: pid, host, start time and ``purpose`` (what
holds it: a writer, an extraction, ...; files written before that field existed read as the
lock's usual holder). A lock held by this very process is reported as such (an unclosed store
object), never re-entered. Locally a lock may also be taken *shared* (``shared=True``): the
extractions share the derived-data lock while gc, repair and ``store.derived()`` need it
exclusively (see pipeline/locking.py). Shared holders write no record there; each names itself
in its own per-subspace lock file (:func:`subspace_lock_name`), which is how an exclusive
taker blocked by them says who they are.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
import unicodedata
import warnings
from pathlib import Path
from typing import Iterator

import fsspec

from .errors import StaleLockError, StoreLockedError
from .format import DERIVED_LOCK_NAME, LOCK_NAME, local_dir
from .holders import describe_holder, gone, is_this_process, new_holder, pid_alive, pid_of, sees

_ATOMIC_CREATE_PROTOCOLS = {"s3", "s3a"}
PROBE_RETRY_S = 0.1  # how long a local lock's taker retries before calling it held (see local_lock_held)
PROBE_WAIT_S = 5.0  # ... when the writer lock's record names no live holder (a probe's, most likely)
BREAK_ADVICE = ("open it with break_lock=True (TrajectoryStore.open(path, 'a', break_lock=True) or "
                "open_for_recording(path, model, break_lock=True))")  # the writer lock's, in the Python API
GRAM_LOCK_NAME = f"{DERIVED_LOCK_NAME}.gram"  # the Gram pass (gram/) of the extractions sharing the derived lock
_DEFAULT_PURPOSE = {LOCK_NAME: "a writer (recording or import)",
                    DERIVED_LOCK_NAME: "exclusive access to derived data (gc, repair or store.derived())"}


WRITER_ADVICE = "one writer at a time. Stop that process, or open the store with mode='r' to read it"


def subspace_lock_name(name: str) -> str:
    """The lock file of the extraction into subspace ``name``: a digest (any name makes a file name) of
    the name case-folded, as a case-insensitive filesystem makes ``A`` and ``a`` one folder."""
    key = unicodedata.normalize("NFKC", name).casefold()
    return f"{DERIVED_LOCK_NAME}.subspace-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def writer_active(root: str, storage_options: dict | None = None) -> bool:
    """Whether a process holds the store's writer lock now (:func:`writer_holder` is not None)."""
    return writer_holder(root, storage_options) is not None


def writer_holder(root: str, storage_options: dict | None = None) -> dict | None:
    """The record (pid, host, since, ...) of the process holding the store's writer lock now, or None; read
    without taking the lock, so it never gets in a writer's way. A holder recorded on this host (this boot,
    this pid namespace) that no longer runs holds nothing: a local lock file's, and an object store's lock
    object a killed writer left behind (it stays there until broken, but no writer is coming back to it). A
    holder this process cannot check (:func:`trajstore.holders.holder_unverifiable`: another host or
    container, or an object store's record from before the boot and namespace were written) counts as
    holding the lock, as does an object store's lock object whose record cannot be read (then ``{}``)."""
    holder = recorded_writer(root, storage_options)
    return None if holder is None or gone(holder, strict=local_dir(root) is None) else holder


def recorded_writer(root: str, storage_options: dict | None = None) -> dict | None:
    """The writer lock's record as it lies, live or stale (None: no lock, or a released one); read without
    taking the lock. :func:`writer_holder` says whether its holder still holds it."""
    local = local_dir(root)
    if local is not None:
        try:
            holder = _read_json((Path(local) / LOCK_NAME).read_bytes())
        except FileNotFoundError:
            return None
        return holder or None  # released: the file stays, emptied
    fs, path = fsspec.core.url_to_fs(root, **dict(storage_options or {}))
    return WriterLock._read_holder(fs, f"{path.rstrip('/')}/{LOCK_NAME}")


def local_lock_held(root: str, name: str = LOCK_NAME) -> bool | None:
    """Whether a process holds the local store's lock ``name`` now, whatever its record says: flock is the
    truth for local stores (a record from another host, container or boot that nothing holds is stale, and a
    writer's opening takes it over). Probed by taking the lock shared and releasing it at once, so it never
    waits; a writer opening in that instant retries (:meth:`WriterLock._acquire_local`). None where the filesystem
    has no flock (NFS without lockd): then only the record can say."""
    try:
        fd = os.open(Path(local_dir(root)) / name, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a filesystem without flock (ENOLCK, EOPNOTSUPP): the caller goes by the record
        return None
    finally:
        os.close(fd)  # closing the descriptor releases the probe's lock
    return False


def _shared_holders(folder: Path) -> list[dict]:
    """Live holders named in the per-subspace and Gram lock files under ``folder`` (local stores)."""
    holders: dict[tuple, dict] = {}  # one per process: its subspace lock's record before its Gram lock's
    for path in [*sorted(folder.glob(f"{DERIVED_LOCK_NAME}.subspace-*")), folder / GRAM_LOCK_NAME]:
        try:
            holder = _read_json(path.read_bytes()[:4096])
        except OSError:
            continue
        if holder.get("pid") and not gone(holder):
            key = tuple(str(holder.get(k)) for k in ("pid", "host", "boot", "pidns", "start"))  # one process
            holders.setdefault(key, holder)
    return list(holders.values())


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the user's line: the first caller outside trajstore,
    pipeline and cli (the depth of the call inside them varies)."""
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ours = tuple(os.path.join(root, pkg) + os.sep for pkg in ("trajstore", "pipeline", "cli"))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(ours):
        frame, level = frame.f_back, level + 1
    return level


class StaleLockWarning(UserWarning):
    """A previous writer died without releasing its lock; the lock was taken over."""


class NonAtomicLockWarning(UserWarning):
    """The filesystem has no atomic conditional create: the lock is check-then-put, so two writers
    starting at the same instant could both take it."""


def atomic_create_supported(fs: fsspec.AbstractFileSystem) -> bool:
    """True where ``fs`` creates an object only if absent, atomically (S3 ``If-None-Match: *``,
    which botocore sends from 1.35.20 on)."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if not _ATOMIC_CREATE_PROTOCOLS.intersection(protocols):
        return False
    try:
        import botocore

        return tuple(int(x) for x in botocore.__version__.split(".")[:3]) >= (1, 35, 20)
    except (ImportError, ValueError):
        return False


class WriterLock:
    """Exclusive lock ``name`` of the store at ``root`` (a local path, ``file://`` or fsspec URL).

    ``name`` is the writer lock (``.trajstore.lock``, appends), the derived-data lock
    (``.trajstore.derived.lock``) or one of an extraction's (pipeline/locking.py). ``break_lock=True``
    takes over a lock left behind on an object store (by a killed writer or extraction);
    ``storage_options`` are the fsspec options of a remote store (endpoint, credentials).
    ``purpose`` says what holds the lock, in the lock file and in the errors of those it blocks;
    ``what`` names what the lock guards in those errors. ``shared=True`` takes a local lock
    shared (many shared holders, no exclusive one); object stores have no shared locks, so there
    it is exclusive.
    """

    def __init__(self, root: str, name: str = LOCK_NAME, break_lock: bool = False,
                 storage_options: dict | None = None, *, purpose: str | None = None, what: str | None = None,
                 shared: bool = False):
        self.root, self.name, self.break_lock = root, name, break_lock
        self.storage_options = dict(storage_options or {})
        self.purpose = purpose or _DEFAULT_PURPOSE.get(name, "a trajstore process")
        self.shared = shared
        self._what_text = what
        self._fd: int | None = None
        self._local = local_dir(root)
        self._remote = self._local is None
        self._fs: fsspec.AbstractFileSystem | None = None
        self._path: str | None = None
        self._token: str | None = None

    def acquire(self) -> "WriterLock":
        """Take the lock or raise StoreLockedError / StaleLockError naming the holder and what to do."""
        if self._remote:
            self._acquire_remote()
        else:
            self._acquire_local()
        return self

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def remote(self) -> bool:
        """True for an object store (no flock, no shared locks)."""
        return self._remote

    @property
    def _what(self) -> str:
        if self._what_text:
            return self._what_text
        if self.name == DERIVED_LOCK_NAME:
            return f"derived data (gram/, subspaces/) of store {self.root}"
        return f"store {self.root}"

    @property
    def _how_to_break(self) -> str:
        if self.name != LOCK_NAME:
            return "rerun the extraction with break_lock=True (`trajstore extract --break-lock`)"
        return BREAK_ADVICE

    def _held_by(self, holder: dict) -> str:
        """"<verb> pid N on host H (since T), <purpose>" for a holder's record (old ones have no purpose)."""
        purpose = holder.get("purpose") or _DEFAULT_PURPOSE.get(self.name, "a trajstore process")
        verb = {LOCK_NAME: "being written by"}.get(self.name, "in use by")
        if self.name.startswith(f"{DERIVED_LOCK_NAME}.subspace-"):
            verb = "being extracted by"
        return f"{verb} {describe_holder(holder)}, {purpose}"

    def _this_process(self, holder: dict, note: str = "") -> StoreLockedError:
        if self.name == LOCK_NAME:
            why = "an unclosed store object: close() it, or use `with`"
        else:
            why = "an extraction still running in another thread, or an unclosed store object or store.derived() block"
        return StoreLockedError(
            f"{self._what} is held by this process ({why}): it is {self._held_by(holder)}{note}, and a second "
            "holder in the same process would corrupt it", holder)

    def _locked(self, holder: dict) -> StoreLockedError:
        """The error for a local lock held by someone else, naming who and saying what to do."""
        if not holder.get("pid") and self.name == DERIVED_LOCK_NAME:  # held shared: by extractions
            holders = _shared_holders(Path(self._local))
            if any(is_this_process(h) for h in holders):
                return self._this_process(next(h for h in holders if is_this_process(h)))
            named = "; ".join(f"{describe_holder(h)}, {h.get('purpose')}" for h in holders[:3]) or "running extractions"
            return StoreLockedError(f"{self._what} is in use by {named}; wait for the extractions to finish (gc, "
                                    "repair and re-creating the store need derived data to themselves)",
                                    holders[0] if holders else {})
        if is_this_process(holder):
            return self._this_process(holder)
        if self.name == LOCK_NAME:
            advice = WRITER_ADVICE
        elif self.name.startswith(f"{DERIVED_LOCK_NAME}.subspace-"):
            advice = ("one extraction per subspace name: wait for it to finish, or extract into another --name "
                      "(extractions into different names run side by side)")
        else:
            advice = "wait for it to finish"
        return StoreLockedError(f"{self._what} is {self._held_by(holder)}; {advice}", holder)

    # -- local: flock ------------------------------------------------------------------------
    def _acquire_local(self) -> None:
        path = Path(self._local) / self.name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        began = time.monotonic()  # a local_lock_held() probe holds it for an instant
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_json(os.pread(fd, 4096, 0))
                # a writer lock held with no live holder on record is a probe (it writes none; a writer writes its
                # record right after taking the lock): wait it out for longer than a paused prober would take
                probe = self.name == LOCK_NAME and (not holder.get("pid") or gone(holder))
                if time.monotonic() - began < (PROBE_WAIT_S if probe else PROBE_RETRY_S):
                    time.sleep(0.005)
                    continue
                os.close(fd)
                raise self._locked(holder) from None
        previous = _read_json(os.pread(fd, 4096, 0))
        if previous.get("pid") and not is_this_process(previous):
            gone_how = ("which is no longer running (it was killed or crashed)" if sees(previous, strict=False) else
                        "which no longer holds it (it ran on another host, container or boot: killed, crashed or cut off)")
            warnings.warn(
                f"{self._what}: broke a stale lock left by {describe_holder(previous)}, {gone_how}; "
                + ("every snapshot it committed is kept" if self.name == LOCK_NAME else
                   "its finished blocks are kept and resumed"),
                StaleLockWarning,
                stacklevel=user_stacklevel(),
            )
        if self.shared:  # any record here is a killed exclusive holder's: shared holders write none
            if previous:
                os.ftruncate(fd, 0)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(new_holder(self.purpose)).encode(), 0)
            os.fsync(fd)
        self._fd = fd

    # -- object stores: conditional create ---------------------------------------------------
    def _acquire_remote(self) -> None:
        fs, path = fsspec.core.url_to_fs(self.root, **self.storage_options)
        lock_path = f"{path.rstrip('/')}/{self.name}"
        atomic = atomic_create_supported(fs)
        if not atomic:
            warnings.warn(
                f"{self._what}: the {type(fs).__name__} filesystem has no atomic conditional create (S3 needs "
                "botocore >= 1.35.20), so its lock is check-then-put: two writers starting at the same instant "
                "could both take it. Start one writer per store", NonAtomicLockWarning, stacklevel=user_stacklevel())
        if self.break_lock:
            previous = self._read_holder(fs, lock_path)
            if previous is not None:
                alive = sees(previous, strict=True) and pid_alive(pid_of(previous), previous.get("start"))
                warnings.warn(f"{self._what}: break_lock=True removed the lock of {describe_holder(previous)}"
                              f"{', which is still running' if alive else ''}", StaleLockWarning,
                              stacklevel=user_stacklevel())
                try:
                    fs.rm_file(lock_path)
                except FileNotFoundError:
                    pass
        holder = new_holder(self.purpose)
        body = json.dumps(holder).encode()
        for _ in range(3):
            try:
                _create(fs, lock_path, body, atomic)
                break
            except OSError as exc:  # FileExistsError: the 412; others: maybe a retried PUT that had succeeded
                current = self._read_holder(fs, lock_path)
                if current is not None and current.get("token") == holder["token"]:
                    break  # our own PUT, retried after a lost response
                if current is None:
                    if not isinstance(exc, FileExistsError):
                        raise
                    continue  # released between our PUT and our read: try again
                self._raise_held(current, atomic)
        else:
            raise StoreLockedError(f"{self._what}: other writers took and released the lock three times while "
                                   "this one tried; try again")
        self._fs, self._path, self._token = fs, lock_path, holder["token"]

    @staticmethod
    def _read_holder(fs: fsspec.AbstractFileSystem, lock_path: str) -> dict | None:
        try:
            return _read_json(fs.cat_file(lock_path))
        except FileNotFoundError:
            return None

    def _raise_held(self, holder: dict, atomic: bool) -> None:
        """Raise StaleLockError (a dead process on this host) or StoreLockedError, naming ``holder``."""
        racy = "" if atomic else " (this filesystem's lock is check-then-put, not atomic)"
        if is_this_process(holder):
            raise self._this_process(holder, racy)
        if gone(holder, strict=True):
            raise StaleLockError(
                f"{self._what} has a stale lock from {describe_holder(holder)}, which is no longer running (it was "
                f"killed or crashed; its lock object stays behind on the object store){racy}. Committed data "
                f"is intact: to take the lock over, {self._how_to_break}",
                holder,
            )
        raise StoreLockedError(
            f"{self._what} is locked by {describe_holder(holder)}, {holder.get('purpose') or self.purpose}{racy}; one "
            f"{'writer' if self.name == LOCK_NAME else 'extraction'} at a time. If that process is gone, "
            f"{self._how_to_break}",
            holder,
        )

    @contextlib.contextmanager
    def held(self) -> Iterator["WriterLock"]:
        """``with lock.acquire().held():`` releases the lock when the block ends."""
        try:
            yield self
        finally:
            self.release()

    def release(self) -> None:
        """Release the lock (idempotent). A remote lock is deleted only while it is still ours."""
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
        elif self._fs is not None:
            fs, path, self._fs = self._fs, self._path, None
            holder = self._read_holder(fs, path)
            if holder is not None and holder.get("token") == self._token:
                try:
                    fs.rm_file(path)
                except FileNotFoundError:
                    pass


def _create(fs: fsspec.AbstractFileSystem, path: str, body: bytes, atomic: bool) -> None:
    """Create ``path`` holding ``body``; FileExistsError if it exists (atomically where ``atomic``)."""
    if atomic:
        bucket, key, _ = fs.split_path(path)
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
        fs.invalidate_cache(path)
        return
    fs.invalidate_cache(path)  # a cached listing could hide a lock another process just created
    if fs.exists(path):
        raise FileExistsError(path)
    fs.pipe_file(path, body)


def _read_json(raw: bytes) -> dict:
    try:
        return json.loads(raw.decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
