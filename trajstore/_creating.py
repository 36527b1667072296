"""Writing a new, empty store: the arrays, the attributes, under the writer lock."""
from __future__ import annotations

import math
import sys
import time
import uuid
from typing import Mapping

import numpy as np
import zarr

from . import __version__
from .codecs import CodecPreset, get_preset
from .columns import ColumnMap
from .durability import fsync_paths
from .errors import CorruptMetadataError, InvalidArgumentError, LayoutMismatchError, NotAStoreError, StoreExistsError
from .format import (ATTR, BUFFERS, DERIVED_LOCK_NAME, EPOCH, LOCK_NAME, METRICS, NONFINITE, OPTIMIZER, PARAMS,
                     REFERENCE, ROW_ARRAYS, ROW_CHUNK, ROW_DTYPES, STEP, VALUES_ATTR, WALL_TIME, clear_except_lock,
                     create_rows, local_dir, open_root, required_version, zarr_store)
from ._lazy import is_module
from .layout import BF16, HALF_DTYPES, ParamLayout, raw_dtype
from .lock import WriterLock

ROW_FILL = {STEP: -1, EPOCH: -1, WALL_TIME: float("nan"), NONFINITE: False}


def create_files(path: str, source: object, *, codec: "str | CodecPreset", metadata: dict | None,
    overwrite: bool, buffers: bool, chunk_size: int, shard_size: int, storage_options: dict | None,
    durable: bool, break_lock: bool, columns: ColumnMap | None = None, optimizer_state: bool = False,
    values: str | None = None) -> tuple[zarr.Group, dict, WriterLock]:
    """Write an empty store at ``path``; returns its root group, attributes and the writer lock held.

    A model whose tensors all have one half type (float16, bfloat16) is stored in it (format 3); any
    other is widened to float32 (float64 if it has a float64 tensor), which holds its values exactly.
    ``values`` overrides that choice with the widened dtype (repair rebuilding a store written before
    format 3 keeps its storage dtype and format); anything not holding the layout exactly is refused."""
    preset = get_preset(codec)
    layout = ParamLayout.of(source)
    if layout.n == 0:
        raise LayoutMismatchError("the source has no parameters to record")
    chosen = layout.value_dtype()
    if values is not None and values not in (chosen, layout.storage_dtype().name):
        raise InvalidArgumentError(f"cannot store a layout of {sorted(layout.dtype_counts())} in {values}: use "
                                   f"{chosen} or {layout.storage_dtype().name}")
    values = values or chosen
    if values in HALF_DTYPES and not preset.lossless:
        raise InvalidArgumentError(
            f"codec {preset.spec!r} stores float differences from snapshot 0 with a bound stated for float32; "
            f"this model is {values}, stored natively in 2 bytes a value already: use codec 'lossless' or "
            "'xor-delta' (lossless, smaller when snapshots are close)")
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
        if holds_data and _interrupted_create(path):  # with or without overwrite: it holds nothing to keep
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
        dtype = raw_dtype(values)  # bfloat16: its uint16 bits
        chunk, shard = chunking(layout.n, chunk_size, shard_size)
        n = columns.n_columns if columns is not None else layout.n  # the params array's width
        params = create_rows(group, PARAMS, n, preset.stored_dtype(dtype), chunk, shard, preset)
        if values == BF16:  # for readers of the bare zarr array: these uint16 are bfloat16 bits
            params.attrs[VALUES_ATTR] = BF16
        if preset.transform == "delta":
            create_rows(group, REFERENCE, n, dtype, chunk, shard, preset.side_preset(), rows=1)
        if buffer_layout is not None and buffer_layout.n:
            m = buffer_layout.n
            create_rows(group, BUFFERS, m, np.dtype("float64"), min(chunk, m), min(chunk, m), preset.side_preset())
        for name in ROW_ARRAYS:
            create_row_array(group, name, 0, ROW_DTYPES[name], ROW_FILL[name])
        group.create_group(METRICS)
        if optimizer_state:
            group.create_group(OPTIMIZER)
        meta = {  # the lowest version that describes it: older trajstores read what they can read right
            "format_version": required_version(columns is not None, values, optimizer_state),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run_id": uuid.uuid4().hex,  # tells this run from another later recorded at the same path
            "versions": {"trajstore": __version__, "zarr": zarr.__version__, "torch": _torch_version()},
            "layout": layout.to_json(),
            "buffer_layout": buffer_layout.to_json() if buffer_layout is not None and buffer_layout.n else None,
            "dtype": values,
            "codec": preset.to_json(),
            "metadata": dict(metadata or {}),
            "committed": 0,
            "truncations": [],
            "all_chunks_written": True,  # every chunk of a committed row exists; row arrays carry crc32c
        }
        if optimizer_state:
            meta["optimizer_state"] = True
        if columns is not None:
            meta["columns"] = columns.to_json()
        group.attrs[ATTR] = meta
    except BaseException:
        lock.release()
        raise
    if durable and local is not None:
        fsync_paths([*sorted(local.rglob("*"), reverse=True), local, local.parent])  # the new tree
    return group, meta, lock



