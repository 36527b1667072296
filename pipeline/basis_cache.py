"""The host copy a Basis reads P from: the checked in-RAM read, or the memory-mapped uncompressed copy on
disk (one per store and subspace, rebuilt when stale), see :func:`mmap_copy`."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import uuid
from pathlib import Path

import numpy as np
import torch

from trajstore.errors import StoreWriteError, TrajstoreError

from .subspace import DIGEST, BasisDigest, Subspace, block_rows
from .tiles import put_rows, rows_of, tile_count


def mmap_copy(sub: Subspace, cache_dir: "str | os.PathLike | None", cols: int) -> tuple[np.ndarray, str]:
    """The subspace's basis as an uncompressed float32 .npy in column tiles (k, d, cols) (see
    :mod:`pipeline.tiles`: each tile one contiguous run, read by the products in place), memory-mapped
    read-only, and the basis's digest.

    Each store and subspace has a folder of its own: ``<store>/subspaces/<name>/`` by default, or
    ``<cache_dir>/<store name>-<hash of its path>/<name>/`` (also under ``./.trajstore-cache`` for a
    remote store). The file is ``basis-<fingerprint>-<digest>-t<cols>-<file hash>.f32.npy``: the fingerprint
    hashes the subspace's attributes, spectrum and shape; the digest is the whole basis's (the one its
    extraction recorded; for a subspace written before digests, the one computed while the copy was made from
    a checked read); the file hash is sha256-128 of the file's tiles, taken when it was written from that
    checked read. Before use the whole file is hashed and must give that hash, so a file of another store,
    subspace, extraction or tile width, or a damaged one, is rebuilt, never used. Each writer fills a private
    temp file, checks what it copied (see :meth:`Subspace.verify`) and renames it into place: concurrent
    loaders are safe (identical copies, the last rename wins) and a killed one leaves only its ``*.partial``.
    """
    folder = _cache_folder(sub, cache_dir)
    prefix = f"basis-{_subspace_fingerprint(sub)}-"
    expected = sub.digest
    algorithm = DIGEST if expected is None else expected.rsplit(":", 1)[0]
    # an older subspace (no recorded digest): the digest is in the file's name
    pattern = f"{prefix}{_hex(expected) if expected is not None else '*'}-t{cols}-*.f32.npy"
    data = target = digest = None
    for candidate in sorted(folder.glob(pattern)):
        named = _names(candidate, prefix, cols, algorithm)
        if named is not None and (expected is None or named[0] == expected):
            stale: list = []
            data = _open_cached(candidate, sub, cols, named[1], stale)
            if data is not None:
                target, digest = candidate, named[0]
                break
            if stale and expected is not None:  # read, and damaged or hashed by an earlier version: never usable
                try:  # (renamed-in files are whole), so it is not hashed again at every load
                    candidate.unlink(missing_ok=True)
                except OSError:
                    pass
    if data is None:
        try:
            if not folder.is_dir():
                if cache_dir is None:  # the subspace's own folder: gone with it (do not create it again)
                    sub.check_unchanged()
                folder.mkdir(parents=True, exist_ok=True)
            target, digest = _write_cached(folder, prefix, sub, cols)
        except (OSError, ValueError) as exc:  # e.g. its folder went with a subspace deleted meanwhile
            if isinstance(exc, TrajstoreError):
                raise
            sub.check_unchanged()
            raise StoreWriteError(f"could not write the memory-mapped copy of subspace {sub.name!r} into {folder} "
                                  f"({exc}); free space there, pass another cache_dir, or use host='pinned'") from exc
        data = _open_cached(target, sub, cols, _names(target, prefix, cols, algorithm)[1])
        if data is None:
            sub.check_unchanged()  # its folder may have gone with the subspace
            raise StoreWriteError(
                f"the memory-mapped copy of subspace {sub.name!r} written to {target} does not read back as the "
                "store's basis; check that disk, pass another cache_dir, or use host='pinned'")
    keep = f"{prefix}{_hex(digest)}-t"  # this extraction's copies (one per tile width) stay; others are stale
    for old in [*folder.glob("basis-*.f32.npy"), folder / "basis.f32.npy"]:
        if not old.name.startswith(keep):
            try:
                old.unlink(missing_ok=True)  # a process still mapping it keeps its pages
            except OSError:
                pass
    return data, digest


def extraction_digest(sub: Subspace) -> str:
    """The digest its extraction recorded for the whole basis; for a subspace written before digests, a hash
    of what identifies the extraction (its attributes, spectrum and shape)."""
    if sub.digest is not None:
        return sub.digest
    h = hashlib.blake2b(json.dumps(sub.attrs, sort_keys=True, default=str).encode(), digest_size=16)
    h.update(np.ascontiguousarray(sub.singular_values, dtype=np.float64).tobytes())
    h.update(repr(tuple(sub.basis.shape)).encode())
    return f"attrs-blake2b:{h.hexdigest()}"


def _hex(digest: str) -> str:
    return digest.rsplit(":", 1)[-1]


def _names(path: Path, prefix: str, cols: int, algorithm: str) -> tuple[str, str] | None:
    """(the basis digest, computed by ``algorithm``; the file hash) a cache file's name gives, or None for another
    name."""
    found = re.fullmatch(rf"([0-9a-f]{{32}})-t{cols}-([0-9a-f]{{32}})\.f32\.npy", path.name[len(prefix):])
    return (f"{algorithm}:{found[1]}", found[2]) if found else None


def _cache_folder(sub, cache_dir: "str | os.PathLike | None") -> Path:
    from trajstore.format import local_dir

    local = local_dir(sub.path)
    if cache_dir is None and local is not None:
        return local / "subspaces" / sub.name
    where = str(local.resolve()) if local is not None else str(sub.path)
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", where.rstrip("/").rsplit("/", 1)[-1])[:48] or "store"
    root = Path(cache_dir) if cache_dir is not None else Path.cwd() / ".trajstore-cache"
    return root / f"{label}-{hashlib.sha1(where.encode()).hexdigest()[:12]}" / sub.name


def _subspace_fingerprint(sub) -> str:
    """A hash of what identifies one extraction: its attributes (settings, snapshots, eigenvalues,
    creation time, duration), singular values and shape."""
    h = hashlib.sha1(json.dumps(sub.attrs, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(sub.singular_values, dtype=np.float64).tobytes())
    h.update(repr(tuple(sub.basis.shape)).encode())
    return h.hexdigest()[:16]


def _file_hash(tiles: np.ndarray) -> str:
    """sha256-128 of a (k, d, cols) float32 array's bytes, tile by tile (a file named by the blake2b-128 of
    earlier versions does not match: it is rebuilt once)."""
    h = hashlib.sha256()
    for tile in tiles:
        h.update(memoryview(np.ascontiguousarray(tile)).cast("B"))
    return h.hexdigest()[:32]


def _open_cached(target: Path, sub: Subspace, cols: int, file_hash: str, stale: list | None = None
                 ) -> np.ndarray | None:
    """The cached copy (k, d, cols), memory-mapped, or None when it is missing, unreadable, of another
    shape, or does not hash to ``file_hash`` (every tile is hashed: a hole anywhere is found); a file that was
    read but is not the copy (shape, dtype, hash) is also appended to ``stale``."""
    n, d = sub.basis.shape
    try:
        data = np.load(target, mmap_mode="r")  # (k, d, cols)
    except (OSError, ValueError, EOFError):  # missing, not an .npy, empty (a crash before its data reached disk)
        return None
    if data.shape != (tile_count(n, cols), d, cols) or data.dtype != np.float32 or not data.flags.c_contiguous \
            or _file_hash(data) != file_hash:
        if stale is not None:
            stale.append(target)
        return None
    return data


def _write_cached(folder: Path, prefix: str, sub: Subspace, cols: int) -> tuple[Path, str]:
    """Copy the basis, tiled, into a private temp file (what is read is checked: :meth:`Subspace.read`),
    then rename it to ``<prefix><digest>-t<cols>-<file hash>.f32.npy`` (atomic); returns that path and
    the digest."""
    tmp = folder / f"{prefix}copy.f32.npy.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    n, d = sub.basis.shape
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(tile_count(n, cols), d, cols))
        out[-1] = 0  # the last tile's padding
        # rows of P into their tiles as they are read; raises, before the rename, when what was read is not the basis
        digest = sub.read(sink=functools.partial(put_rows, out))[1]
        out.flush()
        copied, tiles, step = BasisDigest.like(digest), torch.from_numpy(out), block_rows((n, d))
        for r0 in range(0, n, step):  # what the tiles hold must be the rows that were read and checked
            copied.update(rows_of(tiles, n, r0, r0 + step))
        if copied.hexdigest() != digest:
            raise StoreWriteError(f"the tiled copy of subspace {sub.name!r} in {tmp} does not hold the basis that "
                                  "was read; check that disk, pass another cache_dir, or use host='pinned'")
        del tiles
        file_hash = _file_hash(out)
        del out
        target = folder / f"{prefix}{_hex(digest)}-t{cols}-{file_hash}.f32.npy"
        os.replace(tmp, target)
        return target, digest
    finally:
        tmp.unlink(missing_ok=True)
