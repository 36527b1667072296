"""Checked column-block reads of the ``params`` array: the bytes zarr wrote, decoded without its per-chunk overhead.

zarr-python spends about 2 ms of Python per chunk on a read, under the GIL, which caps a
dask pass at ~0.5 GB/s whatever the cores. This reader handles exactly the layout trajstore
writes (zarr v3 ``sharding_indexed`` with the index at the end, inner codecs
``bytes -> blosc -> crc32c``, index codecs ``bytes -> crc32c``), reads byte ranges (``pread``
locally, range GETs through fsspec on object stores), checks every crc32c, and blosc-decodes
straight into the caller's buffer (numcodecs releases the GIL off the main thread).

It is also stricter than zarr: a committed row's shard file is never missing and its shard
index has no empty entry (trajstore writes every chunk), so where zarr would silently return
the fill value (NaN, or 0 bits for xor rows) this reader raises CorruptSnapshotError naming
the snapshot. Any other layout returns None from :func:`open_fast` and the caller uses zarr.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import crc32c
import numcodecs
import numpy as np

from . import parallel
from .errors import CorruptMetadataError, CorruptSnapshotError, InvalidArgumentError

_EMPTY = 2**64 - 1


class _LocalFile:
    """A shard file on local disk, read with pread."""

    def __init__(self, path: str):
        self.name = path
        self._fd = os.open(path, os.O_RDONLY)  # FileNotFoundError when missing
        self.size = os.fstat(self._fd).st_size

    def read(self, offset: int, nbytes: int) -> bytes:
        return os.pread(self._fd, nbytes, offset)

    def close(self) -> None:
        os.close(self._fd)


class _RemoteFile:
    """A shard object read with ranged GETs through fsspec (S3, GCS, ...)."""

    def __init__(self, fs, path: str):
        self.name, self._fs, self._path = path, fs, path
        self.size = int(fs.info(path)["size"])  # FileNotFoundError when missing

    def read(self, offset: int, nbytes: int) -> bytes:
        return self._fs.cat_file(self._path, start=offset, end=offset + nbytes)

    def close(self) -> None:
        pass


class FastShardReader:
    """Reader of one (rows, n) array stored as (1, S) shards of (1, C) chunks."""

    def __init__(self, root: str, meta: dict, fs=None, strict: bool = True):
        self.root, self.fs, self.strict = root.rstrip("/"), fs, strict
        self.fill = meta.get("fill_value")
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["data_type"])
        self.shard = int(meta["chunk_grid"]["configuration"]["chunk_shape"][1])
        sharding = meta["codecs"][0]["configuration"]
        self.chunk = int(sharding["chunk_shape"][1])
        self.per_shard = self.shard // self.chunk
        self.blosc = numcodecs.Blosc()
        self.sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def _open(self, row: int, shard: int):
        key = f"c/{row}/{shard}" if self.sep == "/" else f"c.{row}.{shard}"
        path = f"{self.root}/{key}"
        return _LocalFile(path) if self.fs is None else _RemoteFile(self.fs, path)

    def read(self, r0: int, r1: int, c0: int, c1: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [r0, r1) and columns [c0, c1) as (r1 - r0, c1 - c0) of the stored dtype (into ``out``)."""
        if out is None:
            out = np.empty((max(0, r1 - r0), max(0, c1 - c0)), self.dtype)
        elif out.shape != (max(0, r1 - r0), max(0, c1 - c0)) or out.dtype != self.dtype:
            raise InvalidArgumentError(  # not the data's fault: never reported as a corrupt chunk
                f"out must be a {(max(0, r1 - r0), max(0, c1 - c0))} array of {self.dtype} for rows [{r0}, {r1}) "
                f"and columns [{c0}, {c1}), got {out.shape} of {out.dtype}")
        if r1 <= r0 or c1 <= c0:
            return out  # nothing to read (a rank that holds no columns, an empty row range)
        first, last = c0 // self.chunk, (c1 - 1) // self.chunk
        tasks = []  # (row, shard, first chunk, last chunk): one shard's chunks in a task, or a part of them
        for row in range(r0, r1):
            for shard in range(first // self.per_shard, last // self.per_shard + 1):
                tasks.append((row, shard, max(first, shard * self.per_shard),
                              min(last, (shard + 1) * self.per_shard - 1)))
        workers = parallel.threads()
        if 0 < len(tasks) < workers:  # fewer shards than threads: split them by chunks
            pieces, split = -(-workers // len(tasks)), []
            for row, shard, a, b in tasks:
                step = max(1, -(-(b - a + 1) // pieces))
                split += [(row, shard, k, min(b, k + step - 1)) for k in range(a, b + 1, step)]
            tasks = split
        # chunks decode in parallel (numcodecs releases the GIL); the first error in (row, column) order is raised
        parallel.pmap(lambda task: self._read_shard_part(task[0], task[1], task[2], task[3], c0, c1,
                                                         out[task[0] - r0]), tasks)
        return out

    def _read_shard_part(self, row, shard, first, last, c0, c1, dest) -> None:
        try:
            f = self._open(row, shard)
        except FileNotFoundError:
            if not self.strict:  # stores of trajstore <= 0.1 skipped chunks equal to the fill value
                dest[max(c0, shard * self.shard) - c0: min(c1, (shard + 1) * self.shard) - c0] = self._fill()
                return
            raise _corrupt(row, f"its shard file {self.root}/c/{row}/{shard} is missing") from None
        try:
            index_bytes = 16 * self.per_shard + 4
            if f.size < index_bytes:
                raise _corrupt(row, f"its shard file {f.name} is truncated ({f.size} bytes)")
            raw = f.read(f.size - index_bytes, index_bytes)
            _check(raw, row, f"the shard index of {f.name}")
            index = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.per_shard, 2)
            for k in range(max(first, shard * self.per_shard), min(last, (shard + 1) * self.per_shard - 1) + 1):
                lo, hi = k * self.chunk, (k + 1) * self.chunk  # columns of inner chunk k
                a, b = max(lo, c0), min(hi, c1, self.shape[1])
                offset, nbytes = (int(v) for v in index[k - shard * self.per_shard])
                if offset == _EMPTY:
                    if not self.strict:
                        dest[a - c0:b - c0] = self._fill()
                        continue
                    raise _corrupt(row, f"chunk {k} is missing from its shard {f.name}")
                if nbytes < 5 or offset + nbytes > f.size - index_bytes:
                    raise _corrupt(row, f"the index of shard {f.name} points outside the file (chunk {k})")
                data = f.read(offset, nbytes)
                _check(data, row, f"chunk {k} in {f.name}")
                try:
                    if a == lo and b == hi:  # whole chunk: decode straight into the output
                        self.blosc.decode(memoryview(data)[:-4], out=dest[a - c0:b - c0])
                    else:
                        chunk = np.frombuffer(self.blosc.decode(memoryview(data)[:-4]), dtype=self.dtype)
                        dest[a - c0:b - c0] = chunk[a - lo:b - lo]
                except (RuntimeError, ValueError, TypeError) as exc:
                    raise _corrupt(row, f"chunk {k} in {f.name} does not decode ({exc})") from None
        finally:
            f.close()


    def _fill(self):
        return np.nan if self.fill in ("NaN", None) and self.dtype.kind == "f" else (self.fill or 0)


def _corrupt(row: int, what: str) -> CorruptSnapshotError:
    return CorruptSnapshotError(f"snapshot {row} is corrupt: {what}", index=row)


def _check(data: bytes, row: int, what: str) -> None:
    stored = data[-4:]
    computed = np.uint32(crc32c.crc32c(memoryview(data)[:-4])).tobytes()
    if len(data) < 4 or stored != computed:
        raise _corrupt(row, f"{what} fails its crc32c checksum")


def open_fast(path: str, storage_options: dict | None = None, strict: bool = True,
              layout_required: bool = False) -> FastShardReader | None:
    """A checked reader for the array at ``path`` (a local folder or a URL) if it has exactly
    trajstore's layout, else None (metadata that cannot be fetched give None as well).

    ``layout_required``: metadata that were read but describe any other layout raise
    CorruptMetadataError instead: every store of format 1 has this layout, so a difference is
    damage, and zarr would decode it silently wrong (a flipped ``endian``, other chunk keys).
    """
    fs = None
    meta = None
    try:
        if "://" in path:
            import fsspec

            # a reader follows a live writer: never answer from a cached directory listing
            fs, root = fsspec.core.url_to_fs(path, **{"use_listings_cache": False, **(storage_options or {})})
            meta = json.loads(fs.cat_file(f"{root.rstrip('/')}/zarr.json"))
        else:
            root = path
            meta = json.loads((Path(path) / "zarr.json").read_text())
        reader = FastShardReader(root, meta, fs, strict) if is_row_sharded(meta) else None
        if reader is not None and 0 < reader.chunk <= reader.shard == reader.per_shard * reader.chunk:
            return reader
        problem = "it describes another layout"
    except (OSError, ImportError):
        return None
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, ArithmeticError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if layout_required:
        raise CorruptMetadataError(
            f"the array metadata {path.rstrip('/')}/zarr.json do not describe the layout trajstore writes "
            f"((1, S) shards of bytes -> blosc -> crc32c chunks, index at the end, little-endian): {problem}. "
            "The file is damaged; restore it from a copy of the store")
    return None


def is_row_sharded(meta: dict) -> bool:
    """Whether array metadata (a ``zarr.json`` document) describe the layout trajstore writes for
    ``params``: (1, S) shards of (1, C) chunks, ``bytes -> blosc -> crc32c`` inner codecs,
    ``bytes -> crc32c`` index at the end, little-endian, default chunk keys. Raises KeyError,
    TypeError, ValueError, ... on metadata that do not parse."""
    (sharding,) = meta["codecs"]
    conf = sharding["configuration"]
    names = [c["name"] for c in conf["codecs"]]
    return (sharding["name"] == "sharding_indexed" and conf.get("index_location", "end") == "end"
            and names == ["bytes", "blosc", "crc32c"]
            and [c["name"] for c in conf["index_codecs"]] == ["bytes", "crc32c"]
            and conf["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
            and conf["index_codecs"][0].get("configuration", {}).get("endian", "little") == "little"
            and len(meta["shape"]) == 2 and conf["chunk_shape"][0] == 1
            and meta["chunk_grid"]["configuration"]["chunk_shape"][0] == 1
            and meta["chunk_key_encoding"]["name"] == "default")


def row_layout_problem(meta: dict, dtype: str, checksummed: bool = True) -> str | None:
    """What makes a per-snapshot (t,) array's metadata (``zarr.Array.metadata.to_dict()``) differ from
    the layout trajstore writes (little-endian bytes -> zstd [-> crc32c], default ``/`` chunk keys,
    ``dtype``), else None. zarr would decode any other layout without complaint, silently wrong
    (a flipped ``endian``, ``v2`` chunk keys reading the fill value). ``checksummed=False`` also
    accepts the unchecked bytes -> zstd of stores written before the row arrays had crc32c."""
    try:
        names = [c["name"] for c in meta["codecs"]]
        allowed = [["bytes", "zstd", "crc32c"]] + ([] if checksummed else [["bytes", "zstd"]])
        if names not in allowed:
            return f"codecs {names}"
        if (meta["codecs"][0].get("configuration") or {}).get("endian", "little") != "little":
            return "big-endian values"
        keys = meta["chunk_key_encoding"]
        if keys["name"] != "default" or (keys.get("configuration") or {}).get("separator", "/") != "/":
            return f"chunk keys {keys}"
        if not isinstance(meta.get("attributes", {}), dict):
            return "attributes that are not a mapping"
        grid = meta["chunk_grid"]
        chunks = grid["configuration"]["chunk_shape"]
        if grid["name"] != "regular" or len(chunks) != 1 or type(chunks[0]) is not int or chunks[0] < 1:
            return f"chunk grid {grid}"
        if len(meta["shape"]) != 1 or np.dtype(meta["data_type"]) != np.dtype(dtype):
            return f"shape {meta['shape']} of {meta['data_type']}, not (t,) of {np.dtype(dtype)}"
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        return f"unreadable fields ({type(exc).__name__}: {exc})"
    return None