def chunking(n: int, chunk_size: int, shard_size: int) -> tuple[int, int]:
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


CREATED_NAMES = frozenset({"zarr.json", PARAMS, REFERENCE, BUFFERS, *ROW_ARRAYS, METRICS, OPTIMIZER, LOCK_NAME,
                           DERIVED_LOCK_NAME})  # every top-level entry TrajectoryStore.create writes


def may_be_created(path: str, storage_options: dict | None = None) -> bool:
    """Whether ``path`` (a local folder or an object-store prefix) holds nothing yet, or only entries that
    :meth:`TrajectoryStore.create` writes: where a store that does not open yet may be on its way (a creator
    takes the lock, then writes zarr.json and the arrays, and the trajstore attributes last: locally, such
    entries with nobody holding the lock are a create killed part-way, nothing on its way)."""
    local = local_dir(path)
    if local is not None:
        if not local.exists():
            return True
        if not local.is_dir():
            return False
        names = [entry.name for entry in local.iterdir()]
        if names and _only_created(names):
            from .lock import local_lock_held

            # a creator holds the writer lock until the store opens; a folder of a store's parts that nobody
            # holds is a create killed part-way, or a store whose zarr.json was lost: nothing is coming there
            for _ in range(3):
                if local_lock_held(path) is not False:
                    return True
                time.sleep(0.1)  # (a creator between making the folder and taking the lock)
            return False
    else:
        import fsspec

        fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
        try:
            names = [str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(root, detail=False, refresh=True)]
        except FileNotFoundError:
            return True
    return _only_created(names)


def _only_created(names: list[str]) -> bool:
    return all(name in CREATED_NAMES or name.startswith(DERIVED_LOCK_NAME) for name in names)


def _interrupted_create(path: str) -> bool:
    """Whether the local folder ``path`` holds only what :meth:`TrajectoryStore.create` writes, without
    the trajstore attributes it writes last: a create that was killed, holding no snapshot."""
    local = local_dir(path)
    if local is None or not all(entry.name in CREATED_NAMES for entry in local.iterdir()):
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



def create_row_array(group: zarr.Group, name: str, rows: int, dtype: str, fill: object,
                      attributes: dict | None = None) -> zarr.Array:
    """A (rows,) per-snapshot array: zstd + crc32c, every chunk written (a missing one is damage)."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return group.create_array(name, shape=(rows,), chunks=(ROW_CHUNK,), dtype=dtype, fill_value=fill,
                              compressors=[ZstdCodec(level=1), Crc32cCodec()], attributes=attributes,
                              config={"write_empty_chunks": True})


BACKFILL = "trajstore_backfill_to"  # on a metric array until its rows before the first value are written


def backfill(arr: zarr.Array, rows: int) -> None:
    """Write NaN into rows [0, rows) of a metric first logged at row ``rows``, then drop the marker."""
    arr.with_config({"write_empty_chunks": True})[:rows] = np.nan
    del arr.attrs[BACKFILL]

