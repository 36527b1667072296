"""The write side of :class:`~trajstore.store.TrajectoryStore`: append, flush, truncate, close, and
checks on what is appended, handed to the background writer, whose row writes (commit last) are in
_rowwrite.py (single process, or every rank of a job)."""
from __future__ import annotations

import atexit
import contextlib
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import numpy as np

from . import devicecopy, distributed, optstate
from ._lazy import is_module
from ._values import check_epoch, check_metrics, check_source, check_step
from .errors import InexactValuesError, InvalidArgumentError, LayoutMismatchError, NonFiniteError, TrajstoreError
from .format import BUFFERS, METRICS, PARAMS, REFERENCE, ROW_ARRAYS, STEP
from .layout import BF16, ParamLayout, finite_mask, float32_to_bf16_bits
from ._rowwrite import RowWriting
from .writer import Job

OPEN_WRITERS: "weakref.WeakSet[Appending]" = weakref.WeakSet()


@dataclass
class SnapshotJob(Job):
    """A Job with the optimizer state captured with the snapshot (stores that record it)."""

    optimizer: "optstate.Captured | None" = None


def _close_at_exit() -> None:
    """Commit what ``append()`` acknowledged when a script ends (normally or by an uncaught
    exception) without ``close()``: the writer thread is a daemon and would die with the interpreter."""
    for store in list(OPEN_WRITERS):
        try:
            store._close_local()  # no collectives at exit: the other ranks may be gone
        except Exception as exc:  # noqa: BLE001 -- report, keep closing the others
            sys.stderr.write(f"trajstore: closing {store.path} at exit failed: {exc}\n")


# Run before the interpreter shuts down thread pools (which zarr's I/O needs): the hook that
# concurrent.futures itself uses. Plain atexit runs too late for that; it stays as the fallback.
getattr(threading, "_register_atexit", atexit.register)(_close_at_exit)


def _matches(flatten: "Callable[[], np.ndarray]", stored: "Callable[[], np.ndarray]") -> bool:
    """Whether the flattened source equals the stored row bit for bit (NaN equal to NaN); False when the
    store's dtype cannot hold the source's values, since then it is not the snapshot, whatever that holds."""
    try:
        want = flatten()
    except InexactValuesError:
        return False
    return bool(np.array_equal(stored(), want, equal_nan=True))


