"""TrajectoryStore: append parameter snapshots to a chunked, compressed zarr v3 group.

Commit protocol (design.md): every row of snapshot t is written first, then
``committed = t + 1`` is written to the group attributes (one small JSON, replaced
atomically). Readers see rows ``[0, committed)`` only; a writer reopening a store whose
arrays run ahead of ``committed`` overwrites from ``committed``.
"""
from __future__ import annotations

import atexit
import math
import operator
import os
import re
import sys
import threading
import time
import uuid
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

import numpy as np
import zarr

from . import __version__
from . import distributed
from ._lazy import is_module, is_tensor, torch as _torch
from .codecs import CodecPreset, get_preset
from .columns import ColumnMap
from .durability import commit_files, fsync_paths, row_files
from .errors import (CorruptMetadataError, CorruptSnapshotError, InvalidArgumentError, LayoutMismatchError,
                     NonFiniteError, NotAStoreError, SnapshotIndexError, StoreExistsError, TrajstoreError)
from .format import (ATTR, BUFFERS, DEFAULT_CHUNK, DEFAULT_SHARD, DERIVED_LOCK_NAME, EPOCH, FORMAT_VERSION,
                     LOCK_NAME, METRICS, NONFINITE, PARAMS, REFERENCE, ROW_ARRAYS, ROW_DTYPES, ROW_CHUNK, STEP, WALL_TIME,
                     clear_except_lock, create_rows, local_dir, normalize, open_root, zarr_store)
from .layout import ParamLayout, strip_prefixes
from .lock import WriterLock
from .fastread import open_fast, row_layout_problem
from .reader import RowReader, check_unchanged
from .writer import BackgroundWriter, Job

if TYPE_CHECKING:
    import torch

_OPEN_WRITERS: "weakref.WeakSet[TrajectoryStore]" = weakref.WeakSet()


def _close_at_exit() -> None:
    """Commit what ``append()`` acknowledged when a script ends (normally or by an uncaught
    exception) without ``close()``: the writer thread is a daemon and would die with the interpreter."""
    for store in list(_OPEN_WRITERS):
        try:
            store._close_local()  # no collectives at exit: the other ranks may be gone
        except Exception as exc:  # noqa: BLE001 -- report, keep closing the others
            sys.stderr.write(f"trajstore: closing {store.path} at exit failed: {exc}\n")


# Run before the interpreter shuts down thread pools (which zarr's I/O needs): the hook that
# concurrent.futures itself uses. Plain atexit runs too late for that; it stays as the fallback.
getattr(threading, "_register_atexit", atexit.register)(_close_at_exit)


_ROW_FILL = {STEP: -1, EPOCH: -1, WALL_TIME: float("nan"), NONFINITE: False}


