"""Background writer: staging buffers, a bounded queue and back-pressure.

``submit`` takes a filled staging buffer and returns at once; a single thread writes rows
in order through a ``write_row`` callback and hands the buffer back to the pool. Within a
row, the params shards of a local store are encoded on the :mod:`.parallel` pool and written
while the row's small arrays are (:mod:`.shardwrite`); rows still commit one at a time, in order. When every buffer is in flight, ``acquire`` blocks (back-pressure) rather than
letting memory grow. The first error in the thread is kept and raised, once, from the
next ``acquire``/``submit``/``flush``/``close`` in the caller's thread; it is never swallowed.

A job whose row is still being copied in (from a CUDA device, :mod:`.devicecopy`) carries ``ready``:
the thread calls it before it reads the row. It waits for the copy, returns whether the row holds
NaN/Inf, or raises to refuse the row; a refused row, like a failed one, stops the writer: none of the
rows queued after it is written either. :meth:`BackgroundWriter.restage` swaps the staging buffers for
others (page-locked host memory, which device copies need to be asynchronous). No torch here.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import StoreWriteError


@dataclass
class Job:
    """One snapshot on its way to disk."""

    index: int
    row: np.ndarray  # (n,) staging buffer, owned by the writer until written
    step: int
    epoch: int
    wall_time: float
    metrics: dict[str, float] = field(default_factory=dict)
    buffers: np.ndarray | None = None  # (m,) float64
    nonfinite: bool = False
    # set when row (and buffers) are still being copied in: waits for them, returns whether the row is
    # non-finite, or raises to refuse it (and so every row after it); called by the writer thread only
    ready: Callable[[], bool] | None = None


class BackgroundWriter:
    """Single writer thread fed through a bounded queue of staging buffers."""

    def __init__(self, n: int, dtype: np.dtype, write_row: Callable[[Job], None], depth: int = 2):
        self._write_row = write_row
        self._depth = depth
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        for _ in range(depth):
            self._free.put(np.empty(n, dtype=dtype))
        self._pool_lock = threading.Lock()  # restage against buffers coming back from the thread
        self._staged: dict[int, np.ndarray] | None = None  # id -> buffer made by restage's ``make``
        self._spare: list[np.ndarray] = []  # made buffers that replace old ones as those come back
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._error: BaseException | None = None
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="trajstore-writer", daemon=True)
        self._thread.start()

    # -- caller side --------------------------------------------------------------------
    def acquire(self) -> np.ndarray:
        """A free staging buffer (n,); blocks while all are in flight."""
        self.raise_pending()
        while True:
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                self.raise_pending()
                if not self._thread.is_alive():
                    raise StoreWriteError("the background writer stopped; reopen the store with mode='a'")

    def release(self, buf: np.ndarray) -> None:
        """Give back a buffer that was acquired but not submitted."""
        self._give_back(buf)

    def restage(self, make: Callable[[], np.ndarray]) -> None:
        """Use staging buffers made by ``make`` from now on (each (n,) of the pool's dtype, e.g. page-locked
        memory): the free ones are replaced at once, those in flight as they come back. All are made here,
        before anything changes: when ``make`` raises, the pool is left as it was."""
        fresh = [make() for _ in range(self._depth)]
        with self._pool_lock:
            self._staged = {id(buf): buf for buf in fresh}
            old = []
            while True:
                try:
                    old.append(self._free.get_nowait())
                except queue.Empty:
                    break
            for _ in old:
                self._free.put(fresh.pop())
            self._spare = fresh

    def _give_back(self, buf: np.ndarray) -> None:
        with self._pool_lock:
            if self._staged is not None and id(buf) not in self._staged and self._spare:
                buf = self._spare.pop()  # an old buffer coming back after restage: dropped
            self._free.put(buf)

    def submit(self, job: Job, check: bool = True) -> None:
        """Queue a job; returns at once. ``check``: raise a background error first (else it is raised
        by the next acquire or flush, and the job is skipped by the failed thread)."""
        if check:
            self.raise_pending()
        self._jobs.put(job)

    def flush(self) -> None:
        """Wait until every submitted job is written; raise the background error if any."""
        self._jobs.join()
        self.raise_pending()

    def close(self, repeat_failure: bool = True) -> None:
        """Flush, then stop the thread. Raises a pending background error; ``repeat_failure=False``: not the
        "failed earlier" reminder of one already raised (a ``with`` block left on that very error)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self.raise_pending(repeat_failure)

    def raise_pending(self, repeat_failure: bool = True) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            self._failed = err
            raise err
        if self._failed is not None and repeat_failure:
            raise StoreWriteError(
                f"the background writer failed earlier ({self._failed}); nothing after the last "
                "committed snapshot was written. Fix the cause and reopen the store with mode='a'"
            )

    # -- thread side --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                skip = self._error is not None or self._failed is not None
                if job.ready is not None:  # even a skipped row's copy must land before its buffer is reused
                    try:
                        job.nonfinite = job.ready() or job.nonfinite
                    except BaseException:
                        if not skip:
                            raise
                if not skip:
                    self._write_row(job)
            except BaseException as exc:  # kept and re-raised in the caller's thread
                self._error = exc if isinstance(exc, StoreWriteError) else _wrap(exc, job)
            finally:
                if job is not None:
                    self._give_back(job.row)
                self._jobs.task_done()


def _wrap(exc: BaseException, job: Job) -> BaseException:
    if isinstance(exc, OSError):
        err = StoreWriteError(
            f"writing snapshot {job.index} (step {job.step}) failed: {exc}. Every snapshot before it is "
            "committed and intact; free space or fix permissions, then reopen with mode='a' to resume"
        )
        err.__cause__ = exc
        return err
    return exc