class Appending(RowWriting):
    """Mixin of TrajectoryStore: everything that writes rows. It reads through ``read``
    (:class:`trajstore._reading.Reading`) and the store's ``_row_values``, ``reader``, ``array``,
    ``metric_names`` and ``_check_index`` (store.py)."""

    def holds(self, source: object, index: int) -> bool:
        """Whether snapshot ``index`` equals ``source``'s parameters bit for bit (NaN equal to NaN).

        Collective in a multi-process recording: every rank compares the columns it writes (rank 0
        all of them when parameters are replicated) and every rank gets the same answer."""
        if self._ctx is None:
            return _matches(lambda: self.layout.flatten_into(source, np.empty(self.n_params, self.dtype)),
                            lambda: self.read(index))
        same, error = True, None
        try:
            distributed.reshard(source)
            if self._ctx.sharded:
                distributed.check_shards(self.layout, source, self._ctx.rank, self._ctx.world)
                i, (lo, hi) = self._check_index(index), self._cols
                want = np.empty(hi - lo, self.dtype)
                same = _matches(lambda: distributed.flatten_local(self.layout, source, want) or want,  # fills want
                                lambda: self.reader().read_block(i, i + 1, lo, hi)[0])
            elif distributed.has_shards(source):
                raise LayoutMismatchError(f"{self.path} was recorded unsharded, and the model resuming it holds FSDP2 "
                                          "shards: resume with the wrapping it was recorded with, or use a new store")
            elif self._ctx.rank == 0:
                same = _matches(lambda: self.layout.flatten_into(source, np.empty(self.n_params, self.dtype)),
                                lambda: self.read(index))
        except BaseException as exc:  # noqa: BLE001 -- raised on every rank by exchange
            error = exc
        return all(self._ctx.exchange(error, same, op="holds"))

    def append(self, source: object, *, step: int, epoch: int | None = None,
               metrics: Mapping[str, float] | None = None, allow_nonfinite: bool = False,
               optimizer: object = None) -> int:
        """Queue one snapshot; returns its index. The copy is taken now, writing happens in the background.

        ``source``: nn.Module, state_dict, or a flat tensor/array (n,). Raises LayoutMismatchError
        on a wrong length or layout, NonFiniteError on NaN/Inf (unless ``allow_nonfinite``), and
        any error of an earlier background write. ``optimizer``: the model's torch optimizer, required
        by (and only by) a store created with ``optimizer_state=True``; its per-parameter state is
        copied now too and committed with the snapshot (``source`` must then be the nn.Module).
        CUDA weights (one device, the store's dtype, no ``optimizer``) are copied without stalling training
        (devicecopy.py): the weights as of this call land in host memory later, and NaN/Inf is seen only
        then. Unless ``allow_nonfinite``, that snapshot and all appended after it are not recorded (earlier
        ones stay committed) and the next append/flush/close raises NonFiniteError naming its step; reopen
        the store (mode ``"a"``) to record again. With ``allow_nonfinite=True`` it is recorded and flagged.
        """
        # one append at a time: appends from several threads would take row indices and check their steps
        # in interleaved order (rows committed with steps going back); each now waits for the one before
        with self._writing():
            return self._append(source, step, epoch, metrics, allow_nonfinite, optimizer)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the store's append lock: other threads wait; the same thread coming back in (a signal
        handler saving a last snapshot while an append runs, a hook called inside one) is refused with a
        typed error instead of waiting for itself forever or interleaving with the append it interrupted."""
        lock = self.__dict__.setdefault("_append_lock", threading.RLock())
        with lock:
            if self.__dict__.get("_inside_append"):
                raise InvalidArgumentError(
                    f"{self.path}: append or truncate was called while an append of this store was running on the "
                    "same thread (from a signal handler or a hook inside append?). Record from the training loop: "
                    "let the handler set a flag, and append after the interrupted call returns")
            self._inside_append = True
            try:
                yield
            finally:
                self._inside_append = False

    def _append(self, source: object, step: int, epoch: int | None, metrics: Mapping[str, float] | None,
                allow_nonfinite: bool, optimizer: object) -> int:
        self._check_writable()
        optstate.check_source(bool(self._meta.get("optimizer_state")), optimizer, self.path)
        # everything is validated before a row index or a staging buffer is taken: a refused
        # append leaves the store exactly as it was
        if self._ctx is None:
            buf, nonfinite, buffers, step, epoch, metrics, ready = self._prepare(source, step, epoch, metrics,
                                                                                 allow_nonfinite, optimizer)
            try:
                captured = self._capture_optimizer(optimizer, source, step, allow_nonfinite)
            except BaseException:
                self._writer.release(buf)
                raise
            nonfinite = nonfinite or (captured is not None and captured.nonfinite is not None)
        else:  # collective: every rank stops with the first error any rank had, or none does
            prepared, error = None, None
            try:
                prepared = self._prepare(source, step, epoch, metrics, allow_nonfinite)
            except BaseException as exc:  # noqa: BLE001 -- raised on every rank by exchange
                error = exc
            try:
                # the row index and step name the call: ranks that disagree (one appended once more, or
                # truncated elsewhere) all raise instead of writing their parts into different rows
                flags = self._ctx.exchange(error, prepared[1] if prepared else False,
                                           op=f"append of row {self._next_index} at step {step!r}")
            except BaseException:
                if prepared is not None and prepared[0] is not None:
                    self._writer.release(prepared[0])
                raise
            buf, _, buffers, step, epoch, metrics, ready = prepared
            nonfinite = any(flags)  # the row is non-finite when any rank's part is
            captured = None  # refused in multi-process recordings (optstate.refuse_multiprocess)
        index = self._next_index
        self._next_index += 1
        self._last_step = step
        if self._writer is not None:
            job = SnapshotJob(index, buf, step, epoch, time.time(), metrics, buffers, nonfinite, ready=ready,
                              optimizer=captured)
            # in a job, an error of the writer surfacing only now would be raised on this rank alone: it
            # waits for the next acquire or flush, which every rank exchanges
            try:
                self._writer.submit(job, check=self._ctx is None)
            except BaseException:  # an earlier background error: this row is not queued, its buffer is free
                if ready is not None:  # once a device copy into it has landed
                    try:
                        ready()
                    except BaseException:  # noqa: BLE001 -- its verdict no longer matters
                        pass
                self._writer.release(buf)
                raise
        return index

    def _capture_optimizer(self, optimizer: object, source: object, step: int,
                           allow_nonfinite: bool) -> "optstate.Captured | None":
        """The optimizer's state now, checked like the weights (finite unless ``allow_nonfinite``)."""
        if optimizer is None:
            return None
        if not hasattr(self, "_optim_dtypes"):
            self._optim_dtypes = optstate.known_dtypes(self._group)
        captured = optstate.capture(optimizer, source, self.layout, self.columns, self._optim_dtypes)
        if captured.nonfinite is not None and not allow_nonfinite:
            raise NonFiniteError(
                f"snapshot at step {step}: the {captured.nonfinite} holds NaN or Inf; it was not recorded "
                "(training has diverged?). Pass allow_nonfinite=True to record it anyway")
        return captured

    def _prepare(self, source: object, step: object, epoch: object, metrics: Mapping | None,
                 allow_nonfinite: bool, optimizer: object = None) -> tuple:
        """Check one snapshot and copy this process's columns of it into a staging buffer.

        Returns (buffer or None, non-finite, buffers row, step, epoch, metrics, ready: what the writer waits
        on for CUDA weights still being copied, else None); raises, with the buffer given back, when the
        snapshot cannot be recorded."""
        step, epoch, metrics = check_step(step, "step"), check_epoch(epoch), check_metrics(metrics)
        if self._last_step is not None and step <= self._last_step:
            raise InvalidArgumentError(
                f"step {step} does not follow step {self._last_step}, the store's last snapshot: steps must "
                "strictly increase. A resumed run drops the later snapshots first (truncate_after_step, or "
                "Recorder.start(step)); a new run records to a new path")
        check_source(source)
        if is_module(source):
            self.layout.check_same(ParamLayout.from_module(source), "model")
        sharded = self._ctx is not None and self._ctx.sharded
        if self._ctx is not None:
            distributed.reshard(source)  # an evaluation forward leaves FSDP2's root parameters gathered
        if sharded:
            distributed.check_shards(self.layout, source, self._ctx.rank, self._ctx.world)
        elif distributed.has_shards(source):
            raise LayoutMismatchError(
                f"{self.path} was recorded unsharded (one process, or DDP's rank 0), and this snapshot holds FSDP2 "
                "shards (DTensors): resume it with the same wrapping it was recorded with, or record the FSDP2 run "
                "into a new store")
        if self._writer is None:
            return None, False, None, step, epoch, metrics, None  # a rank that writes nothing (DDP, rank > 0)
        plan = devicecopy.select(self, source, optimizer)  # CUDA weights: copied without stalling training
        buf = self._writer.acquire()
        try:
            if plan is not None:  # checked for NaN/Inf by the writer thread, once the copy has landed
                buffers, ready = plan.copier.capture(plan, buf, self, step, allow_nonfinite)
                return buf, False, buffers, step, epoch, metrics, ready
            try:
                if sharded:  # into the store's dtype (bfloat16: its bits), half types exactly or refused
                    distributed.flatten_local(self.layout, source, buf)
                elif self.columns.is_identity:
                    self.layout.flatten_into(source, buf)
                else:  # a replicated model appending to a store recorded sharded
                    buf[:] = self.columns.to_stored(self.layout.flatten_into(source, np.empty(self.n_params, self._raw)))
            except (TypeError, RuntimeError, ValueError, KeyError, AttributeError) as exc:
                if isinstance(exc, TrajstoreError):
                    raise
                raise LayoutMismatchError(f"snapshot at step {step} does not fit the store's layout "
                                          f"({type(exc).__name__}: {exc}); nothing was recorded") from None
            nonfinite = not finite_mask(buf, self.values).all()
            if nonfinite and not allow_nonfinite:
                where = "this rank's shards" if sharded else self._first_nonfinite(buf)
                raise NonFiniteError(
                    f"snapshot at step {step} holds NaN or Inf in {where}; it was not recorded (training has "
                    "diverged?). Pass allow_nonfinite=True to record it anyway")
            buffers = self._flatten_buffers(source) if self._ctx is None or self._ctx.rank == 0 else None
        except BaseException:
            self._writer.release(buf)
            raise
        return buf, nonfinite, buffers, step, epoch, metrics, None

    def flush(self) -> None:
        """Block until every queued snapshot is committed; raises a background error if one occurred.
        Collective in a multi-process recording: every rank raises the first rank's error."""
        if self._ctx is None:
            if self._writer is not None:
                self._writer.flush()
            return
        error = None
        try:
            if self._writer is not None:
                self._writer.flush()
        except BaseException as exc:  # noqa: BLE001 -- raised on every rank by exchange
            error = exc
        metas = self._ctx.exchange(error, self._meta if self._ctx.rank == 0 else None, op="flush")
        self._meta = metas[0]  # rank 0 commits: the count (and truncations) it wrote

    def close(self) -> None:
        """Flush, stop the writer and release the lock. Raises a background error if one occurred.
        Collective in a multi-process recording (see :meth:`flush`)."""
        if self._closed:
            return
        error = None
        if self._ctx is not None and distributed.is_alive():
            try:
                self.flush()
            except BaseException as exc:  # noqa: BLE001 -- raised after the local close
                error = exc
        self._close_local()
        if error is not None:
            raise error

    def _close_local(self, repeat_failure: bool = True) -> None:
        """Stop this process's writer (after it wrote what was queued) and release the lock it holds.
        ``repeat_failure=False``: a writer error already raised is not raised again."""
        if self._closed:
            return
        self._closed = True
        OPEN_WRITERS.discard(self)
        try:
            if self._writer is not None:
                self._writer.close(repeat_failure)
        finally:
            self._device_copier = None  # its device staging buffer (freed once its copies are done)
            if self._lock is not None:
                self._lock.release()
            if self._ctx is not None and self._writer is not None and self._ctx.sharded:
                distributed.release(self._ctx)  # the writers' group of this store, its thread stopped

    def truncate(self, length: int) -> None:
        """Drop every snapshot from index ``length`` on (a resumed run replaces what came after its checkpoint)."""
        with self._writing():  # never in the middle of another thread's append
            self._truncate(length)

    def _truncate(self, length: int) -> None:
        self._check_writable()
        self.flush()
        error = None
        try:
            length = check_step(length, "length")
            if not 0 <= length <= len(self):
                raise InvalidArgumentError(f"cannot truncate to {length}: the store holds {len(self)} snapshots")
        except BaseException as exc:  # noqa: BLE001 -- every rank raises it (or this one alone)
            error = exc
        if self._ctx is not None:
            self._ctx.exchange(error, op=f"truncate to {length!r}")
        elif error is not None:
            raise error
        if length == len(self):
            return
        meta = dict(self._meta)
        meta["committed"] = length
        meta["truncations"] = list(meta.get("truncations", [])) + [length]
        if self._ctx is None:
            self._commit_meta(meta)
            self._load_encoder_state()
            return
        self._ctx.run_on_zero(lambda: self._commit_meta(meta), op="truncate")
        self._meta = meta
        error = None
        try:
            self._load_encoder_state()
        except BaseException as exc:  # noqa: BLE001 -- raised on every rank by exchange
            error = exc
        self._ctx.exchange(error, op="truncate")

    def truncate_after_step(self, step: int) -> int:
        """Drop every snapshot with a step greater than ``step``; returns the new length."""
        with self._writing():
            self._check_writable()
            step = check_step(step, "step")
            self.flush()  # the snapshots still queued count: without this they were committed, then cut
            later = self.steps > step  # (t,)
            keep = int(np.argmax(later)) if later.any() else len(later)
            self._truncate(keep)
            return keep


    def _first_nonfinite(self, buf: np.ndarray) -> str:
        for spec, lo, hi in zip(self.layout.specs, self.layout.offsets, self.layout.offsets[1:]):
            if not finite_mask(buf[lo:hi], self.values).all():
                return f"tensor {spec.name!r}"
        return "the snapshot"

    def _flatten_buffers(self, source: object) -> np.ndarray | None:
        if self.buffer_layout is None:
            return None
        if not (is_module(source) or isinstance(source, Mapping)):
            raise InvalidArgumentError("this store records buffers: append a module or state_dict, not a flat vector")
        out = np.empty(self.buffer_layout.n, np.float64)
        return self.buffer_layout.flatten_into(source, out)

    def _load_encoder_state(self) -> None:
        """Where the next append goes, and the decoded rows the row transform needs."""
        t = len(self)
        self._next_index = t
        self._last_step: int | None = int(self._row_values(STEP)[-1]) if t else None  # appends must exceed it
        if self._ctx is not None and not self._ctx.is_writer:
            return  # a rank that writes nothing needs no decoded rows
        lo, hi = self._cols
        if self.codec.transform == "xor" and t > 0:
            prev = self.reader().read_block(t - 1, t, lo, hi)[0]
            # the xor runs on stored bits: a bfloat16 row back from its exact float32 widening
            self._prev = float32_to_bf16_bits(prev) if self.values == BF16 else prev.copy()
        if self.codec.transform == "delta" and t > 0:
            reference = self.array(REFERENCE)
            if reference.shape != (1, self.n_columns):
                raise self._damaged(REFERENCE, ValueError(f"shape {reference.shape}, not (1, {self.n_columns})"))
            try:
                self._reference = reference[0, lo:hi]
            except (ValueError, RuntimeError, OSError, IndexError, ArithmeticError) as exc:  # checksum, decode
                raise self._damaged(REFERENCE, exc) from None

    def _check_row_arrays(self) -> None:
        """Damaged metadata of a per-snapshot array is a typed error before anything is written."""
        for name in self._row_array_names():
            if name not in (PARAMS, BUFFERS):
                self._row_values(name)

    def _row_array_names(self) -> list[str]:
        """Every array with one row per snapshot (params, reference excluded: it has one row)."""
        names = [PARAMS, *([BUFFERS] if self.buffer_layout is not None else []), *ROW_ARRAYS]  # always there
        return names + [f"{METRICS}/{name}" for name in self.metric_names()]