class TrajectoryStore:
    """A trajectory of parameter snapshots on disk. Create with :meth:`create`, open with :meth:`open`."""

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
        self.dtype = np.dtype(meta["dtype"])
        self.columns = ColumnMap.from_json(self.layout.n, meta.get("columns"))  # where each parameter is stored
        self._writer: BackgroundWriter | None = None
        self._closed = False
        self._ctx = context  # a multi-process recording (distributed.py), else None
        if context is not None and context.sharded and len(self.columns.rank_columns) != context.world:
            raise InvalidArgumentError(
                f"{path} was recorded sharded over {len(self.columns.rank_columns)} ranks; this job has "
                f"{context.world}: record it with that many ranks, or into a new store")
        self._cols = (distributed.write_range(self.columns, context.rank) if context is not None and context.sharded
                      else (0, self.n_columns))  # the columns this process writes
        if mode == "a":
            self._prev: np.ndarray | None = None  # decoded last row, our columns (xor transform)
            self._reference: np.ndarray | None = None  # decoded row 0, our columns (delta transform)
            if context is None or context.rank == 0:  # the rank that commits heals what a kill left
                self._check_row_arrays()
                self._ensure_capacity(len(self))  # heal arrays left at different sizes by a kill mid-resize
                for name in self.metric_names():  # a metric created just before a kill: finish its backfill
                    arr = self._group[f"{METRICS}/{name}"]
                    if BACKFILL in arr.attrs:
                        _backfill(arr, int(arr.attrs[BACKFILL]))
            self._load_encoder_state()
            if context is None or context.is_writer:
                width = self._cols[1] - self._cols[0]
                self._writer = BackgroundWriter(width, self.dtype, self._write_row, depth=queue_depth)
            _OPEN_WRITERS.add(self)  # flushed at interpreter exit if the script never closes it

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, path: "str | os.PathLike", source: object, *, codec: "str | CodecPreset" = "lossless",
               metadata: dict | None = None, overwrite: bool = False, buffers: bool = False,
               chunk_size: int = DEFAULT_CHUNK, shard_size: int = DEFAULT_SHARD, queue_depth: int = 2,
               storage_options: dict | None = None, durable: bool = False,
               break_lock: bool = False, process_group: object = "auto") -> "TrajectoryStore":
        """Create a store for the parameters of ``source`` (nn.Module, state_dict or ParamLayout).

        ``buffers=True`` also records the module's buffers (BN running statistics) in a separate
        array. ``durable=True`` fsyncs each snapshot before its commit and the commit after, so
        committed snapshots survive a power loss, not only a killed process (see durability.py).
        Returns the store open for appending (mode ``"a"``).

        In a torch.distributed job (``process_group="auto"``: the default group, when initialised
        with more than one rank) this is collective: every rank calls it, and later ``append``,
        ``flush``, ``truncate`` and ``close``. Replicated (DDP) parameters are written by rank 0;
        FSDP2 shards by every rank, into columns of its own (see trajstore/distributed.py).
        ``process_group=None`` records from this process alone.
        """
        kwargs = dict(codec=codec, metadata=metadata, overwrite=overwrite, buffers=buffers, chunk_size=chunk_size,
                      shard_size=shard_size, storage_options=storage_options, durable=durable, break_lock=break_lock)
        context = distributed.resolve(process_group, source)
        if context is not None:
            return cls._create_collective(context, normalize(path), source, queue_depth, kwargs)
        group, meta, lock = cls._create_files(normalize(path), source, **kwargs)
        try:
            return cls(normalize(path), group, meta, "a", lock, storage_options, queue_depth, durable)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _create_collective(cls, context: "distributed.RankContext", path: str, source: object, queue_depth: int,
                           kwargs: dict) -> "TrajectoryStore":
        """Every rank: rank 0 creates the files, the others open them; any rank's error is every rank's."""
        columns, error = None, None
        try:
            layout = ParamLayout.of(source)
            if context.sharded:
                distributed.check_shards(layout, source, context.rank, context.world)
                chunk, shard = _chunking(layout.n, kwargs["chunk_size"], kwargs["shard_size"])
                columns = ColumnMap.rank_major(layout.n, distributed.rank_pieces(layout, context.world), shard)
        except BaseException as exc:  # noqa: BLE001 -- every rank raises it below
            error = exc
        context.exchange(error)
        created = context.run_on_zero(lambda: cls._create_files(path, source, columns=columns, **kwargs))
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
        try:
            context.exchange(error)
        except BaseException:
            if store is not None:
                store._close_local()
            elif created is not None:
                created[2].release()
            raise
        return store

    @classmethod
    def _create_files(cls, path: str, source: object, *, codec: "str | CodecPreset", metadata: dict | None,
                      overwrite: bool, buffers: bool, chunk_size: int, shard_size: int, storage_options: dict | None,
                      durable: bool, break_lock: bool, columns: ColumnMap | None = None
                      ) -> tuple[zarr.Group, dict, WriterLock]:
        """Write an empty store at ``path``; returns its root group, attributes and the writer lock held."""
        preset = get_preset(codec)
        layout = ParamLayout.of(source)
        if layout.n == 0:
            raise LayoutMismatchError("the source has no parameters to record")
        columns = columns if columns is not None and not columns.is_identity else None
        buffer_layout = None
        if buffers:
            if is_module(source):
                buffer_layout = ParamLayout.buffers_of(source)
            elif isinstance(source, Mapping):
                buffer_layout = ParamLayout.from_state_dict(source)[1]
            else:
                raise InvalidArgumentError("buffers=True needs an nn.Module or a state_dict as source")
        local = local_dir(path)
        if local is not None:
            local.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(path, LOCK_NAME, break_lock=break_lock, storage_options=storage_options).acquire()
        try:  # the existence check runs under the lock: two creators never clear each other's store
            holds_data = _holds_data(path, storage_options)
            if holds_data and not overwrite and _interrupted_create(path):
                holds_data = False  # a create killed before its attributes were written: nothing committed
                with WriterLock(path, DERIVED_LOCK_NAME, storage_options=storage_options).acquire().held():
                    clear_except_lock(path, storage_options)
            if not overwrite and holds_data:
                raise StoreExistsError(
                    f"{path} already exists; pass overwrite=True to replace it, open it with mode='a' to "
                    "append, or choose a new path")
            if holds_data:
                try:
                    open_root(path, "r", storage_options)
                except NotAStoreError:  # overwrite replaces a store, never a folder of other files
                    raise StoreExistsError(
                        f"{path} holds files but no trajstore store: overwrite=True replaces a store and never "
                        "deletes anything else. Choose a new path (or delete that folder yourself)") from None
                except CorruptMetadataError:
                    pass  # a damaged store: replacing it is what overwrite is for
            with WriterLock(path, DERIVED_LOCK_NAME, storage_options=storage_options).acquire().held():
                clear_except_lock(path, storage_options)  # never under a running extraction
            group = zarr.open_group(zarr_store(path, False, storage_options), mode="a")
            dtype = layout.storage_dtype()
            chunk, shard = _chunking(layout.n, chunk_size, shard_size)
            n = columns.n_columns if columns is not None else layout.n  # the params array's width
            create_rows(group, PARAMS, n, preset.stored_dtype(dtype), chunk, shard, preset)
            if preset.transform == "delta":
                create_rows(group, REFERENCE, n, dtype, chunk, shard, get_preset("lossless"), rows=1)
            if buffer_layout is not None and buffer_layout.n:
                m = buffer_layout.n
                create_rows(group, BUFFERS, m, np.dtype("float64"), min(chunk, m), min(chunk, m), get_preset("lossless"))
            for name in ROW_ARRAYS:
                _create_row_array(group, name, 0, ROW_DTYPES[name], _ROW_FILL[name])
            group.create_group(METRICS)
            meta = {
                "format_version": FORMAT_VERSION if columns is not None else 1,  # unsharded: readable by format-1 readers
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "run_id": uuid.uuid4().hex,  # tells this run from another later recorded at the same path
                "versions": {"trajstore": __version__, "zarr": zarr.__version__, "torch": _torch_version()},
                "layout": layout.to_json(),
                "buffer_layout": buffer_layout.to_json() if buffer_layout is not None and buffer_layout.n else None,
                "dtype": dtype.name,
                "codec": preset.to_json(),
                "metadata": dict(metadata or {}),
                "committed": 0,
                "truncations": [],
                "all_chunks_written": True,  # every chunk of a committed row exists; row arrays carry crc32c
            }
            if columns is not None:
                meta["columns"] = columns.to_json()
            group.attrs[ATTR] = meta
        except BaseException:
            lock.release()
            raise
        if durable and local is not None:
            fsync_paths([*sorted(local.rglob("*"), reverse=True), local, local.parent])  # the new tree
        return group, meta, lock

    @classmethod
    def open(cls, path: "str | os.PathLike", mode: str = "r", *, break_lock: bool = False,
             queue_depth: int = 2, storage_options: dict | None = None, durable: bool = False,
             process_group: object = "auto") -> "TrajectoryStore":
        """Open an existing store: ``mode="r"`` to read, ``"a"`` to append (takes the writer lock).

        ``durable=True`` (append only) fsyncs every snapshot before its commit, as in :meth:`create`.
        In a torch.distributed job, opening to append is collective (see :meth:`create`): rank 0
        takes the lock, and a store recorded sharded is written by every rank again.
        """
        if mode not in ("r", "a"):
            raise InvalidArgumentError(f"mode must be 'r' or 'a', got {mode!r}")
        path = normalize(path)
        context = distributed.resolve(process_group) if mode == "a" else None
        if context is None:
            return cls._open_locked(path, mode, break_lock, queue_depth, storage_options, durable, None)
        joined = lambda meta: distributed.with_sharding(context, meta.get("columns") is not None)  # noqa: E731
        opened = context.run_on_zero(lambda: cls._open_locked(path, mode, break_lock, queue_depth, storage_options,
                                                               durable, joined))
        store, error = opened, None  # rank 0 has healed what a kill left before the others open
        if opened is None:
            try:
                group, meta = open_root(path, mode, storage_options)
                store = cls(path, group, meta, mode, None, storage_options, queue_depth, durable, joined(meta))
            except BaseException as exc:  # noqa: BLE001 -- every rank raises it below
                error = exc
        try:
            context.exchange(error)
        except BaseException:
            if store is not None:
                store._close_local()
            raise
        return store

    @classmethod
    def _open_locked(cls, path: str, mode: str, break_lock: bool, queue_depth: int, storage_options: dict | None,
                     durable: bool, context: "Callable[[dict], distributed.RankContext] | None"
                     ) -> "TrajectoryStore":
        group, meta = open_root(path, mode, storage_options)
        lock = (WriterLock(path, LOCK_NAME, break_lock=break_lock, storage_options=storage_options).acquire()
                if mode == "a" else None)
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
        return RowReader(self.path, len(self), self.n_columns, self.dtype.name, self._meta["codec"],
                         self.storage_options, token, strict=bool(self._meta.get("all_chunks_written")))

    def read(self, index: "int | slice | Sequence[int]") -> np.ndarray:
        """Snapshot ``index`` as (n,), or several as (k, n), decoded to the store's float dtype."""
        self._check_readable()
        t = len(self)
        if isinstance(index, slice):
            r0, r1, step = index.indices(t)
            if r1 <= r0:
                return np.empty((0, self.n_params), self.dtype)
            if step < 0:
                return self.read(list(range(r0, r1, step)))
            return self.columns.to_global(self.reader().read_block(r0, r1)[::step])
        if isinstance(index, (int, np.integer)):
            i = self._check_index(int(index))
            return self.columns.to_global(self.reader().read_block(i, i + 1)[0])
        rows = [self._check_index(int(i)) for i in index]
        reader = self.reader()
        if not rows:
            return np.empty((0, self.n_params), self.dtype)
        return self.columns.to_global(np.stack([reader.read_block(i, i + 1)[0] for i in rows]))

    def to_dask(self, row_block: int | None = None, col_block: int | None = None):
        """The committed snapshots as a dask array (t, n_columns), decoded lazily block by block, in
        stored column order (the parameter order unless the store was recorded sharded: :attr:`columns`)."""
        import dask.array as da

        t = len(self)
        params = self._group[PARAMS]
        col_block = col_block or int(params.shards[1] if params.shards else params.chunks[1])
        if row_block is None:
            row_block = max(1, min(t, (128 << 20) // (col_block * self.dtype.itemsize)))
        k = self.codec.keyframe_interval
        row_block = max(k, row_block - row_block % k)  # xor groups never straddle blocks
        return da.from_array(self.reader(), chunks=(row_block, col_block), asarray=False, lock=False,
                             fancy=False, meta=np.empty((0, 0), self.dtype), name=False)

    def read_buffers(self, index: int) -> dict[str, torch.Tensor]:
        """The buffers (BN running statistics) recorded with snapshot ``index``."""
        if self.buffer_layout is None:
            raise InvalidArgumentError(f"store {self.path} records no buffers (create it with buffers=True)")
        i = self._check_index(index)
        # zarr trusts the array's zarr.json: check it describes the layout trajstore writes first
        open_fast(f"{self.path.rstrip('/')}/{BUFFERS}", self.storage_options, layout_required=True)
        try:
            row = self.array(BUFFERS)[i, :]
        except (ValueError, RuntimeError, OSError, IndexError, ArithmeticError) as exc:  # checksum, decode
            raise CorruptSnapshotError(f"the buffers of snapshot {i} in store {self.path} are damaged "
                                       f"({type(exc).__name__}: {exc}); run `trajstore verify {self.path}`") from None
        return self.buffer_layout.unflatten(row)

    def state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """Snapshot ``index`` as a state_dict of tensors in their original shapes and dtypes.

        A tied tensor appears under each of its names (``wte.weight`` and ``lm_head.weight``), as
        one shared tensor, so a strict ``model.load_state_dict`` takes it.
        """
        sd = self.layout.with_aliases(self.layout.unflatten(self.read(index)))
        if self.buffer_layout is not None:
            sd.update(self.buffer_layout.with_aliases(self.read_buffers(index)))
        return sd

    def load_into(self, model: torch.nn.Module, index: int) -> torch.nn.Module:
        """Copy snapshot ``index`` (and its buffers, if recorded) into ``model`` in place."""
        self.layout.check_same(ParamLayout.from_module(model), "model")
        sd = self.state_dict(index)
        with _torch().no_grad():
            named = dict(model.named_parameters())
            named.update(dict(model.named_buffers()))
            for key, tensor in named.items():
                value = sd.get(strip_prefixes(key))
                if value is not None:
                    tensor.copy_(value.to(tensor.dtype))
        return model

    def holds(self, source: object, index: int) -> bool:
        """Whether snapshot ``index`` equals ``source``'s parameters bit for bit (NaN equal to NaN).

        Collective in a multi-process recording: every rank compares the columns it writes (rank 0
        all of them when parameters are replicated) and every rank gets the same answer."""
        if self._ctx is None:
            want = self.layout.flatten_into(source, np.empty(self.n_params, self.dtype))
            return bool(np.array_equal(self.read(index), want, equal_nan=True))
        same, error = True, None
        try:
            if self._ctx.sharded:
                i, (lo, hi) = self._check_index(index), self._cols
                want = np.empty(hi - lo, self.dtype)
                distributed.flatten_local(self.layout, source, want)
                same = bool(np.array_equal(self.reader().read_block(i, i + 1, lo, hi)[0], want, equal_nan=True))
            elif self._ctx.rank == 0:
                want = self.layout.flatten_into(source, np.empty(self.n_params, self.dtype))
                same = bool(np.array_equal(self.read(index), want, equal_nan=True))
        except BaseException as exc:  # noqa: BLE001 -- raised on every rank by exchange
            error = exc
        return all(self._ctx.exchange(error, same))

    # -- writing ------------------------------------------------------------------------
    def append(self, source: object, *, step: int, epoch: int | None = None,
               metrics: Mapping[str, float] | None = None, allow_nonfinite: bool = False) -> int:
        """Queue one snapshot; returns its index. The copy is taken now, writing happens in the background.

        ``source``: nn.Module, state_dict, or a flat tensor/array (n,). Raises LayoutMismatchError
        on a wrong length or layout, NonFiniteError on NaN/Inf (unless ``allow_nonfinite``), and
        any error of an earlier background write.
        """
        self._check_writable()
        # everything is validated before a row index or a staging buffer is taken: a refused
        # append leaves the store exactly as it was
        if self._ctx is None:
            buf, nonfinite, buffers, step, epoch, metrics = self._prepare(source, step, epoch, metrics, allow_nonfinite)
        else:  # collective: every rank stops with the first error any rank had, or none does
            prepared, error = None, None
            try:
                prepared = self._prepare(source, step, epoch, metrics, allow_nonfinite)
            except BaseException as exc:  # noqa: BLE001 -- raised on every rank by exchange
                error = exc
            try:
                flags = self._ctx.exchange(error, prepared[1] if prepared else False)
            except BaseException:
                if prepared is not None and prepared[0] is not None:
                    self._writer.release(prepared[0])
                raise
            buf, _, buffers, step, epoch, metrics = prepared
            nonfinite = any(flags)  # the row is non-finite when any rank's part is
        index = self._next_index
        self._next_index += 1
        self._last_step = step
        if self._writer is not None:
            self._writer.submit(Job(index, buf, step, epoch, time.time(), metrics, buffers, nonfinite))
        return index

    def _prepare(self, source: object, step: object, epoch: object, metrics: Mapping | None,
                 allow_nonfinite: bool) -> tuple:
        """Check one snapshot and copy this process's columns of it into a staging buffer.

        Returns (buffer or None, non-finite, buffers row, step, epoch, metrics); raises, with the
        buffer given back, when the snapshot cannot be recorded."""
        step, epoch, metrics = _check_step(step, "step"), _check_epoch(epoch), _check_metrics(metrics)
        if self._last_step is not None and step <= self._last_step:
            raise InvalidArgumentError(
                f"step {step} does not follow step {self._last_step}, the store's last snapshot: steps must "
                "strictly increase. A resumed run drops the later snapshots first (truncate_after_step, or "
                "Recorder.start(step)); a new run records to a new path")
        _check_source(source)
        if is_module(source):
            self.layout.check_same(ParamLayout.from_module(source), "model")
        sharded = self._ctx is not None and self._ctx.sharded
        if sharded:
            distributed.check_shards(self.layout, source, self._ctx.rank, self._ctx.world)
        if self._writer is None:
            return None, False, None, step, epoch, metrics  # a rank that writes nothing (DDP, rank > 0)
        buf = self._writer.acquire()
        try:
            try:
                if sharded:
                    distributed.flatten_local(self.layout, source, buf)
                elif self.columns.is_identity:
                    self.layout.flatten_into(source, buf)
                else:  # a replicated model appending to a store recorded sharded
                    buf[:] = self.columns.to_stored(self.layout.flatten_into(source, np.empty(self.n_params, self.dtype)))
            except (TypeError, RuntimeError, ValueError, KeyError, AttributeError) as exc:
                if isinstance(exc, TrajstoreError):
                    raise
                raise LayoutMismatchError(f"snapshot at step {step} does not fit the store's layout "
                                          f"({type(exc).__name__}: {exc}); nothing was recorded") from None
            nonfinite = not np.isfinite(buf).all()
            if nonfinite and not allow_nonfinite:
                where = "this rank's shards" if sharded else self._first_nonfinite(buf)
                raise NonFiniteError(
                    f"snapshot at step {step} holds NaN or Inf in {where}; it was not recorded (training has "
                    "diverged?). Pass allow_nonfinite=True to record it anyway")
            buffers = self._flatten_buffers(source) if self._ctx is None or self._ctx.rank == 0 else None
        except BaseException:
            self._writer.release(buf)
            raise
        return buf, nonfinite, buffers, step, epoch, metrics

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
        self._ctx.exchange(error)
        if self._ctx.rank:  # rank 0 commits: take the count (and truncations) it wrote
            self._meta = open_root(self.path, "r", self.storage_options)[1]

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

    def _close_local(self) -> None:
        """Stop this process's writer (after it wrote what was queued) and release the lock it holds."""
        if self._closed:
            return
        self._closed = True
        _OPEN_WRITERS.discard(self)
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            if self._lock is not None:
                self._lock.release()

    def truncate(self, length: int) -> None:
        """Drop every snapshot from index ``length`` on (a resumed run replaces what came after its checkpoint)."""
        self._check_writable()
        self.flush()
        error = None
        try:
            length = _check_step(length, "length")
            if not 0 <= length <= len(self):
                raise InvalidArgumentError(f"cannot truncate to {length}: the store holds {len(self)} snapshots")
        except BaseException as exc:  # noqa: BLE001 -- every rank raises it (or this one alone)
            error = exc
        if self._ctx is not None:
            self._ctx.exchange(error)
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
        self._ctx.run_on_zero(lambda: self._commit_meta(meta))
        self._meta = meta
        error = None
        try:
            self._load_encoder_state()
        except BaseException as exc:  # noqa: BLE001 -- raised on every rank by exchange
            error = exc
        self._ctx.exchange(error)

    def truncate_after_step(self, step: int) -> int:
        """Drop every snapshot with a step greater than ``step``; returns the new length."""
        self._check_writable()
        step = _check_step(step, "step")
        self.flush()  # the snapshots still queued count: without this they were committed, then cut
        later = self.steps > step  # (t,)
        keep = int(np.argmax(later)) if later.any() else len(later)
        self.truncate(keep)
        return keep

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

    def _first_nonfinite(self, buf: np.ndarray) -> str:
        for spec, lo, hi in zip(self.layout.specs, self.layout.offsets, self.layout.offsets[1:]):
            if not np.isfinite(buf[lo:hi]).all():
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
            self._prev = self.reader().read_block(t - 1, t, lo, hi)[0].copy()
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

    def _ensure_capacity(self, rows: int) -> None:
        """Grow every per-snapshot array to hold ``rows`` rows. Each array is checked on its own: a
        writer killed between two resizes leaves them at different sizes, and that must heal."""
        arrays = [self.array(name) for name in self._row_array_names()]
        largest = max(arr.shape[0] for arr in arrays)
        capacity = largest if largest >= rows else max(rows, 2 * largest, 16)
        for arr in arrays:
            if arr.shape[0] < capacity:
                arr.resize((capacity, *arr.shape[1:]))

    def _write_row(self, job: Job) -> None:
        """Runs on the writer thread: data rows first, the commit last."""
        if self._ctx is not None and self._ctx.sharded:
            return self._write_row_sharded(job)
        self._ensure_capacity(job.index + 1)
        self._write_params(job)
        self._write_row_arrays(job)
        if self.durable and self._local_root is not None:
            fsync_paths(row_files(self._local_root, job.index, self.metric_names()))  # data on disk before the commit
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
            ctx.exchange(error, group=ctx.writer_group)

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
        self._writable(STEP)[i] = job.step
        self._writable(EPOCH)[i] = job.epoch
        self._writable(WALL_TIME)[i] = job.wall_time
        self._writable(NONFINITE)[i] = job.nonfinite
        capacity = self._group[PARAMS].shape[0]
        metrics_group = self._group[METRICS]
        for name in set(job.metrics) | set(metrics_group.array_keys()):
            if name not in metrics_group:
                arr = _create_row_array(metrics_group, name, capacity, "float64", float("nan"),
                                        {BACKFILL: i} if i else None)
                if i:
                    _backfill(arr, i)
            self._writable(f"{METRICS}/{name}")[i] = job.metrics.get(name, float("nan"))

    def _writable(self, name: str) -> zarr.Array:
        """Array ``name`` writing every chunk, even one equal to the fill value (a frozen layer's
        xor chunk is all zero bits): on read, a missing chunk of a committed row is damage."""
        return self._group[name].with_config({"write_empty_chunks": True})

    def _commit_meta(self, meta: dict) -> None:
        self._group.attrs[ATTR] = meta  # one JSON document, replaced atomically
        self._meta = meta
        if self.durable and self._local_root is not None:
            fsync_paths(commit_files(self._local_root))


def _chunking(n: int, chunk_size: int, shard_size: int) -> tuple[int, int]:
    """Elements per inner chunk and per shard file of the params array, for ``n`` parameters."""
    chunk = min(chunk_size, n)
    return chunk, chunk * math.ceil(min(shard_size, n) / chunk)


def _holds_data(path: str, storage_options: dict | None) -> bool:
    """Whether ``path`` holds anything besides our lock file (a store, or files of some other kind)."""
    local = local_dir(path)
    if local is not None:
        return local.exists() and any(entry.name != LOCK_NAME for entry in local.iterdir())
    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    try:
        entries = fs.ls(root, detail=False, refresh=True)
    except FileNotFoundError:
        return False
    return any(not str(entry).rstrip("/").endswith(LOCK_NAME) for entry in entries)


def _interrupted_create(path: str) -> bool:
    """Whether the local folder ``path`` holds only what :meth:`TrajectoryStore.create` writes, without
    the trajstore attributes it writes last: a create that was killed, holding no snapshot."""
    local = local_dir(path)
    ours = {"zarr.json", PARAMS, REFERENCE, BUFFERS, *ROW_ARRAYS, METRICS, LOCK_NAME, DERIVED_LOCK_NAME}
    if local is None or not all(entry.name in ours for entry in local.iterdir()):
        return False
    try:
        open_root(path, "r")
    except NotAStoreError as exc:
        return "no 'trajstore' attributes" in str(exc) or "no zarr group" in str(exc)
    except CorruptMetadataError:
        return False
    return False


def _torch_version() -> str:
    """torch's version, without importing torch (2 s) where the caller never did."""
    if "torch" in sys.modules:
        return sys.modules["torch"].__version__
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "none"


def _check_source(source: object) -> None:
    """``append`` takes a module, a state_dict, or a flat real-valued (n,) tensor/array."""
    if is_module(source) or isinstance(source, Mapping):
        return  # checked tensor by tensor against the layout
    if isinstance(source, np.ndarray):
        kind = source.dtype.kind
    elif is_tensor(source):
        kind = "c" if source.is_complex() else "b" if source.dtype == _torch().bool else "f"
    else:
        raise InvalidArgumentError(f"append takes an nn.Module, a state_dict or a flat (n,) tensor/array, "
                                   f"not {type(source).__name__}; nothing was recorded")
    if kind not in "fiu":
        raise InvalidArgumentError(f"a snapshot of dtype {source.dtype} holds no real-valued weights; append "
                                   "the model's float parameters (nothing was recorded)")


def metric_key(name: object) -> str:
    """The array name a metric is stored under: every character but letters, digits, ``_``, ``-``
    and ``.`` becomes ``_`` (``train/loss`` -> ``train_loss``): a name is one file-system- and
    zarr-safe path component, whatever the trainer logs (``/``, ``\\``, spaces, NUL)."""
    key = _UNSAFE.sub("_", str(name))
    if not key.strip("._") or key.startswith("__") or key in ("c", "zarr.json") or len(key.encode()) > 200:
        raise InvalidArgumentError(f"metric name {name!r} cannot be stored: use 1 to 200 letters, digits, '_', "
                                   "'-', '.' (not 'c' or 'zarr.json')")
    return key


_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def _check_step(value: object, what: str) -> int:
    try:
        if isinstance(value, bool) or value is None:
            raise TypeError
        number = operator.index(value.item() if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 else value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what} must be an integer, got {value!r}") from None
    if not 0 <= number < 1 << 62:
        raise InvalidArgumentError(f"{what} must be a count from 0, got {number}")
    return number


def _check_epoch(value: object) -> int:
    return -1 if value is None or (type(value) is int and value == -1) else _check_step(value, "epoch")  # -1: none


def _check_metrics(metrics: Mapping | None) -> dict[str, float]:
    """Metric values as floats under their stored names; a list, a multi-element tensor or a
    non-number raises InvalidArgumentError naming the metric."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise InvalidArgumentError(f"metrics must be a mapping of names to numbers, got {type(metrics).__name__}")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        key = metric_key(name)
        if key in out:
            raise InvalidArgumentError(f"metric names {sorted(k for k in metrics if metric_key(k) == key)} "
                                       f"would both be stored as {key!r}")
        try:
            if hasattr(value, "numel") and value.numel() != 1 or np.ndim(value) != 0 and np.size(value) != 1:
                raise TypeError
            if isinstance(value, (str, bytes, bool, np.bool_)) or getattr(value, "dtype", np.dtype("f")).kind not in "iuf":
                raise TypeError
            out[key] = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError):
            raise InvalidArgumentError(
                f"metric {name!r} must be one number, got {type(value).__name__} {value!r:.60}") from None
    return out


def _create_row_array(group: zarr.Group, name: str, rows: int, dtype: str, fill: object,
                      attributes: dict | None = None) -> zarr.Array:
    """A (rows,) per-snapshot array: zstd + crc32c, every chunk written (a missing one is damage)."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return group.create_array(name, shape=(rows,), chunks=(ROW_CHUNK,), dtype=dtype, fill_value=fill,
                              compressors=[ZstdCodec(level=1), Crc32cCodec()], attributes=attributes,
                              config={"write_empty_chunks": True})


BACKFILL = "trajstore_backfill_to"  # on a metric array until its rows before the first value are written


def _backfill(arr: zarr.Array, rows: int) -> None:
    """Write NaN into rows [0, rows) of a metric first logged at row ``rows``, then drop the marker."""
    arr.with_config({"write_empty_chunks": True})[:rows] = np.nan
    del arr.attrs[BACKFILL]
