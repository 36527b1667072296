"""The threads that encode and decode chunks: one process-wide pool, sized by a setting.

Blosc (numcodecs), crc32c and file I/O release the GIL, so chunks encode and decode in parallel on
plain Python threads. zarr turns Blosc's own thread pool off (``numcodecs.blosc.use_threads = False``,
a process-wide switch), and that pool compresses one chunk at a time under a global lock anyway:
trajstore runs one single-threaded Blosc context per chunk on this pool instead
(benchmarks/bench_codecs.py measures both).

How many threads: :func:`set_threads`, else the ``TRAJSTORE_THREADS`` environment variable, else
the cores this process may run on (``os.sched_getaffinity``). 1 turns the pool off: every chunk
is then encoded and decoded on the calling thread, as before.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

from .errors import InvalidArgumentError

ENV = "TRAJSTORE_THREADS"
T = TypeVar("T")
R = TypeVar("R")

_lock = threading.Lock()
_setting: int | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_local = threading.local()  # .worker: this thread is one of the pool's


def cores() -> int:
    """Cores this process may run on (asked of the OS at most once a second: it is asked per chunk)."""
    global _cores
    now = time.monotonic()
    if now - _cores[1] < 1.0:
        return _cores[0]
    try:
        count = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        count = max(1, os.cpu_count() or 1)
    _cores = (count, now)
    return count


_cores = (1, -float("inf"))  # (cores, when asked)


def threads() -> int:
    """Threads that encode or decode chunks: :func:`set_threads`, else ``TRAJSTORE_THREADS``, else :func:`cores`.

    Never raises: a ``TRAJSTORE_THREADS`` that is not a positive integer is reported once, with a
    RuntimeWarning, and the cores are used. The setting only decides how fast chunks are encoded and
    decoded, never what is stored or read, so a typo in it must not fail (or, worse, be reported as
    damage by) a read, a verify or a repair deep inside a job, nor an append already acknowledged."""
    if _setting is not None:
        return _setting
    value = os.environ.get(ENV, "").strip()
    if not value:
        return cores()
    parsed = _parsed.get(value)
    if parsed is None:
        parsed = _parse(value)
        with _lock:
            _parsed[value] = parsed
    return parsed or cores()


_parsed: dict[str, int] = {}  # TRAJSTORE_THREADS values seen: their thread count, 0 where invalid


def _parse(value: str) -> int:
    """The thread count ``value`` (a ``TRAJSTORE_THREADS``) asks for, or 0 (warned) when it is invalid."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n >= 1:
        return n
    warnings.warn(f"{ENV}={value!r} is not a positive number of threads: ignored, using the {cores()} cores "
                  f"this process may run on. Set it to 1 to turn parallel encoding and decoding off, or unset "
                  "it", RuntimeWarning, stacklevel=3)
    return 0


def set_threads(n: int | None) -> None:
    """Use ``n`` threads to encode and decode chunks from now on (None: back to ``TRAJSTORE_THREADS`` or the cores)."""
    global _setting
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InvalidArgumentError(f"threads must be a positive int (1: no parallel encoding), got {n!r}")
    _setting = n


def _mark_worker() -> None:
    _local.worker = True


def _submit_to_pool(size: int, run: Callable[[], None]) -> None:
    """Queue ``run`` on the pool of ``size`` threads (made, replacing one of another size, if needed).
    Under the lock, so that a concurrent :func:`set_threads` cannot shut the pool down in between."""
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != size:
            old, _pool, _pool_size = _pool, ThreadPoolExecutor(size, "trajstore-codec", _mark_worker), size
            if old is not None:
                old.shutdown(wait=False)  # its queued work still runs; new work goes to the new pool
        _pool.submit(run)


class _Task:
    """``fn(*args)`` run exactly once, by a pool thread or, when the pool cannot take it, by the submitter."""

    def __init__(self, fn: Callable[..., R], args: tuple):
        self.fn, self.args = fn, args
        self.future: Future = Future()
        self._claim = threading.Lock()  # whoever takes it runs the task

    def run(self) -> None:
        if not self._claim.acquire(blocking=False):
            return  # already run (or running) elsewhere
        self.future.set_running_or_notify_cancel()
        try:
            self.future.set_result(self.fn(*self.args))
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller through the future
            self.future.set_exception(exc)
        finally:
            self.fn = self.args = None  # drop the references to the caller's buffers


def _after_fork() -> None:  # a forked child has the pool object but none of its threads
    global _pool, _pool_size, _lock, _cores
    _pool, _pool_size, _lock, _cores = None, 0, threading.Lock(), (1, -float("inf"))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)

threads()  # a bad TRAJSTORE_THREADS is warned about at import, up front (a value set later: at first use)


def in_worker() -> bool:
    """True on one of the pool's threads (work submitted from there runs inline: no deadlock)."""
    return getattr(_local, "worker", False)


def submit(fn: Callable[..., R], *args) -> "Future[R]":
    """Run ``fn(*args)`` on the pool (inline, as a finished future, with one thread or on a pool thread).

    Never fails for want of the pool: where it cannot take the work (no new thread can be started,
    the interpreter is shutting down) ``fn`` runs here, inline, so such an error never reaches a read
    as if the data were at fault. Work queued before such an error runs exactly once."""
    task = _Task(fn, args)
    size = threads()
    if size > 1 and not in_worker():
        try:
            _submit_to_pool(size, task.run)
        except RuntimeError:  # "can't start new thread", "cannot schedule new futures after shutdown"
            task.run()  # a no-op if a pool thread took it meanwhile: the future then completes there
    else:
        task.run()
    return task.future


def pmap(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]`` on the pool, in order. Every call finishes before this returns (none
    is left writing into a caller's buffer); then the error of the first failed item, in order, is raised."""
    items = list(items)
    if len(items) <= 1 or threads() == 1 or in_worker():
        return [fn(x) for x in items]
    futures: list[Future] = []
    try:
        for x in items:
            futures.append(submit(fn, x))
    except BaseException:  # (KeyboardInterrupt, MemoryError): the submitted calls still use the buffers
        wait_all_quietly(futures)
        raise
    return wait_all(futures)


def wait_all(futures: "list[Future[R]]") -> list[R]:
    """Results of ``futures`` in order, after every one finished; raises the first error in order."""
    for f in futures:
        f.exception()  # waits; errors are raised below, in order
    return [f.result() for f in futures]


def wait_all_quietly(futures: "list[Future]") -> None:
    """Wait until every one of ``futures`` finished, ignoring their results and errors."""
    for f in futures:
        f.exception()
