"""Store format (versions 1 to 3): where things live in the zarr group, and how to open it.

A store is written in the lowest version its features need (:func:`required_version`), so older
trajstores read every store they can read correctly, and refuse the others by their version:

* 1: rows in float32 (float64 when the model has a float64 tensor);
* 2: adds ``columns``, the column map of a store recorded sharded (see columns.py);
* 3: adds rows in the model's half type (``dtype`` ``"float16"``, or ``"bfloat16"``: its uint16
  bits, the params array's attribute ``trajstore_values`` saying so), and ``optimizer_state``
  (the ``optimizer/`` group, see optstate.py). A reader of version <= 2 would take those rows for
  float32 values, or truncate and append without the optimizer rows: it must refuse them.

Group attribute ``trajstore`` (JSON) holds the format version, layouts, codec, user
metadata and the ``committed`` count. See ``shared/design.md`` for the commit protocol.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import FsspecStore, LocalStore

from .codecs import CodecPreset
from .errors import CorruptMetadataError, FormatVersionError, NotAStoreError

FORMAT_VERSION = 3  # 2: a "columns" map; 3: half-type rows or optimizer state (see required_version)
ATTR = "trajstore"
LOCK_NAME = ".trajstore.lock"
DERIVED_LOCK_NAME = ".trajstore.derived.lock"

# node names
PARAMS, REFERENCE, BUFFERS = "params", "reference", "buffers"
STEP, EPOCH, WALL_TIME, NONFINITE = "step", "epoch", "wall_time", "nonfinite"
METRICS, SUBSPACES, GRAM = "metrics", "subspaces", "gram"
OPTIMIZER = "optimizer"  # optimizer/<key>/values, optimizer/<key>/present (format 3, see optstate.py)
VALUES_ATTR = "trajstore_values"  # on the params array of a bfloat16 store: its uint16 holds bfloat16 bits
LANDSCAPES = "landscapes"  # derived: cached loss-landscape grids (pipeline/landscape_cache.py)
ROW_ARRAYS = (STEP, EPOCH, WALL_TIME, NONFINITE)
ROW_DTYPES = {STEP: "int64", EPOCH: "int64", WALL_TIME: "float64", NONFINITE: "bool"}  # metrics: float64

DEFAULT_CHUNK = 1 << 18  # elements per inner chunk (1 MiB of float32): bounds extraction memory (t MiB a task)
DEFAULT_SHARD = 1 << 21  # elements per shard file (8 MiB of float32): zarr encodes shards in parallel
ROW_CHUNK = 4096  # rows per chunk of the (t,) per-snapshot arrays


def is_url(path: str) -> bool:
    """True for an fsspec URL (``s3://...``, ``memory://...``); ``file://`` URLs count as URLs too."""
    return "://" in str(path)


_LOCAL_SCHEMES = ("file://", "local://")


def file_url_path(path: str) -> str | None:
    """The local path behind a ``file://`` (or fsspec ``local://``) URL, else None.

    ``file:///abs/x`` and ``file://localhost/abs/x`` give ``/abs/x``; ``file://rel/x`` gives
    ``rel/x`` (relative to the working directory, as fsspec reads it).
    """
    path = str(path)
    for scheme in _LOCAL_SCHEMES:
        if path.startswith(scheme):
            rest = path[len(scheme):]
            return rest[len("localhost"):] if rest.startswith("localhost/") else rest
    return None


def normalize(path: "str | os.PathLike") -> str:
    """A local path (or ``file://`` URL) made an absolute local path, or any other URL as given.

    ``file://`` URLs become plain paths so that they get everything local stores get: atomic
    writes (LocalStore), the ``flock`` writer lock and the fast reader.
    """
    path = str(path)
    local = file_url_path(path)
    if local is not None:
        path = local
    return path if is_url(path) else str(Path(path).expanduser().absolute())


def local_dir(path: str) -> Path | None:
    """The local directory behind ``path`` (a plain path or a ``file://`` URL), else None."""
    if not is_url(path):
        return Path(path)
    local = file_url_path(path)
    return Path(normalize(local)) if local is not None else None


def zarr_store(path: str, read_only: bool, storage_options: dict | None = None):
    """A zarr store: LocalStore (atomic temp-file + rename writes) for a local path or ``file://``
    URL, FsspecStore for any other fsspec URL (``s3://...``: every PUT is atomic).

    ``storage_options`` apply to remote URLs only; local stores take none. Directory listings are
    not cached (``use_listings_cache=False`` unless given): another process (the writer, an
    extraction) adds arrays while this one reads, and a cached listing would hide them.
    """
    local = local_dir(path)
    if local is not None:
        return LocalStore(local, read_only=read_only)
    opts = {"use_listings_cache": False, **(storage_options or {})}
    return FsspecStore.from_url(path, read_only=read_only, storage_options=opts)


def open_root(path: str, mode: str, storage_options: dict | None = None) -> tuple[zarr.Group, dict]:
    """Open an existing store's root group and return it with its ``trajstore`` attributes."""
    local = local_dir(path)
    if local is not None and not local.exists():
        raise NotAStoreError(f"no trajstore store at {path}: the path does not exist")
    try:
        group = zarr.open_group(zarr_store(path, read_only=(mode == "r"), storage_options=storage_options),
                                mode="r" if mode == "r" else "r+", zarr_format=3)  # no v2 probes: 3 requests less on S3
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.ContainsArrayError) as exc:
        inner = [p.name for p in local.glob("*.zarr") if (p / "zarr.json").exists()] if local is not None else []
        hint = (f"; it holds {', '.join(sorted(inner))}: give that path (a `trajstore train` run folder keeps its store "
                f"in trajectory.zarr), e.g. {path.rstrip('/')}/{sorted(inner)[0]}") if inner else ""
        why = ("a zarr array there, not a store's group" if isinstance(exc, zarr.errors.ContainsArrayError)
               else "no zarr group there")  # (zarr's own words name its LocalStore('file://...') internals)
        raise NotAStoreError(f"{path} is not a trajstore store ({why}){hint}") from None
    except (KeyError, ValueError, TypeError, AttributeError, ArithmeticError) as exc:  # a zarr.json that does not parse
        raise CorruptMetadataError(
            f"the group metadata {path.rstrip('/')}/zarr.json is damaged ({type(exc).__name__}: {exc}); it holds "
            "the committed count, layout and codec: restore it from a copy of the store") from None
    meta = group.attrs.get(ATTR)
    if not isinstance(meta, dict) or "format_version" not in meta:
        try:
            ours = PARAMS in group  # a create writes the arrays first, its attributes last
        except Exception:  # noqa: BLE001 -- only for the message
            ours = False
        if ours:
            raise NotAStoreError(
                f"{path} is a trajstore store whose creation was interrupted (no '{ATTR}' attributes yet): nothing "
                "was ever committed to it. Run the same command again (create and import start it afresh)")
        raise NotAStoreError(f"{path} is a zarr group but not a trajstore store (no '{ATTR}' attributes)")
    check_version(meta, path)
    check_meta(meta, path)
    return group, meta


