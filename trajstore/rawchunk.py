"""Whole chunks of uncompressed arrays (codecs: ``bytes`` alone) on local disk, written and read directly.

A subspace's basis P (n, d) and mean (n,) are stored uncompressed, one chunk per block of the basis
pass. Through zarr each 16 MB chunk costs copies and hand-offs between threads on top of the write
(about 1.7 s of a 10M-parameter basis pass here); the chunk file of such an array is simply its
values' little-endian bytes in C order (the edge chunk padded with the fill value), so it is written
here through a temp file and a rename as zarr's LocalStore does, and read back with one ``readinto``.
Any other layout (compressors, another key encoding, a remote store, a region that is not one whole
chunk) returns False / None: the caller goes through zarr.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .shardwrite import atomic_write


class RawChunks:
    """The chunks of one uncompressed array in a local folder."""

    def __init__(self, folder: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype, fill: object):
        self.folder, self.shape, self.chunks, self.dtype, self.fill = folder, shape, chunks, dtype, fill

    @classmethod
    def for_array(cls, folder: "Path | None") -> "RawChunks | None":
        """The array in local ``folder`` when its chunks are raw bytes this module writes exactly, else None."""
        if folder is None:
            return None
        try:
            meta = json.loads((Path(folder) / "zarr.json").read_bytes())
            codecs, key, grid = meta["codecs"], meta["chunk_key_encoding"], meta["chunk_grid"]
            dtype = np.dtype(meta["data_type"])
            shape, chunks = tuple(meta["shape"]), tuple(grid["configuration"]["chunk_shape"])
            ok = (meta.get("zarr_format") == 3 and len(codecs) == 1 and codecs[0].get("name") == "bytes"
                  and (codecs[0].get("configuration") or {}).get("endian", "little") == "little"
                  and key.get("name") == "default" and (key.get("configuration") or {}).get("separator", "/") == "/"
                  and grid.get("name") == "regular" and len(chunks) == len(shape) >= 1
                  and all(isinstance(c, int) and c > 0 for c in chunks) and dtype.kind == "f"
                  and not meta.get("storage_transformers"))
            fill = dtype.type(float(meta["fill_value"])) if ok else None
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError):
            return None
        return cls(Path(folder), shape, chunks, dtype.newbyteorder("<"), fill) if ok else None

    def _chunk_of(self, start: tuple[int, ...], stop: tuple[int, ...]) -> "tuple[int, ...] | None":
        """The chunk index when [start, stop) is exactly one chunk (clipped at the array's end), else None."""
        index = []
        for lo, hi, c, n in zip(start, stop, self.chunks, self.shape):
            if lo % c or hi != min(lo + c, n) or lo >= n:
                return None
            index.append(lo // c)
        return tuple(index)

    def _path(self, index: tuple[int, ...]) -> Path:
        return self.folder.joinpath("c", *map(str, index))

    def write(self, start: tuple[int, ...], values: np.ndarray) -> bool:
        """Write ``values`` as the region from ``start`` when it is one whole chunk; False (nothing written)
        otherwise, or when ``values`` is not of the array's dtype."""
        index = self._chunk_of(start, tuple(s + v for s, v in zip(start, values.shape)))
        if index is None or values.dtype != self.dtype:
            return False
        if values.shape != self.chunks:  # the edge chunk: zarr stores it whole, padded with the fill value
            padded = np.full(self.chunks, self.fill, self.dtype)
            padded[tuple(slice(0, k) for k in values.shape)] = values
            values = padded
        path = self._path(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, [memoryview(np.ascontiguousarray(values)).cast("B")])
        return True

    def read(self, start: tuple[int, ...], stop: tuple[int, ...]) -> "np.ndarray | None":
        """The region [start, stop) when it is one whole chunk whose file holds exactly a chunk's bytes,
        else None (a missing or short file included: the caller reads through zarr, which reports it)."""
        index = self._chunk_of(start, stop)
        if index is None:
            return None
        out = np.empty(self.chunks, self.dtype)
        try:
            with open(self._path(index), "rb") as f:
                if f.readinto(memoryview(out).cast("B")) != out.nbytes or f.read(1):
                    return None
        except OSError:
            return None
        return out[tuple(slice(0, hi - lo) for lo, hi in zip(start, stop))]
