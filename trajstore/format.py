"""Store format version 1: where things live in the zarr group, and how to open it.

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
from .errors import FormatVersionError, NotAStoreError

FORMAT_VERSION = 1
ATTR = "trajstore"
LOCK_NAME = ".trajstore.lock"
DERIVED_LOCK_NAME = ".trajstore.derived.lock"

# node names
PARAMS, REFERENCE, BUFFERS = "params", "reference", "buffers"
STEP, EPOCH, WALL_TIME, NONFINITE = "step", "epoch", "wall_time", "nonfinite"
METRICS, SUBSPACES, GRAM = "metrics", "subspaces", "gram"
ROW_ARRAYS = (STEP, EPOCH, WALL_TIME, NONFINITE)

DEFAULT_CHUNK = 1 << 18  # elements per inner chunk (1 MiB of float32): bounds extraction memory (t MiB a task)
DEFAULT_SHARD = 1 << 21  # elements per shard file (8 MiB of float32): zarr encodes shards in parallel
ROW_CHUNK = 4096  # rows per chunk of the (t,) per-snapshot arrays


def is_url(path: str) -> bool:
    return "://" in str(path)


def normalize(path: "str | os.PathLike") -> str:
    """A local path made absolute, or a URL as given."""
    path = str(path)
    return path if is_url(path) else str(Path(path).expanduser().absolute())


def local_dir(path: str) -> Path | None:
    """The local directory behind ``path`` (also for ``file://`` URLs), else None."""
    if not is_url(path):
        return Path(path)
    if path.startswith("file://"):
        return Path(path.removeprefix("file://"))
    return None


def zarr_store(path: str, read_only: bool, storage_options: dict | None = None):
    """A zarr store for a local path (LocalStore, atomic writes) or an fsspec URL."""
    if is_url(path):
        opts = dict(storage_options or {})
        if path.startswith("file://"):
            opts.setdefault("auto_mkdir", True)
        return FsspecStore.from_url(path, read_only=read_only, storage_options=opts)
    return LocalStore(path, read_only=read_only)


def open_root(path: str, mode: str, storage_options: dict | None = None) -> tuple[zarr.Group, dict]:
    """Open an existing store's root group and return it with its ``trajstore`` attributes."""
    local = local_dir(path)
    if local is not None and not local.exists():
        raise NotAStoreError(f"no trajstore store at {path}: the path does not exist")
    try:
        group = zarr.open_group(zarr_store(path, read_only=(mode == "r"), storage_options=storage_options), mode="r" if mode == "r" else "r+")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError) as exc:
        raise NotAStoreError(f"{path} is not a trajstore store (no zarr group there: {exc})") from None
    meta = group.attrs.get(ATTR)
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise NotAStoreError(f"{path} is a zarr group but not a trajstore store (no '{ATTR}' attributes)")
    check_version(meta, path)
    return group, meta


def check_version(meta: dict, path: str) -> None:
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{path} was written in store format version {version} by trajstore "
            f"{meta.get('versions', {}).get('trajstore', '?')}; this trajstore reads format "
            f"<= {FORMAT_VERSION}. Upgrade: pip install -U trajstore"
        )


def create_rows(group: zarr.Group, name: str, n: int, dtype: np.dtype, chunk: int, shard: int,
                 preset: CodecPreset, rows: int = 0) -> zarr.Array:
    """A (rows, n) array: one row per snapshot, inner chunks (1, chunk) in shards (1, shard)."""
    fill = float("nan") if np.dtype(dtype).kind == "f" else 0
    return group.create_array(name, shape=(rows, n), chunks=(1, chunk), shards=(1, shard), dtype=dtype,
                              compressors=preset.zarr_compressors(chunk * np.dtype(dtype).itemsize), fill_value=fill,
                              config={"write_empty_chunks": True})


def clear_except_lock(path: str) -> None:
    """Empty the store's folder (``overwrite=True``) while keeping the lock we hold."""
    import shutil

    import fsspec

    local = local_dir(path)
    if local is not None:
        for entry in local.iterdir():
            if entry.name != LOCK_NAME:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        return
    fs, root = fsspec.core.url_to_fs(path)
    if fs.exists(root):
        for entry in fs.ls(root, detail=False):
            if not entry.rstrip("/").endswith(LOCK_NAME):
                fs.rm(entry, recursive=True)


def stored_bytes(path: str) -> int:
    """Bytes the store takes on disk (or in the object store)."""
    local = local_dir(path)
    if local is not None:
        return sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    import fsspec
    fs, root = fsspec.core.url_to_fs(path)
    return int(fs.du(root))