def required_version(columns: bool, values: str, optimizer_state: bool) -> int:
    """The lowest format version that describes a store with these features (see the top)."""
    if values in ("float16", "bfloat16") or optimizer_state:
        return 3
    return 2 if columns else 1


def check_version(meta: dict, path: str) -> None:
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        versions = meta.get("versions")
        raise FormatVersionError(
            f"{path} was written in store format version {version!r} by trajstore "
            f"{versions.get('trajstore', '?') if isinstance(versions, dict) else '?'}; this trajstore reads format "
            f"<= {FORMAT_VERSION}. Upgrade: pip install -U trajstore"
        )


def check_meta(meta: dict, path: str) -> None:
    """Raise CorruptMetadataError, naming ``zarr.json`` and the key, unless the ``trajstore``
    attributes hold a well-formed committed count, layout(s), dtype and codec that agree."""
    from .layout import ParamLayout

    where = f"the '{ATTR}' attributes in {path.rstrip('/')}/zarr.json"
    committed = meta.get("committed")
    if not isinstance(committed, int) or isinstance(committed, bool) or not 0 <= committed < 1 << 62:
        raise CorruptMetadataError(f"{where} hold committed = {committed!r}, not a snapshot count: the file is "
                                   "damaged; restore it from a copy of the store")
    try:
        layout = ParamLayout.from_json(meta["layout"])
        for spec in layout.specs:
            if not (isinstance(spec.name, str) and isinstance(spec.dtype, str)  # torch names: bfloat16 too
                    and all(type(d) is int and 0 <= d < 1 << 62 for d in spec.shape)):
                raise ValueError(f"tensor entry {spec}")
        # the widened dtype (every version), or from version 3 the model's one half type
        allowed = {layout.storage_dtype().name} | ({layout.value_dtype()} if meta["format_version"] >= 3 else set())
        if not 0 < layout.n < 1 << 62 or meta["dtype"] not in allowed:
            raise ValueError(f"dtype {meta['dtype']!r} for a layout of {layout.n} elements")
        if not isinstance(meta.get("optimizer_state", False), bool) or (
                meta.get("optimizer_state") and meta["format_version"] < 3):
            raise ValueError(f"optimizer_state {meta.get('optimizer_state')!r}")
        if meta.get("buffer_layout") is not None:
            ParamLayout.from_json(meta["buffer_layout"])
        CodecPreset.from_json(meta["codec"])
        if meta.get("columns") is not None or meta["format_version"] >= 2:
            from .columns import ColumnMap

            if meta["format_version"] < 2:
                raise ValueError("a column map in a format-1 store (readers of format 1 would misread it)")
            ColumnMap.from_json(layout.n, meta.get("columns"))
        if not isinstance(meta.get("metadata", {}), dict):
            raise ValueError("metadata is not a mapping")
        truncations = meta.get("truncations", [])
        if not (isinstance(truncations, list) and all(type(k) is int and k >= 0 for k in truncations)):
            raise ValueError(f"truncations {truncations!r:.80} is not a list of snapshot counts")
    except (KeyError, ValueError, TypeError, AttributeError, ArithmeticError) as exc:  # ours subclass ValueError
        raise CorruptMetadataError(f"{where} are damaged ({type(exc).__name__}: {exc}); restore the file from a "
                                   "copy of the store") from None


