"""The host copy a Basis reads P from: the checked in-RAM read, or the memory-mapped uncompressed copy on
disk (one per store and subspace, rebuilt when stale), see :func:`mmap_copy`."""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path

import numpy as np

from trajstore.errors import StoreWriteError, TrajstoreError

from .subspace import BasisDigest, Subspace, block_rows


def mmap_copy(sub: Subspace, cache_dir: "str | os.PathLike | None") -> tuple[np.ndarray, str]:
    """The subspace's basis as an uncompressed (n, d) float32 .npy, memory-mapped read-only, and its digest.

    Each store and subspace has a folder of its own: ``<store>/subspaces/<name>/`` by default, or
    ``<cache_dir>/<store name>-<hash of its path>/<name>/`` (also under ``./.trajstore-cache`` for a
    remote store). The file is ``basis-<fingerprint>-<digest>.f32.npy``: the fingerprint hashes the
    subspace's attributes, spectrum and shape, the digest is the whole basis's (the one its extraction
    recorded; for a subspace written before digests, the one computed while the copy was made from a
    checked read). Before use the whole file is hashed and must give that digest, so a file of another
    store, subspace or extraction, or a damaged one, is rebuilt, never used. Each writer fills a private
    temp file, checks what it copied (see :meth:`Subspace.verify`) and renames it into place: concurrent
    loaders are safe (identical copies, the last rename wins) and a killed one leaves only its ``*.partial``.
    """
    folder = _cache_folder(sub, cache_dir)
    prefix = f"basis-{_subspace_fingerprint(sub)}-"
    expected = sub.digest
    candidates = [folder / f"{prefix}{_hex(expected)}.f32.npy"] if expected is not None else \
        sorted(folder.glob(f"{prefix}*.f32.npy"))  # an older subspace: the digest is in the file's name
    data = target = None
    for candidate in candidates:
        data = _open_cached(candidate, sub, expected or _digest_in_name(candidate, prefix))
        if data is not None:
            target, digest = candidate, expected or _digest_in_name(candidate, prefix)
            break
    if data is None:
        try:
            if not folder.is_dir():
                if cache_dir is None:  # the subspace's own folder: gone with it (do not create it again)
                    sub.check_unchanged()
                folder.mkdir(parents=True, exist_ok=True)
            target, digest = _write_cached(folder, prefix, sub)
        except (OSError, ValueError) as exc:  # e.g. its folder went with a subspace deleted meanwhile
            if isinstance(exc, TrajstoreError):
                raise
            sub.check_unchanged()
            raise StoreWriteError(f"could not write the memory-mapped copy of subspace {sub.name!r} into {folder} "
                                  f"({exc}); free space there, pass another cache_dir, or use host='pinned'") from exc
        data = _open_cached(target, sub, digest)
        if data is None:
            sub.check_unchanged()  # its folder may have gone with the subspace
            raise StoreWriteError(
                f"the memory-mapped copy of subspace {sub.name!r} written to {target} does not read back as the "
                "store's basis; check that disk, pass another cache_dir, or use host='pinned'")
    for old in [*folder.glob("basis-*.f32.npy"), folder / "basis.f32.npy"]:  # other versions are stale
        if old != target:
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


def _digest_in_name(path: Path, prefix: str) -> str | None:
    hexa = path.name[len(prefix):].removesuffix(".f32.npy")
    return f"blake2b-128:{hexa}" if re.fullmatch(r"[0-9a-f]{32}", hexa) else None


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


def _open_cached(target: Path, sub: Subspace, digest: str | None) -> np.ndarray | None:
    """The cached copy, memory-mapped, or None when it is missing, unreadable or not the basis whose
    whole digest is ``digest`` (every row is hashed: a hole anywhere is found)."""
    if digest is None:
        return None
    try:
        data = np.load(target, mmap_mode="r")  # (n, d)
    except (OSError, ValueError):
        return None
    if data.shape != tuple(sub.basis.shape) or data.dtype != np.float32 or not data.flags.c_contiguous:
        return None
    found = BasisDigest()
    rows = block_rows(data.shape)
    for r0 in range(0, data.shape[0], rows):
        found.update(data[r0:r0 + rows])
    return data if found.hexdigest() == digest else None


def _write_cached(folder: Path, prefix: str, sub: Subspace) -> tuple[Path, str]:
    """Copy the basis into a private temp file, check it (:meth:`Subspace.verify`), then rename it to
    ``<prefix><digest>.f32.npy`` (atomic); returns that path and the digest."""
    tmp = folder / f"{prefix}copy.f32.npy.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=sub.basis.shape)
        _, digest = sub.read(out)  # raises, before the rename, when what was copied is not the extraction's basis
        out.flush()
        del out
        target = folder / f"{prefix}{_hex(digest)}.f32.npy"
        os.replace(tmp, target)
        return target, digest
    finally:
        tmp.unlink(missing_ok=True)
