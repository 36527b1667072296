"""Whole-shard writes of one ``params`` row on local disk, its chunks encoded in parallel.

zarr-python encodes a shard's chunks one after the other and spends Python time per chunk under
the GIL; on 2 cores that, not Blosc, capped recording at a fifth of ``torch.save``'s pace. This
module writes exactly the files zarr writes for trajstore's layout (see :mod:`.fastread`): each
inner chunk is Blosc-encoded with the array's own codec settings (from its ``zarr.json``, so a
store keeps the codec chain it was created with) on the :mod:`.parallel` pool, followed by its
crc32c; a shard file is the chunks in order, then the index ``(offset, nbytes)`` per chunk and the
index's crc32c. Shard ``k`` is written (temp file + rename, as zarr's LocalStore does, so a killed
writer leaves a whole old file or a whole new one, never a torn one) by the pool thread that
encoded it: one task per shard, so a row of 40 MB costs a handful of hand-offs between threads.

Only whole shards are written here; anything else (a remote store, another layout, a column range
that does not cover whole shards) returns False and the caller writes through zarr. The commit
protocol and the durable mode's fsyncs are the caller's, unchanged: the files are the same ones.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Iterator

import crc32c
import numcodecs
import numpy as np

from . import parallel
from .errors import InvalidArgumentError
from .fastread import is_row_sharded

_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


class ShardWriter:
    """Writer of whole (1, S) shards of one (rows, n) array in a local folder."""

    def __init__(self, folder: Path, meta: dict):
        self.folder = Path(folder)
        self.n = int(meta["shape"][1])
        self.dtype = np.dtype(meta["data_type"])
        self.shard = int(meta["chunk_grid"]["configuration"]["chunk_shape"][1])
        conf = meta["codecs"][0]["configuration"]
        self.chunk = int(conf["chunk_shape"][1])
        self.per_shard = self.shard // self.chunk
        b = blosc_settings(conf["codecs"][1])
        if b is None:
            raise ValueError(f"Blosc settings this writer does not know: {conf['codecs'][1]!r:.200}")
        self.blosc = numcodecs.Blosc(cname=b["cname"], clevel=b["clevel"], shuffle=_SHUFFLE[b["shuffle"]],
                                     blocksize=b["blocksize"], typesize=b["typesize"])
        fill = meta.get("fill_value")
        self.fill = np.array(np.nan if fill in ("NaN", None) and self.dtype.kind == "f" else (fill or 0), self.dtype)

    @classmethod
    def for_array(cls, folder: "Path | None", meta: dict) -> "ShardWriter | None":
        """A writer for the array whose metadata are ``meta`` (its ``zarr.json``) in
        ``folder``, or None when the folder is not local or the layout is not trajstore's."""
        if folder is None:
            return None
        try:
            if not is_row_sharded(meta) or meta["chunk_key_encoding"].get("configuration", {}).get(
                    "separator", "/") != "/" or blosc_settings(meta["codecs"][0]["configuration"]["codecs"][1]) is None:
                return None  # zarr writes what this writer does not know
            writer = cls(folder, meta)
        except (KeyError, ValueError, TypeError, IndexError, AttributeError, ArithmeticError):
            return None
        return writer if 0 < writer.chunk <= writer.shard == writer.per_shard * writer.chunk else None

    def covers(self, lo: int, hi: int) -> bool:
        """Whether columns [lo, hi) are whole shards (the last one may end at n)."""
        return lo < hi <= self.n and lo % self.shard == 0 and (hi % self.shard == 0 or hi == self.n)

    def write(self, row: int, lo: int, values: np.ndarray) -> None:
        """Write columns [lo, lo + len(values)) of row ``row`` and wait: see :meth:`start`."""
        parallel.wait_all(self.start(row, lo, values))

    def start(self, row: int, lo: int, values: np.ndarray) -> "list[Future]":
        """Start writing columns [lo, lo + len(values)) of row ``row`` on the pool: each shard's chunks are
        encoded by one task, or split over a few when the row has fewer shards than there are threads,
        and the task that finishes a shard's last chunks writes its file. A row therefore costs a handful
        of hand-offs between threads (not one per chunk), and the compressed bytes held at once are
        bounded by the shards in flight, whatever the row's size. Returns the tasks' futures; ``values``
        must stay unchanged until every one is done. ``values`` must have the array's dtype
        (InvalidArgumentError otherwise: nothing is cast). A task raises OSError (disk full, ...) with
        no temp file left behind; a shard written before the error stays (the row is not committed)."""
        if values.dtype != self.dtype:
            raise InvalidArgumentError(
                f"a row of {values.dtype} cannot be written into an array of {self.dtype} (it would be cast "
                "silently): convert it to the store's stored dtype first")
        values = np.ascontiguousarray(values)  # (hi - lo,)
        hi = lo + values.shape[0]
        if not self.covers(lo, hi):
            raise ValueError(f"columns [{lo}, {hi}) are not whole shards of {self.shard}")
        folder = self.folder / "c" / str(row)  # made here, once, not by each shard task
        folder.mkdir(parents=True, exist_ok=True)
        shards = range(lo // self.shard, (hi + self.shard - 1) // self.shard)
        split = max(1, min(self.per_shard, -(-parallel.threads() // len(shards))))  # tasks per shard
        futures: list[Future] = []
        try:
            for shard in shards:
                starts = list(range(shard * self.shard, min((shard + 1) * self.shard, hi), self.chunk))
                job = _ShardJob(self, folder / str(shard), values, lo, starts, split)
                futures += [parallel.submit(job.encode, part) for part in range(job.tasks)]
        except BaseException:
            parallel.wait_all_quietly(futures)  # none still reads ``values`` once this returns
            raise
        return futures

    def _encode(self, values: np.ndarray, start: int) -> "tuple[bytes, bytes]":
        """Chunk at ``values[start:]``: Blosc, and its crc32c (the last chunk padded with the fill value)."""
        part = values[start:start + self.chunk]  # (chunk,) or shorter at n
        if part.shape[0] < self.chunk:
            padded = np.full(self.chunk, self.fill, self.dtype)
            padded[:part.shape[0]] = part
            part = padded
        data = self.blosc.encode(part)
        return data, _crc(data)

    def _write_file(self, path: Path, parts: "list[tuple[bytes, bytes] | None]") -> None:
        """One shard file: its chunks (None: a chunk wholly past n, which zarr leaves out), then the
        index. The folder exists."""
        index = np.full((len(parts), 2), _EMPTY, "<u8")  # (chunks, 2) offset, nbytes
        offset = 0
        for j, p in enumerate(parts):
            if p is not None:
                nbytes = len(p[0]) + len(p[1])
                index[j] = (offset, nbytes)
                offset += nbytes
        raw = index.tobytes()
        atomic_write(path, [piece for p in parts if p is not None for piece in p] + [raw, _crc(raw)])


class _ShardJob:
    """One shard file, its chunks encoded by ``tasks`` pool tasks: the last one to finish writes the file
    (none does when a task failed: its error reaches the caller through its future)."""

    def __init__(self, writer: ShardWriter, path: Path, values: np.ndarray, lo: int, starts: list[int], split: int):
        self.writer, self.path, self.values, self.lo, self.starts = writer, path, values, lo, starts
        self.tasks = min(split, len(starts))
        self.parts: list = [None] * writer.per_shard  # chunks wholly past n stay None: zarr leaves them out
        self.left, self.failed, self.lock = self.tasks, False, threading.Lock()

    def encode(self, part: int) -> None:
        """Encode this task's share of the chunks (every ``tasks``-th one); the last task writes the file."""
        try:
            for j in range(part, len(self.starts), self.tasks):
                self.parts[j] = self.writer._encode(self.values, self.starts[j] - self.lo)
        except BaseException:
            self.failed = True
            raise
        finally:
            with self.lock:
                self.left -= 1
                last = self.left == 0
        if last and not self.failed:
            self.writer._write_file(self.path, self.parts)
            self.parts = self.values = None  # the compressed bytes go as soon as they are written


_BLOSC_KEYS = {"cname", "clevel", "shuffle", "blocksize", "typesize"}


def blosc_settings(codec: dict) -> "dict | None":
    """The settings of a ``blosc`` codec entry of a ``zarr.json`` when this writer reproduces zarr's bytes
    for them exactly: every key present and nothing else, a compressor this numcodecs has, a known
    shuffle, integer levels and sizes in range. Else None: the caller writes through zarr."""
    if not isinstance(codec, dict) or codec.get("name") != "blosc":
        return None
    conf = codec.get("configuration")
    if not isinstance(conf, dict) or set(conf) != _BLOSC_KEYS:
        return None
    ints = all(isinstance(conf[k], int) and not isinstance(conf[k], bool) for k in ("clevel", "blocksize", "typesize"))
    if (not ints or conf["cname"] not in numcodecs.blosc.list_compressors() or conf["shuffle"] not in _SHUFFLE
            or not 0 <= conf["clevel"] <= 9 or conf["blocksize"] < 0 or conf["typesize"] < 1):
        return None
    return conf
_EMPTY = 2**64 - 1  # the index entry of a chunk the shard does not hold


def atomic_write(path: Path, pieces: "list[bytes]") -> None:
    """Write ``pieces`` as the file ``path`` through a temp file and a rename, as zarr's LocalStore
    does: a killed writer leaves the whole old file or the whole new one. The folder exists."""
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")  # zarr's temp name: gc and repair know it
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _crc(data: bytes) -> bytes:
    return np.uint32(crc32c.crc32c(data)).astype("<u4").tobytes()


_state = threading.local()  # .pending: futures of the writes started inside overlapped() on this thread


@contextlib.contextmanager
def overlapped() -> Iterator[None]:
    """Inside this block, :func:`write_row` on this thread only starts its writes (the caller goes on
    writing the row's other arrays meanwhile); leaving it waits until every one is on disk, and
    raises the first write's error. It also waits when the block raises, so no write is still
    reading a buffer the caller reuses."""
    pending: list[Future] = []
    outer, _state.pending = getattr(_state, "pending", None), pending
    try:
        yield
    except BaseException:
        parallel.wait_all_quietly(pending)
        raise
    finally:
        _state.pending = outer
    parallel.wait_all(pending)


def write_row(folder: "Path | None", row: int, lo: int, values: np.ndarray) -> bool:
    """Write ``values`` as columns [lo, lo + len) of row ``row`` of the array in local ``folder``
    shard by shard, in parallel; False, with nothing written, when this cannot be done here (remote
    store, another layout, a range that is not whole shards, a row past the array): write through zarr.
    Inside :func:`overlapped` the write is only started, and ``values`` must stay unchanged until
    the block ends."""
    if folder is None:
        return False
    try:
        meta = json.loads((Path(folder) / "zarr.json").read_bytes())
        rows = int(meta["shape"][0])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False  # zarr reports it
    writer = ShardWriter.for_array(folder, meta)
    if writer is None or not writer.covers(lo, lo + values.shape[0]) or not 0 <= row < rows:
        return False
    pending = getattr(_state, "pending", None)
    if pending is not None:
        pending.extend(writer.start(row, lo, values))
    else:
        writer.write(row, lo, values)
    return True
