"""One value a row into the small per-snapshot arrays (step, epoch, wall time, flags, metrics) on
local disk, a whole chunk at a time.

Through zarr, setting one element reads, decodes, re-encodes and writes its 4096-row chunk, with
milliseconds of Python under the GIL per array and row: at 10M parameters that was a fifth of a
snapshot's time on 2 cores (``bench_record.py``), taken from the threads encoding the weights.
:class:`ChunkWriter` keeps the chunk being filled in memory (read once, through zarr, when a row
first lands in it) and writes it whole with the array's own codecs, ``bytes -> zstd -> crc32c``
from its ``zarr.json``, through a temp file and a rename as zarr's LocalStore does. The file is
the one zarr writes for the same values (tested byte for byte). A chunk file replaced since this
writer wrote it (zarr writing the array through the same open store) is read again first. Any other codec chain, chunking or key encoding gets no writer (the
caller writes through zarr), and so does a remote store.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import crc32c
import numpy as np
from numcodecs.zstd import Zstd

from .shardwrite import atomic_write


class ChunkWriter:
    """Writer of one (rows,) array of a local store, a whole chunk per call."""

    def __init__(self, folder: Path, dtype: np.dtype, chunk: int, level: int, checksum: bool):
        self.folder, self.dtype, self.chunk = Path(folder), dtype, chunk
        self.zstd = Zstd(level=level, checksum=checksum)
        self.index: int | None = None  # the chunk held in ``values``
        self.written: tuple | None = None  # (inode, mtime) of the file this writer last wrote for it
        self.values = np.empty(chunk, dtype)  # (chunk,)
        (self.folder / "c").mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_array(cls, folder: "Path | None") -> "ChunkWriter | None":
        """A writer for the array in local ``folder`` when its layout is one this module reproduces
        exactly (1-D, regular chunks, ``/`` keys, bytes little-endian -> zstd -> crc32c), else None."""
        if folder is None:
            return None
        try:
            meta = json.loads((Path(folder) / "zarr.json").read_bytes())
            dtype = np.dtype(meta["data_type"])
            (chunk,) = meta["chunk_grid"]["configuration"]["chunk_shape"]
            key = meta["chunk_key_encoding"]
            codecs = meta["codecs"]
            zstd = codecs[1].get("configuration", {})
            ok = (meta.get("zarr_format") == 3 and len(meta["shape"]) == 1 and meta["chunk_grid"]["name"] == "regular"
                  and key.get("name") == "default" and key.get("configuration", {}).get("separator", "/") == "/"
                  and dtype.kind in "biuf" and [c.get("name") for c in codecs] == ["bytes", "zstd", "crc32c"]
                  and codecs[0].get("configuration", {}).get("endian", "little") == "little"
                  and not codecs[2].get("configuration") and not meta.get("storage_transformers")
                  and set(zstd) == {"level", "checksum"} and isinstance(zstd["checksum"], bool)
                  and isinstance(zstd["level"], int) and not isinstance(zstd["level"], bool)
                  and isinstance(chunk, int) and chunk > 0)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            return None
        return cls(folder, dtype.newbyteorder("<"), chunk, zstd["level"], zstd["checksum"]) if ok else None

    def set(self, row: int, value: object, load: Callable[[int, int], np.ndarray], fill: object) -> None:
        """Element ``row`` = ``value``; its chunk is written whole. ``load(lo, hi)``: the stored values
        of rows [lo, hi) (called when a row first lands in a chunk not held, e.g. after a truncation
        back into an earlier chunk); rows from ``hi`` to the chunk's end hold ``fill``."""
        index, lo = divmod(row, self.chunk)
        path = self.folder / "c" / str(index)
        if self.index == index and self.written != _identity(path):
            self.index = None  # the file was replaced by another writer (zarr, on this open store): read it again
        if self.index != index:
            start = index * self.chunk
            self.index = None  # until the chunk is whole again
            self.values[:] = fill
            stored = load(start, row)  # (row - start,) the rows before ``row`` in its chunk
            self.values[:stored.shape[0]] = stored
            self.index = index
        self.values[lo] = value
        try:
            data = self.zstd.encode(self.values)
            atomic_write(path, [data, np.uint32(crc32c.crc32c(data)).astype("<u4").tobytes()])
            self.written = _identity(path)
        except BaseException:
            self.index = None  # the file may hold the old chunk: read it again next time
            raise


def _identity(path: Path) -> "tuple | None":
    """(inode, mtime, size) of a chunk file: every write (temp file + rename) makes a new one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
