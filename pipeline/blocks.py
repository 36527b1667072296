"""The one block loop of every extraction pass: plan the column blocks, read one, widen it to float64.

Every pass (the Gram, the basis, the randomized sketches) is one task per column block of the
(t, n) trajectory: the task decodes its (t_S, C) float32 rows, then walks them SUB_BLOCK columns
at a time, each widened to float64 exactly (never a float32 product), shifted by one row or
centred over the rows, and optionally mapped by a sampling transform Aᵀ (t', t_S) first. Memory
is bounded by the block whatever n is. Per-thread scratch buffers keep the heap from growing.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable, Iterator, Sequence

import numpy as np

from trajstore import TrajectoryStore
from trajstore.errors import NonFiniteError
from trajstore.reader import RowReader

from .compute import Progress, StopFlag, run_tasks
from .sampling import Sampling

SUB_BLOCK = 1 << 13  # columns widened to float64 at a time: t x 8K x 8 bytes stays in cache


def block_columns(store: TrajectoryStore, block_size: int | None = None) -> int:
    """Columns per task: the store's inner chunk (never split a chunk across tasks) unless given."""
    chunk = int(store.array("params").chunks[1])
    if block_size is None:
        return chunk
    return max(chunk, chunk * round(block_size / chunk))


def column_blocks(n: int, width: int) -> list[tuple[int, int]]:
    """``[(c0, c1), ...]`` covering ``range(n)`` ``width`` columns at a time."""
    return [(c0, min(n, c0 + width)) for c0 in range(0, n, width)]


def plan(store: TrajectoryStore, block_size: int | None = None) -> list[tuple[int, int]]:
    """The column blocks of one pass over ``store`` (one task each)."""
    return column_blocks(store.n_columns, block_columns(store, block_size))


