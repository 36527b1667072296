"""The cache of a loss landscape, kept in the store beside the subspaces: ``landscapes/<key>/``.

``key`` is a digest of every setting that decides a cell's value (:func:`settings_key`): the plane
(a digest of w_K, u1 and u2 as read), the grid and span, the recipe, and a digest of the evaluation
set's tensors. A different setting is a different folder, so a cell is never reused for another one.

| node | shape, dtype | notes |
|---|---|---|
| attrs | JSON | ``settings`` (what the key digests), ``ready`` (arrays created), ``complete`` (every row done) |
| ``loss`` | (g, g) float64, chunks (1, g), bytes -> crc32c | ``loss[i, j]``: the cell at a = a[j], b = b[i] |
| ``accuracy`` | (g, g) float64, same | NaN where the recipe's output is not a classification |
| ``done`` | (g,) uint64, chunks (1,) | 0: row i not finished; else a digest of its loss and accuracy bytes |

**Commit, row by row.** A row's ``loss`` and ``accuracy`` chunks are written first, its ``done`` entry
last; every chunk file is replaced atomically (zarr's LocalStore: temp file + rename; an object store's
PUT), so a killed evaluation loses at most the row in flight. A finished row is read back only when its
bytes hash to the digest in ``done``: a missing or damaged chunk is a typed error, never NaN taken for a
value. **Locks**: the derived-data lock, shared (gc and repair, which take it exclusively, wait), and an
exclusive lock per key (one evaluation of a landscape at a time; others run side by side).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from typing import Iterator

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from trajstore import TrajectoryStore
from trajstore.errors import CorruptMetadataError, CorruptSnapshotError
from trajstore.format import DERIVED_LOCK_NAME, LANDSCAPES, zarr_store
from trajstore.lock import WriterLock

CACHE_VERSION = 1


def settings_key(settings: dict) -> str:
    """The folder name of a landscape: 16 hex digits of blake2b over ``settings`` as canonical JSON."""
    text = json.dumps({"cache_version": CACHE_VERSION, **settings}, sort_keys=True, allow_nan=False)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def row_digest(loss: np.ndarray, accuracy: np.ndarray) -> int:
    """Non-zero 64-bit digest of one row's float64 loss and accuracy bytes (``done``'s entry)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.ascontiguousarray(loss, np.float64).tobytes())
    h.update(np.ascontiguousarray(accuracy, np.float64).tobytes())
    return int.from_bytes(h.digest(), "little") | 1


class LandscapeCache:
    """One landscape's folder, opened for writing by :func:`open_cache` (its locks held)."""

    def __init__(self, store: TrajectoryStore, group: zarr.Group, key: str, grid: int):
        self.store, self.group, self.key, self.grid = store, group, key, grid

    @property
    def where(self) -> str:
        return f"{self.store.path}/{LANDSCAPES}/{self.key}"

    def read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(loss (g, g), accuracy (g, g), done (g,) bool); rows not done hold NaN.

        A finished row whose bytes disagree with its recorded digest (a damaged or missing chunk file)
        raises :class:`CorruptSnapshotError` naming the folder to delete."""
        g = self.grid
        try:
            marks = np.asarray(self.group["done"][:], np.uint64)  # (g,)
            loss = np.asarray(self.group["loss"][:], np.float64)  # (g, g)
            acc = np.asarray(self.group["accuracy"][:], np.float64)  # (g, g)
        except (ValueError, RuntimeError, OSError, KeyError, TypeError) as exc:  # crc32c, decode, metadata
            raise self._damaged(f"cannot be read ({type(exc).__name__}: {exc})") from None
        done = marks != 0
        for i in np.flatnonzero(done):
            if row_digest(loss[i], acc[i]) != int(marks[i]):
                raise self._damaged(f"row {i} does not match the digest written with it (a chunk file is missing "
                                    "or damaged)")
        loss[~done], acc[~done] = np.nan, np.nan
        assert loss.shape == acc.shape == (g, g)
        return loss, acc, done

    def commit_row(self, i: int, loss: np.ndarray, accuracy: np.ndarray) -> None:
        """Write row ``i`` (loss, accuracy (g,) each), then mark it done: a kill loses at most this row."""
        loss, accuracy = np.asarray(loss, np.float64), np.asarray(accuracy, np.float64)
        self.group["loss"][i, :] = loss
        self.group["accuracy"][i, :] = accuracy
        self.group["done"][i] = np.uint64(row_digest(loss, accuracy))

    def mark_complete(self) -> None:
        if not self.group.attrs.get("complete"):
            self.group.attrs.update({"complete": True, "completed": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def _damaged(self, what: str) -> CorruptSnapshotError:
        return CorruptSnapshotError(f"the cached landscape {self.where} {what}; it is only a cache: delete that "
                                    "folder and rerun the same command to evaluate it again")


@contextlib.contextmanager
def open_cache(store: TrajectoryStore, settings: dict, grid: int) -> Iterator[LandscapeCache]:
    """The cache folder of ``settings`` (created when missing), with its locks held for the block.

    Raises StoreLockedError naming the holder when gc or repair runs, or when another process evaluates
    the same landscape; CorruptMetadataError when the folder holds other settings than its key says."""
    key = settings_key(settings)
    what = f"landscape {key} of store {store.path}"
    derived = WriterLock(store.path, DERIVED_LOCK_NAME, storage_options=store.storage_options,
                         purpose=f"an evaluation of {what}", shared=True)
    with contextlib.ExitStack() as held:
        held.enter_context(derived.acquire().held())
        if not derived.remote:
            own = WriterLock(store.path, f"{DERIVED_LOCK_NAME}.landscape-{key}", purpose=f"an evaluation of {what}",
                             what=what)
            held.enter_context(own.acquire().held())
        root = zarr.open_group(zarr_store(store.path, False, store.storage_options), mode="r+")
        folder = root.require_group(LANDSCAPES)
        yield LandscapeCache(store, _group(folder, key, settings, grid, f"{store.path}/{LANDSCAPES}/{key}"), key, grid)


def _group(folder: zarr.Group, key: str, settings: dict, g: int, where: str) -> zarr.Group:
    """The existing group of ``key`` (checked), or a new one; one left half-made by a kill is made again."""
    if key in folder:
        try:
            group = folder[key]
            attrs = group.attrs.asdict()
        except (ValueError, TypeError, KeyError, OSError) as exc:
            raise CorruptMetadataError(f"the cached landscape {where} is damaged ({type(exc).__name__}: {exc}); "
                                       "delete that folder and rerun") from None
        if attrs.get("ready"):
            if attrs.get("settings") != json.loads(json.dumps(settings)):
                raise CorruptMetadataError(f"the cached landscape {where} holds other settings than its name says; "
                                           "delete that folder and rerun")
            return group
        del folder[key]  # created but killed before its arrays were: nothing in it was committed
    group = folder.create_group(key)
    group.attrs.update({"settings": settings, "ready": False, "complete": False,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    for name in ("loss", "accuracy"):
        group.create_array(name, shape=(g, g), chunks=(1, g), dtype="float64", fill_value=np.nan,
                           compressors=[Crc32cCodec()])
    group.create_array("done", shape=(g,), chunks=(1,), dtype="uint64", fill_value=0, compressors=[Crc32cCodec()])
    group.attrs.update({"ready": True})
    return group
