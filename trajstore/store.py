"""TrajectoryStore: append parameter snapshots to a chunked, compressed zarr v3 group.

Commit protocol (design.md): every row of snapshot t is written first, then
``committed = t + 1`` is written to the group attributes (one small JSON, replaced
atomically). Readers see rows ``[0, committed)`` only; a writer reopening a store whose
arrays run ahead of ``committed`` overwrites from ``committed``.

This module opens stores and reads their per-snapshot arrays; _reading.py reads snapshots, _appending.py
writes rows, _creating.py writes new stores.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import zarr

from . import devicecopy, distributed, optstate
from ._appending import OPEN_WRITERS, Appending
from ._reading import Reading
from ._creating import BACKFILL, backfill, chunking, create_files
from ._values import metric_key
from .codecs import CodecPreset
from .columns import ColumnMap
from .errors import CorruptMetadataError, CorruptSnapshotError, InvalidArgumentError, SnapshotIndexError
from .format import (DEFAULT_CHUNK, DEFAULT_SHARD, DERIVED_LOCK_NAME, EPOCH, LOCK_NAME, METRICS, PARAMS,
                     ROW_DTYPES, STEP, VALUES_ATTR, WALL_TIME, local_dir, normalize, open_root, zarr_store)
from .layout import BF16, ParamLayout, raw_dtype, read_dtype
from .lock import WriterLock
from .fastread import row_layout_problem
from .reader import RowReader, check_unchanged
from .writer import BackgroundWriter

__all__ = ["TrajectoryStore", "metric_key"]


class TrajectoryStore(Appending, Reading):
    """A trajectory of parameter snapshots on disk. Create with :meth:`create`, open with :meth:`open`."""

    LOCK_PURPOSE: "str | None" = None  # what the writer lock's record names as its holder (None: the usual one)

    def __init__(self, path: str, group: zarr.Group, meta: dict, mode: str, lock: WriterLock | None,
                 storage_options: dict | None, queue_depth: int = 2, durable: bool = False,
                 context: "distributed.RankContext | None" = None):
        self.path, self.mode, self.storage_options = path, mode, storage_options
        self.durable = durable  # fsync each snapshot before its commit, the commit after (local stores)
        self._local_root = local_dir(path)
        self._group, self._meta, self._lock = group, meta, lock
        self.layout = ParamLayout.from_json(meta["layout"])
        self.buffer_layout = ParamLayout.from_json(meta["buffer_layout"]) if meta.get("buffer_layout") else None
        self.codec: CodecPreset = CodecPreset.from_json(meta["codec"])
        self.values: str = meta["dtype"]  # what the rows hold: a float dtype, or "bfloat16" (its uint16 bits)
        self.dtype = read_dtype(self.values)  # what reads return: bfloat16 widened exactly to float32
        self._raw = raw_dtype(self.values)  # of the staging buffers and stored rows
        self._check_values_attr()
        self.columns = ColumnMap.from_json(self.layout.n, meta.get("columns"))  # where each parameter is stored
        self._writer: BackgroundWriter | None = None
        self.async_device_copy = devicecopy.enabled_by_default()  # CUDA weights copied without a host sync
        self._closed = False
        self._ctx = context  # a multi-process recording (distributed.py), else None
        if context is not None and context.sharded and len(self.columns.rank_columns) != context.world:
            raise InvalidArgumentError(
                f"{path} was recorded sharded over {len(self.columns.rank_columns)} ranks; this job has "
                f"{context.world}: record it with that many ranks, or into a new store")
        self._cols = (distributed.write_range(self.columns, context.rank) if context is not None and context.sharded
                      else (0, self.n_columns))  # the columns this process writes
        if context is not None and mode == "a" and meta.get("optimizer_state"):
            raise optstate.refuse_multiprocess(f"{path} records optimizer state")
        if context is not None and context.sharded and mode == "a":
            params = group[PARAMS]
            self.columns.check_aligned(int((params.shards or params.chunks)[1]))
        if mode == "a":
            self._prev: np.ndarray | None = None  # decoded last row, our columns (xor transform)
            self._reference: np.ndarray | None = None  # decoded row 0, our columns (delta transform)
            if context is None or context.rank == 0:  # the rank that commits heals what a kill left
                self._check_row_arrays()
                self._ensure_capacity(len(self))  # heal arrays left at different sizes by a kill mid-resize
                for name in self.metric_names():  # a metric created just before a kill: finish its backfill
                    arr = self._group[f"{METRICS}/{name}"]
                    if BACKFILL in arr.attrs:
                        backfill(arr, int(arr.attrs[BACKFILL]))
            self._load_encoder_state()
            if context is None or context.is_writer:
                width = self._cols[1] - self._cols[0]
                self._writer = BackgroundWriter(width, self._raw, self._write_row, depth=queue_depth)
            OPEN_WRITERS.add(self)  # flushed at interpreter exit if the script never closes it

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, path: "str | os.PathLike", source: object, *, codec: "str | CodecPreset" = "lossless",
               metadata: dict | None = None, overwrite: bool = False, buffers: bool = False,
               chunk_size: int = DEFAULT_CHUNK, shard_size: int = DEFAULT_SHARD, queue_depth: int = 2,
               storage_options: dict | None = None, durable: bool = False,
               break_lock: bool = False, process_group: object = "auto", optimizer_state: bool = False,
               async_device_copy: bool | None = None) -> "TrajectoryStore":
        """Create a store for the parameters of ``source`` (nn.Module, state_dict or ParamLayout).

        A model whose tensors all have one half type (float16 or bfloat16) is stored in it, 2 bytes a
        value; any other is widened to float32 (float64 if it has a float64 tensor), which holds its
        values exactly. ``buffers=True`` also records the module's buffers (BN running statistics) in a
        separate array. ``optimizer_state=True`` records the optimizer's per-parameter state with every
        snapshot (``append(..., optimizer=opt)``; single process only; see optstate.py).
        ``durable=True`` fsyncs each snapshot before its commit and the commit after, so
        committed snapshots survive a power loss, not only a killed process (see durability.py).
        ``async_device_copy`` (single process; default on unless ``TRAJSTORE_ASYNC_DEVICE_COPY=0``): snapshots of
        CUDA weights never stall training (trajstore/devicecopy.py; costs a device buffer the size of one
        snapshot and page-locked host staging buffers); False copies them synchronously.
        Returns the store open for appending (mode ``"a"``).

        In a torch.distributed job (``process_group="auto"``: the default group, when initialised
        with more than one rank) this is collective: every rank calls it, and later ``append``,
        ``flush``, ``truncate`` and ``close``. Replicated (DDP) parameters are written by rank 0;
        FSDP2 shards by every rank, into columns of its own (see trajstore/distributed.py).
        ``process_group=None`` records from this process alone.
        """
        kwargs = dict(codec=codec, metadata=metadata, overwrite=overwrite, buffers=buffers, chunk_size=chunk_size,
                      shard_size=shard_size, storage_options=storage_options, durable=durable, break_lock=break_lock,
                      optimizer_state=bool(optimizer_state))
        context = distributed.resolve(process_group, source, "TrajectoryStore.create")
        if context is not None and optimizer_state:  # every rank raises alike, before any collective
            raise optstate.refuse_multiprocess("TrajectoryStore.create(..., optimizer_state=True)")
        if context is not None:
            return cls._create_collective(context, normalize(path), source, queue_depth, kwargs)
        if distributed.has_shards(source):
            raise InvalidArgumentError(
                "the model's parameters are FSDP2 shards (DTensors): every rank must record, so call create on every "
                "rank with the default process_group (process_group=None records one process's whole model: DDP, or "
                "a plain copy)")
        group, meta, lock = create_files(normalize(path), source, **kwargs)
        try:
            return devicecopy.configured(cls(normalize(path), group, meta, "a", lock, storage_options, queue_depth,
                                             durable), async_device_copy)
        except BaseException:
            lock.release()
            raise

    def _check_values_attr(self) -> None:
        """The params array's ``trajstore_values`` attribute (bfloat16 bits) agrees with the group's dtype:
        with xor codecs float16 and bfloat16 rows are both uint16 on disk, so a disagreement would read
        every value as the other type."""
        try:
            attr = self._group[PARAMS].attrs.get(VALUES_ATTR)
        except (KeyError, ValueError, TypeError, AttributeError):  # ValueError: e.g. an unparsable zarr.json
            return  # missing or damaged params metadata is reported where it is read (verify, repair, reads)
        if (attr == BF16) != (self.values == BF16) or (attr is not None and attr != self.values):
            raise CorruptMetadataError(
                f"{self.path}: the store's attributes say its rows hold {self.values}, its params array's "
                f"{VALUES_ATTR} attribute says {attr or 'nothing (not bfloat16)'} (metadata damaged); restore "
                "zarr.json and params/zarr.json from a copy of the store")

    @classmethod
    def _create_collective(cls, context: "distributed.RankContext", path: str, source: object, queue_depth: int,
                           kwargs: dict) -> "TrajectoryStore":
        """Every rank: rank 0 creates the files, the others open them; any rank's error is every rank's."""
        context = distributed.for_store(context, path)
        columns, error = None, None
        try:
            layout = ParamLayout.of(source)
            if context.sharded:
                distributed.check_shards(layout, source, context.rank, context.world)
                pieces = distributed.rank_pieces(layout, context.world)
                # shards no wider than a rank's part: padding each rank to a whole shard costs < 2x columns
                widest = max(sum(length for _, length in rank) for rank in pieces)
                chunk, shard = chunking(max(1, widest), kwargs["chunk_size"], kwargs["shard_size"])
                kwargs = {**kwargs, "chunk_size": chunk, "shard_size": shard}
                columns = ColumnMap.rank_major(layout.n, pieces, shard)
        except BaseException as exc:  # noqa: BLE001 -- every rank raises it below
            error = exc
        context.exchange(error, op="create")
        created = context.run_on_zero(lambda: create_files(path, source, columns=columns, **kwargs), op="create",
                                      undo=lambda files: files[2].release())
        store, error = None, None
        try:
            if created is not None:
                store = cls(path, created[0], created[1], "a", created[2], kwargs["storage_options"], queue_depth,
                            kwargs["durable"], context)
            else:
                group, meta = open_root(path, "a", kwargs["storage_options"])
                store = cls(path, group, meta, "a", None, kwargs["storage_options"], queue_depth, kwargs["durable"],
                            context)
        except BaseException as exc:  # noqa: BLE001 -- every rank raises it below
            error = exc
        return _joined(context, store, error, path, "create", created[2].release if created is not None else None)

    @classmethod
    def open(cls, path: "str | os.PathLike", mode: str = "r", *, break_lock: bool = False,
             queue_depth: int = 2, storage_options: dict | None = None, durable: bool = False,
             process_group: object = "auto", async_device_copy: bool | None = None) -> "TrajectoryStore":
        """Open an existing store: ``mode="r"`` to read, ``"a"`` to append (takes the writer lock).

        ``durable=True`` (append only) fsyncs every snapshot before its commit, as in :meth:`create`;
        ``async_device_copy`` as there.
        In a torch.distributed job, opening to append is collective (see :meth:`create`): rank 0
        takes the lock, and a store recorded sharded is written by every rank again.
        """
        if mode not in ("r", "a"):
            raise InvalidArgumentError(f"mode must be 'r' or 'a', got {mode!r}")
        path = normalize(path)
        context = distributed.resolve(process_group, what="TrajectoryStore.open(..., \"a\")") if mode == "a" else None
        if context is None:
            return devicecopy.configured(cls._open_locked(path, mode, break_lock, queue_depth, storage_options,
                                                          durable, None), async_device_copy)
        context = distributed.for_store(context, path)
        joined = lambda meta: distributed.with_sharding(context, meta.get("columns") is not None)  # noqa: E731
        opened = context.run_on_zero(lambda: cls._open_locked(path, mode, break_lock, queue_depth, storage_options,
                                                               durable, joined), op="open",
                                      undo=lambda store: store._close_local())
        store, error = opened, None  # rank 0 has healed what a kill left before the others open
        if opened is None:
            try:
                group, meta = open_root(path, mode, storage_options)
                store = cls(path, group, meta, mode, None, storage_options, queue_depth, durable, joined(meta))
            except BaseException as exc:  # noqa: BLE001 -- every rank raises it below
                error = exc
        return _joined(context, store, error, path, "open")

    @classmethod
    def _open_locked(cls, path: str, mode: str, break_lock: bool, queue_depth: int, storage_options: dict | None,
                     durable: bool, context: "Callable[[dict], distributed.RankContext] | None"
                     ) -> "TrajectoryStore":
        group, meta = open_root(path, mode, storage_options)
        lock = (WriterLock(path, LOCK_NAME, break_lock=break_lock, storage_options=storage_options,
                           purpose=cls.LOCK_PURPOSE).acquire() if mode == "a" else None)
        try:
            if lock is not None:  # re-read under the lock: the previous writer may have committed since
                group, meta = open_root(path, mode, storage_options)
            return cls(path, group, meta, mode, lock, storage_options, queue_depth, durable,
                       context(meta) if context is not None else None)
        except BaseException:
            if lock is not None:  # a store that fails to open (damage) must not stay locked by this process
                lock.release()
            raise

    def __enter__(self) -> "TrajectoryStore":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and self._ctx is not None:
            self._close_local()  # leaving on an error: the other ranks may never reach a collective close
        elif exc[0] is not None:  # the error in flight stays the one raised (a writer error raised already
            self._close_local(repeat_failure=False)  # is not replaced by its "failed earlier" reminder)
        else:
            self.close()

    def __repr__(self) -> str:
        return f"TrajectoryStore({self.path!r}, mode={self.mode!r}, snapshots={len(self)}, n={self.n_params})"

    # -- reading ------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._meta["committed"])

    @property
    def n_params(self) -> int:
        """Length of the parameter vector (what ``read()`` returns)."""
        return self.layout.n

    @property
    def n_columns(self) -> int:
        """Columns of the stored rows: ``n_params``, or more for a store recorded sharded (its rows hold the
        parameters rank-major, with padding: see :attr:`columns`). Readers (``reader()``, ``to_dask()``)
        and extraction work on these columns; ``read()`` and ``state_dict()`` give the parameter order."""
        return self.columns.n_columns

    @property
    def metadata(self) -> dict:
        return dict(self._meta.get("metadata", {}))

    @property
    def attrs(self) -> dict:
        """A copy of the store's ``trajstore`` attributes (format, layout, codec, committed, ...)."""
        return dict(self._meta)

    @property
    def run_id(self) -> str:
        """An id of the run this store records, new with every create (overwrite included)."""
        return str(self._meta.get("run_id") or self._meta.get("created"))

    @property
    def group(self) -> zarr.Group:
        """The root zarr group (for derived data such as ``gram/`` and ``subspaces/``)."""
        return self._group

    @property
    def steps(self) -> np.ndarray:
        """Training step of each committed snapshot, (t,) int64."""
        return self._row_values(STEP)

    @property
    def epochs(self) -> np.ndarray:
        """Epoch of each committed snapshot (-1 where none was given), (t,) int64."""
        return self._row_values(EPOCH)

    @property
    def wall_times(self) -> np.ndarray:
        return self._row_values(WALL_TIME)

    def metric_names(self) -> list[str]:
        """Names of the recorded metrics; a damaged metric array is a typed error naming it."""
        folder = self._local_root / METRICS if self._local_root is not None else None
        if folder is None:
            try:
                return sorted(self._group[METRICS].array_keys())
            except (KeyError, ValueError, TypeError) as exc:
                raise self._damaged(METRICS, exc) from None
        names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        for name in names:
            self.array(f"{METRICS}/{name}")  # every listed metric must open
        return names

    def array(self, name: str) -> zarr.Array:
        """Array ``name`` of the store; damaged or missing metadata is a typed error naming it."""
        try:
            arr = self._group[name]
        except (KeyError, ValueError, TypeError, ArithmeticError) as exc:  # JSONDecodeError is a ValueError
            raise self._damaged(name, exc) from None
        if not isinstance(arr, zarr.Array):
            raise self._damaged(name, TypeError("a group where an array belongs"))
        return arr

    def _damaged(self, name: str, exc: BaseException) -> CorruptSnapshotError:
        return CorruptSnapshotError(
            f"the array '{name}' of store {self.path} is damaged or missing ({type(exc).__name__}: {exc}); "
            f"run `trajstore verify {self.path}`, then `trajstore repair {self.path}` or restore it from a copy")

    def metrics(self, name: str) -> np.ndarray:
        """Values of metric ``name`` per committed snapshot, NaN where a snapshot had none."""
        key = name if name in self.metric_names() else metric_key(name)
        if key not in self.metric_names():
            raise KeyError(f"no metric {name!r}; recorded metrics: {self.metric_names()}")
        return self._row_values(f"{METRICS}/{key}")

    def refresh(self) -> "TrajectoryStore":
        """Re-read the committed count and array shapes (a reader following a live writer)."""
        if self.mode == "r":
            self._group, self._meta = open_root(self.path, "r", self.storage_options)
        return self

    @contextmanager
    def derived(self, break_lock: bool = False) -> Iterator[zarr.Group]:
        """Exclusive write access to derived data (``gram/``, ``subspaces/``) as a writable root group.

        Guarded by its own lock, so extraction can run while a training process appends.
        """
        lock = WriterLock(self.path, DERIVED_LOCK_NAME, break_lock=break_lock,
                          storage_options=self.storage_options).acquire()
        try:
            yield zarr.open_group(zarr_store(self.path, False, self.storage_options), mode="r+")
        finally:
            lock.release()

    def reader(self) -> RowReader:
        """A picklable decoding view (t, n_columns) of the committed snapshots, in stored column order
        (the parameter order, except for a store recorded sharded: see :attr:`columns`)."""
        token = f"{len(self)}-{len(self._meta.get('truncations', []))}-{self._meta.get('created')}"
        return RowReader(self.path, len(self), self.n_columns, self.values, self._meta["codec"],
                         self.storage_options, token, strict=bool(self._meta.get("all_chunks_written")))

    # -- internals ----------------------------------------------------------------------
    def _check_readable(self) -> None:
        if self._closed:
            raise InvalidArgumentError(f"store {self.path} is closed")

    def _check_writable(self) -> None:
        self._check_readable()
        if self.mode != "a":
            raise InvalidArgumentError(f"store {self.path} is open read-only; open it with mode='a' to append")

    def _check_index(self, i: int) -> int:
        t = len(self)
        j = i + t if i < 0 else i
        if not 0 <= j < t:
            raise SnapshotIndexError(f"snapshot {i} out of range: the store holds {t} committed snapshots")
        return j

    def _row_values(self, name: str) -> np.ndarray:
        """Committed rows of a per-snapshot array; damage is a typed error, never wrong values.

        zarr decodes whatever its zarr.json describes, so the metadata are checked against the
        layout trajstore writes first (a flipped endian or v2 chunk keys would read silently wrong)."""
        t = len(self)
        arr = self.array(name)
        try:
            problem = row_layout_problem(arr.metadata.to_dict(), ROW_DTYPES.get(name, "float64"),
                                         checksummed=bool(self._meta.get("all_chunks_written")))
        except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as exc:
            problem = f"unreadable fields ({type(exc).__name__}: {exc})"
        if problem is None and arr.shape[0] < t:
            problem = f"{arr.shape[0]} rows, fewer than the {t} committed snapshots"
        if problem:
            raise CorruptMetadataError(
                f"the metadata of '{name}' ({self.path}/{name}/zarr.json) describe {problem}, not what trajstore "
                f"wrote: the file is damaged and its values would read wrong; run `trajstore verify {self.path}`, "
                "then restore it from a copy or `trajstore repair` it")
        try:
            values = arr[:t]
            if self.mode == "r":  # a writer may have truncated and rewritten rows since this reader opened
                check_unchanged(self.path, self.storage_options, len(self._meta.get("truncations", [])),
                                self._meta.get("created"))
            backfilling = BACKFILL in arr.attrs and t <= int(arr.attrs[BACKFILL])  # all NaN so far, by design
        except (ValueError, RuntimeError, OSError, KeyError, TypeError, ArithmeticError) as exc:
            raise CorruptSnapshotError(
                f"the per-snapshot array '{name}' of store {self.path} is damaged ({exc}); run "
                f"`trajstore verify {self.path}` and `trajstore repair {self.path}`") from None
        if self._meta.get("all_chunks_written") and not backfilling:
            rows = int(arr.chunks[0])
            present = self._chunk_files(name)
            for c in range(-(-t // rows)):
                if str(c) not in present:
                    raise CorruptSnapshotError(
                        f"the chunk file {name}/c/{c} of store {self.path} is missing (snapshots "
                        f"{c * rows}..{min(t, (c + 1) * rows) - 1}); run `trajstore verify {self.path}`")
        return values

    def _chunk_files(self, name: str) -> set[str]:
        """Names of the chunk files of the (t,) array ``name`` (one listing; remote stores too)."""
        if self._local_root is not None:
            folder = self._local_root / name / "c"
            return {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.path, **{"use_listings_cache": False, **(self.storage_options or {})})
        try:
            return {key.rstrip("/").rsplit("/", 1)[-1] for key in fs.ls(f"{root.rstrip('/')}/{name}/c", detail=False)}
        except FileNotFoundError:
            return set()


def _joined(context: "distributed.RankContext", store: "TrajectoryStore | None", error: BaseException | None,
            path: str, op: str, release: Callable[[], object] | None = None) -> "TrajectoryStore":
    """Collective end of a create/open: ``store`` on every rank, or every rank raises the first rank's error, or
    a typed error when the ranks opened different stores at ``path`` (not one filesystem shared by the job).
    On an error this rank's store is closed (or ``release`` frees what it held) without collectives."""
    try:
        seen = context.exchange(error, (store.run_id, store._meta.get("created")) if store is not None else None,
                                op=op)
        if any(found != seen[0] for found in seen):
            runs = ", ".join(f"rank {rank}: run {found[0]}" for rank, found in enumerate(seen))
            raise InvalidArgumentError(f"the ranks of the job see different stores at {path} ({runs}): every rank "
                                       "must reach one store, on a filesystem (or object store) they share")
    except BaseException:
        if store is not None:
            store._close_local()
        elif release is not None:
            release()
        raise
    return store