_thread_scratch = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A per-thread buffer reused across tasks: big blocks are not re-allocated for every task,
    which keeps the heap (and so peak RSS) from growing with fragmentation."""
    size = int(np.prod(shape))
    arr = getattr(_thread_scratch, name, None)
    if arr is None or arr.size < size or arr.dtype != np.dtype(dtype):
        arr = np.empty(size, dtype)
        setattr(_thread_scratch, name, arr)
    return arr[:size].reshape(shape)


def read_rows(reader: RowReader, rows: Sequence[int], c0: int, c1: int) -> np.ndarray:
    """Decoded rows (a list of indices) and columns [c0, c1): (len(rows), c1 - c0) float32, read into a
    per-thread buffer when the rows are contiguous."""
    rows = list(rows)
    lo, hi = min(rows), max(rows) + 1
    block = reader.read_block(lo, hi, c0, c1, out=scratch("rows", (hi - lo, c1 - c0), reader.dtype))
    if rows == list(range(lo, hi)):
        return block
    return block[np.asarray(rows) - lo]


def widen_shifted(x: np.ndarray, buf: np.ndarray, shift: int = 0, ref: np.ndarray | None = None) -> np.ndarray:
    """D = x − x[shift] for a (t, S) float32 block, computed in float64 (exact) into ``buf``.

    ``ref`` is ``x[shift]`` already widened to float64 (S,), when the caller has it. The block is widened by
    a plain cast copy and the row subtracted in float64: the same values, rounded once, as a float64
    ``np.subtract`` of the float32 operands, at about 2/3 of its time (that casts inside the ufunc loop)."""
    out = buf[:, : x.shape[1]]
    np.copyto(out, x)  # exact: every float32 is a float64
    np.subtract(out, x[shift].astype(np.float64) if ref is None else ref, out=out)
    return out


def wide_blocks(x: np.ndarray, *, shift: int | None = 0, centre: bool = False,
                transform: "Sampling | None" = None, dtype=np.float64) -> Iterator[tuple[int, np.ndarray]]:
    """``(s0, d)`` for each SUB_BLOCK columns of a decoded (t_S, C) block ``x``; ``d`` is float64.

    ``d`` is ``x − x[shift]`` (t_S, S) (exact: the difference of two float32 values is rounded once in
    float64), or with ``transform`` (a :class:`~pipeline.sampling.Sampling`, the map A (t_S, t') never formed)
    the sampled rows ``Aᵀ (x − x[shift])`` (t', S) by ``transform.apply_to_block``: A's
    columns sum to 1, so this is the sampled trajectory shifted by ``x[shift]``. ``centre`` then subtracts
    the mean over the rows (C D: centring in snapshot space). ``d`` lives in a per-thread buffer: use it
    before the next step of the loop. ``dtype=np.float32`` (the basis pass's opt-in float32 product, never
    the Gram) subtracts in float32 instead: each difference is rounded to float32 once.
    """
    t = x.shape[0]
    if np.dtype(dtype) == np.float32:
        buf32 = scratch("narrow", (t, SUB_BLOCK), np.float32)
        for s0 in range(0, x.shape[1], SUB_BLOCK):
            sub = x[:, s0:s0 + SUB_BLOCK]
            d = np.subtract(sub, sub[shift or 0], out=buf32[:, :sub.shape[1]])  # (t_S, S) float32
            if transform is not None:
                d = transform.apply_to_block(d)  # (t', S)
            if centre:
                d -= d.mean(axis=0)
            yield s0, d
        return
    buf = scratch("wide", (t, SUB_BLOCK), np.float64)
    ref = x[shift or 0].astype(np.float64)  # (C,) the shift row, widened once per block
    for s0 in range(0, x.shape[1], SUB_BLOCK):
        d = widen_shifted(x[:, s0:s0 + SUB_BLOCK], buf, shift or 0, ref[s0:s0 + SUB_BLOCK])  # (t_S, S) float64
        if transform is not None:
            d = transform.apply_to_block(d)  # (t', S): the EMA recurrence or window means
        if centre:
            d -= d.mean(axis=0)
        yield s0, d


def check_finite(result: np.ndarray, x: np.ndarray, path: str, c0: int, c1: int,
                 rows: Sequence[int] | None = None) -> None:
    """Refuse a block product that is not finite: the block ``x`` (its rows ``rows`` of the store) holds NaN
    or Inf that was not recorded as such (``allow_nonfinite``), i.e. damaged data (NonFiniteError)."""
    if np.isfinite(result).all():  # NaN/Inf in the data always reach the products (float32 cannot overflow them)
        return
    bad = int(np.argmax(~np.isfinite(x).all(axis=1)))
    bad = int(rows[bad]) if rows is not None else bad
    raise NonFiniteError(
        f"snapshot {bad} of {path} holds NaN or Inf in columns {c0}..{c1 - 1}, but it was not recorded "
        f"as non-finite: its data is damaged. Run `trajstore verify {path}`, then `trajstore repair`")


def run_resumable(blocks: Sequence[tuple[int, int]], done: np.ndarray, task: Callable[..., object],
                  scheduler: object = None, progress: Progress | None = None, stop: StopFlag | None = None,
                  finished: Callable[[int], None] | None = None) -> int:
    """Run ``task(block, c0, c1)`` for every block not flagged in ``done``; return how many were done before.

    The tasks write their own results and flags into the store (so they are idempotent and a killed
    pass resumes); ``progress(done, total)`` counts the blocks resumed as done. ``task`` must be
    picklable for a dask.distributed scheduler (a module-level function or a ``functools.partial``).
    ``finished(block)`` is called in the calling thread as each pending block's task finishes.
    """
    pending = [b for b in range(len(blocks)) if not done[b]]
    offset = len(blocks) - len(pending)
    if progress:
        progress(offset, len(blocks))
    tasks = [functools.partial(task, b, *blocks[b]) for b in pending]
    run_tasks(tasks, scheduler, (lambda k, total: progress(offset + k, len(blocks))) if progress else None, stop,
              finished=(lambda i: finished(pending[i])) if finished else None)
    return offset