def create_rows(group: zarr.Group, name: str, n: int, dtype: np.dtype, chunk: int, shard: int,
                 preset: CodecPreset, rows: int = 0) -> zarr.Array:
    """A (rows, n) array: one row per snapshot, inner chunks (1, chunk) in shards (1, shard)."""
    fill = float("nan") if np.dtype(dtype).kind == "f" else 0
    return group.create_array(name, shape=(rows, n), chunks=(1, chunk), shards=(1, shard), dtype=dtype,
                              compressors=preset.zarr_compressors(chunk * np.dtype(dtype).itemsize), fill_value=fill,
                              config={"write_empty_chunks": True})


def clear_except_lock(path: str, storage_options: dict | None = None) -> None:
    """Empty the store's folder (``overwrite=True``) while keeping the lock we hold."""
    import shutil

    import fsspec

    local = local_dir(path)
    if local is not None:
        for entry in local.iterdir():
            if entry.name not in (LOCK_NAME, DERIVED_LOCK_NAME):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        return
    fs, root = fsspec.core.url_to_fs(path, **{"use_listings_cache": False, **(storage_options or {})})
    if fs.exists(root):
        for entry in fs.ls(root, detail=False):
            if not entry.rstrip("/").endswith((LOCK_NAME, DERIVED_LOCK_NAME)):
                fs.rm(entry, recursive=True)


def stored_bytes(path: str, storage_options: dict | None = None) -> int:
    """Bytes the store takes on disk (or in the object store)."""
    local = local_dir(path)
    if local is not None:
        return sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    import fsspec
    fs, root = fsspec.core.url_to_fs(path, **{"use_listings_cache": False, **(storage_options or {})})
    return int(fs.du(root))
