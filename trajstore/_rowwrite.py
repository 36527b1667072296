"""What the background writer thread runs for one snapshot: grow the per-snapshot arrays, write this
process's columns of the row and its per-snapshot values, then commit (single process, or every rank of a
sharded job, each phase ending in a collective). The base class of :class:`trajstore._appending.Appending`."""
from __future__ import annotations

import numpy as np
import zarr

from . import optstate, shardwrite
from ._creating import BACKFILL, backfill, create_row_array
from .chunkwrite import ChunkWriter
from .durability import commit_files, fsync_paths, row_files
from .format import ATTR, BUFFERS, EPOCH, METRICS, NONFINITE, PARAMS, REFERENCE, STEP, WALL_TIME
from .writer import Job


class RowWriting:
    """Row writes with the commit last (runs on the background writer thread)."""

    def _ensure_capacity(self, rows: int) -> None:
        """Grow every per-snapshot array to hold ``rows`` rows. Each array is checked on its own: a
        writer killed between two resizes leaves them at different sizes, and that must heal. Once
        every array holds ``capacity`` rows, rows up to it need no check (arrays made later, a metric
        or an optimizer-state key, are made that long); growing doubles, so this opens them rarely."""
        if rows <= getattr(self, "_capacity", 0):
            return
        self._capacity = 0
        self._writables = {}  # arrays opened before a resize hold the old shape
        arrays = [self.array(name) for name in self._row_array_names()] + optstate.arrays(self._group)
        largest = max(arr.shape[0] for arr in arrays)
        capacity = largest if largest >= rows else max(rows, 2 * largest, 16)
        for arr in arrays:
            if arr.shape[0] < capacity:
                arr.resize((capacity, *arr.shape[1:]))
        self._capacity = capacity

    def _write_row(self, job: Job) -> None:
        """Runs on the writer thread: data rows first, the commit last."""
        if self._ctx is not None and self._ctx.sharded:
            return self._write_row_sharded(job)
        self._ensure_capacity(job.index + 1)
        with shardwrite.overlapped():  # the params shards are written on other threads while the rest is
            self._write_params(job)
            self._write_row_arrays(job)
            if self._meta.get("optimizer_state"):  # every key's row, before the commit: a snapshot is whole or absent
                optstate.write_row(self._group, job.index, getattr(job, "optimizer", None) or optstate.Captured(),
                                   self.n_columns, len(self.layout.specs))
        if self.durable and self._local_root is not None:  # data on disk before the commit
            fsync_paths(row_files(self._local_root, job.index, self.metric_names())
                        + optstate.row_files(self._local_root, job.index))
        self._commit_meta({**self._meta, "committed": job.index + 1})

    def _write_row_sharded(self, job: Job) -> None:
        """Every rank writes its columns of row ``job.index``; rank 0 grows the arrays first and commits
        last, once every rank has written. Each phase ends in a collective over the writers' group, so
        any rank's failure is every rank's and no rank commits a row another rank did not write."""
        ctx, i, zero = self._ctx, job.index, self._ctx.rank == 0

        def phase(work) -> None:
            error = None
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 -- raised on every rank by exchange
                error = exc
            ctx.exchange(error, group=ctx.writer_group, op=f"write row {i}")

        phase(lambda: self._ensure_capacity(i + 1) if zero else None)

        def write() -> None:
            self._write_params(job)
            if zero:
                self._write_row_arrays(job)

        phase(write)

        def commit() -> None:
            if zero:
                if self.durable and self._local_root is not None:  # every rank's files, written by now
                    fsync_paths(row_files(self._local_root, i, self.metric_names()))
                self._commit_meta({**self._meta, "committed": i + 1})

        phase(commit)
        if not zero:
            self._meta = {**self._meta, "committed": i + 1}

    def _write_params(self, job: Job) -> None:
        """This process's columns of row ``job.index`` (and of the reference row, for delta codecs)."""
        i, row = job.index, job.row  # row: (hi - lo,) this process's columns
        lo, hi = self._cols
        if hi == lo:
            return  # a rank that holds no elements
        if self.codec.transform == "delta" and i == 0:
            self._writable(REFERENCE)[0, lo:hi] = row
            self._reference = row.copy()
        stored = self.codec.encode(row, i, self._prev, self._reference)
        local = None if self._local_root is None else self._local_root / PARAMS
        if not shardwrite.write_row(local, i, lo, stored):  # whole local shards, chunks encoded in parallel
            self._writable(PARAMS)[i, lo:hi] = stored
        if self.codec.transform == "xor":
            if self._prev is None:
                self._prev = np.empty_like(row)
            self._prev[:] = row

    def _write_row_arrays(self, job: Job) -> None:
        """Buffers, step, epoch, wall time, non-finite flag and metrics of row ``job.index``."""
        i = job.index
        if job.buffers is not None:
            self._writable(BUFFERS)[i, :] = job.buffers
        self._set(STEP, i, job.step)
        self._set(EPOCH, i, job.epoch)
        self._set(WALL_TIME, i, job.wall_time)
        self._set(NONFINITE, i, job.nonfinite)
        known = self._metrics_known()
        for name in sorted(set(job.metrics) - known):
            metrics_group = self._group[METRICS]
            if name not in metrics_group:
                arr = create_row_array(metrics_group, name, self._group[PARAMS].shape[0], "float64", float("nan"),
                                       {BACKFILL: i} if i else None)
                if i:
                    backfill(arr, i)
            known.add(name)
        for name in sorted(known):
            self._set(f"{METRICS}/{name}", i, job.metrics.get(name, float("nan")))

    def _metrics_known(self) -> set[str]:
        """The metric arrays of the store (listed once per writer; the writer adds those it makes)."""
        if self.__dict__.get("_metrics") is None:
            self._metrics = set(self._group[METRICS].array_keys())
        return self._metrics

    def _set(self, name: str, i: int, value: object) -> None:
        """Element ``i`` of the per-snapshot array ``name``: its chunk written whole on local disk
        (chunkwrite.py), else through zarr."""
        writers = self.__dict__.setdefault("_chunk_writers", {})
        if name not in writers:
            local = self._local_root is not None and (self._ctx is None or self._ctx.rank == 0)
            writers[name] = ChunkWriter.for_array(self._local_root / name) if local else None
        writer = writers[name]
        if writer is None:
            self._writable(name)[i] = value
            return
        arr = self._writable(name)
        writer.set(i, value, lambda lo, hi: arr[lo:hi], arr.fill_value)

    def _writable(self, name: str) -> zarr.Array:
        """Array ``name`` writing every chunk, even one equal to the fill value (a frozen layer's
        xor chunk is all zero bits): on read, a missing chunk of a committed row is damage.

        Opened once per writer (opening reads and parses its metadata: a few ms of GIL a row) and
        dropped when :meth:`_ensure_capacity` grows the arrays. Only where this process does the
        growing: another rank of a sharded recording reopens it, since rank 0 resizes it."""
        if self._ctx is not None and self._ctx.rank != 0:
            return self._group[name].with_config({"write_empty_chunks": True})
        writables = self.__dict__.setdefault("_writables", {})
        arr = writables.get(name)
        if arr is None:
            arr = writables[name] = self._group[name].with_config({"write_empty_chunks": True})
        return arr

    def _commit_meta(self, meta: dict) -> None:
        self._group.attrs[ATTR] = meta  # one JSON document, replaced atomically
        self._meta = meta
        if self.durable and self._local_root is not None:
            fsync_paths(commit_files(self._local_root))
