"""Subspace: an extracted basis P (n, d) and its spectrum, as stored under ``subspaces/<name>/``."""
from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import zarr

from trajstore import TrajectoryStore
from trajstore.columns import ColumnMap
from trajstore.errors import (
    CorruptSnapshotError,
    FormatVersionError,
    InvalidArgumentError,
    NotAStoreError,
    SubspaceChangedError,
    SubspaceNotFoundError,
)

SUBSPACES = "subspaces"
DIGEST = "sha256-128"  # the ``basis_digest`` new extractions record: "sha256-128:<hex>", the first 16 bytes of
# sha256 over P's float32 bytes, row-major (SHA-NI makes it ~3x blake2b here: benchmarks/results/bench_extract.txt)
LEGACY_DIGEST = "blake2b-128"  # what extractions recorded before 2026-11-28: still checked, never written
_HASHES = {DIGEST: hashlib.sha256, LEGACY_DIGEST: lambda: hashlib.blake2b(digest_size=16)}
ATTEMPTS = 5  # reads of a subspace that changed under them are retried this many times (50 ms, 100 ms, ...)
_BLOCK_BYTES = 8 << 20  # rows of P read (and hashed) at a time: bounds the extra memory of a checked read


class BasisDigest:
    """The digest of a basis P (n, d): a hash of its float32 bytes in row-major order, fed in row blocks of
    any size (the result does not depend on how P is split). ``algorithm`` is :data:`DIGEST` for a new
    digest; :meth:`like` picks the one a recorded digest names, to check it."""

    def __init__(self, algorithm: str = DIGEST) -> None:
        if algorithm not in _HASHES:
            raise FormatVersionError(
                f"the basis digest algorithm {algorithm!r} is not one this trajstore knows ({', '.join(_HASHES)}): "
                "the subspace was written by a newer version; upgrade trajstore to read it")
        self.algorithm = algorithm
        self._hash = _HASHES[algorithm]()

    @classmethod
    def like(cls, recorded: "str | None") -> "BasisDigest":
        """A digest computed as ``recorded`` (``"<algorithm>:<32 hex digits>"``) was, to compare with it;
        :data:`DIGEST` when nothing was recorded. A value of another form is a damaged attribute
        (:class:`CorruptSnapshotError`), an algorithm this version does not know one from a newer version
        (:class:`FormatVersionError`)."""
        if recorded is None:
            return cls()
        found = re.fullmatch(r"([a-z0-9][a-z0-9-]*):[0-9a-f]{32}", recorded) if isinstance(recorded, str) else None
        if found is None:
            raise CorruptSnapshotError(
                f"the recorded basis digest {recorded!r} is malformed (expected '<algorithm>:<32 hex digits>'): the "
                "subspace's attributes are damaged. Extract it again with overwrite=True (--overwrite)")
        return cls(found[1])

    def update(self, rows: np.ndarray) -> "BasisDigest":
        self._hash.update(memoryview(np.ascontiguousarray(rows, dtype=np.float32)).cast("B"))
        return self

    def hexdigest(self) -> str:
        return f"{self.algorithm}:{self._hash.hexdigest()[:32]}"


def block_rows(shape: tuple[int, ...], chunk_rows: int = 1) -> int:
    """Rows of an (n, d) float32 basis to read at a time: about 8 MiB, a multiple of ``chunk_rows``."""
    d = max(1, int(shape[1]))
    return max(1, _BLOCK_BYTES // (d * 4 * chunk_rows)) * chunk_rows


def identity(attrs: dict | None) -> object:
    """What tells one extraction from another: its ``extraction_id`` and digest, or (a subspace written
    before those existed) all its attributes but ``seconds`` (set just after ``complete``)."""
    if attrs is None:
        return None
    if "extraction_id" in attrs:
        return attrs["extraction_id"], attrs.get("basis_digest")
    return {k: v for k, v in attrs.items() if k != "seconds"}


@dataclass
class Subspace:
    """The result of :func:`pipeline.extract_subspace`.

    ``basis`` (n, d) float32 and ``mean`` (n,) stay on disk as zarr arrays; the spectrum is small and
    held in memory. Read the basis with :meth:`read` / :meth:`to_numpy`, which check it against the
    extraction's digest and refuse a basis replaced meanwhile; slicing ``basis`` directly is unchecked.
    """

    path: str
    name: str
    basis: zarr.Array  # (n, d) float32, chunked by rows
    mean: zarr.Array  # (n,) float32
    singular_values: np.ndarray  # (d,) float64
    explained_variance_ratio: np.ndarray  # (t',) float64: the whole spectrum (randomized: NaN where not computed)
    eigenvectors: np.ndarray  # (t', d) float64: V of the centred Gram of the t' sampled rows (t' = t unsampled)
    attrs: dict
    store: TrajectoryStore | None = field(default=None, repr=False, compare=False)  # to re-check the attributes

    @property
    def dim(self) -> int:
        return int(self.basis.shape[1])

    @property
    def n_params(self) -> int:
        """Length of the parameter vector P spans (P's stored rows are more for a store recorded sharded:
        :attr:`n_columns`)."""
        found = getattr(self.store, "columns", None) if self.store is not None else None
        return int(found.n) if found is not None else self.n_columns

    @property
    def n_columns(self) -> int:
        """Stored rows of P: the store's columns (``n_params`` unless the store was recorded sharded)."""
        return int(self.basis.shape[0])

    @property
    def snapshots(self) -> list[int]:
        """Indices of the snapshots the subspace was extracted from."""
        return list(self.attrs["snapshots"])

    @property
    def orthonormality_error(self) -> float:
        """‖PᵀP − I‖_F, measured on the stored float32 basis."""
        return float(self.attrs["orthonormality_error"])

    @property
    def method(self) -> str:
        return str(self.attrs["method"])

    def coordinates(self) -> np.ndarray:
        """The sampled rows' coordinates in the basis, (t', d): (w_i − w̄)ᵀ P = V_d Λ_d^{1/2}, one per sampled
        row (t' = t snapshots without ``window``; ``attrs["steps"]`` gives each row's step)."""
        return self.eigenvectors * self.singular_values[None, :]

    def cumulative_variance(self) -> np.ndarray:
        return np.cumsum(self.explained_variance_ratio)

    def spanned_variance_ratio(self) -> np.ndarray:
        """The explained variance ratios of the directions the centred rows can span, for plots: at most t' − 1
        (the t'-th is zero by construction; a float64 rounding of it, ~1e-17, is not a component), and for the
        randomized method only those it computed."""
        evr = self.explained_variance_ratio[: max(1, len(self.explained_variance_ratio) - 1)]
        return evr[~np.isnan(evr)]

    @property
    def digest(self) -> str | None:
        """``"sha256-128:<hex>"`` of the whole basis (``"blake2b-128:<hex>"`` before 2026-11-28), recorded by the
        extraction (None: an older subspace)."""
        return self.attrs.get("basis_digest")

    def to_numpy(self) -> np.ndarray:
        """The whole basis as an (n, d) float32 array in parameter order (only when it fits in memory),
        checked: see :meth:`read` (which gives the rows in the store's column order)."""
        stored = self.read()[0]  # (n_columns, d)
        return stored if self.columns.is_identity else np.ascontiguousarray(self.columns.to_global(stored.T).T)

    def read(self, out: np.ndarray | None = None,
             sink: "Callable[[int, np.ndarray], None] | None" = None) -> tuple[np.ndarray | None, str]:
        """Read the whole basis into ``out`` (or a new (n, d) float32 array); returns it and its digest.
        ``sink``: instead, ``sink(r0, rows)`` is called with each block of rows (k, d) as it is read (and None
        returned for the array); the same checks apply, after the last block.

        Never returns a partly written or replaced basis: the digest of what was read must be the one the
        extraction recorded, the subspace must still be this extraction afterwards (else
        :class:`SubspaceChangedError`: an ``extract --overwrite`` or ``--follow`` replaced it meanwhile; read
        it again through :func:`open_subspace`), and a subspace without a recorded digest must be finite.
        """
        n, d = self.basis.shape
        if sink is None:
            out = np.empty((n, d), np.float32) if out is None else out
        digest, finite = BasisDigest.like(self.digest), True
        rows = block_rows((n, d), int(self.basis.chunks[0]))
        scratch = np.empty((min(rows, n), d), np.float32) if sink is not None else None
        for r0 in range(0, n, rows):
            block = out[r0:r0 + rows] if sink is None else scratch[:min(rows, n - r0)]
            block[...] = self.stored_rows(r0, r0 + rows)
            digest.update(block)
            finite = finite and bool(np.isfinite(block).all())
            if sink is not None:
                sink(r0, block)
        self.verify(digest.hexdigest(), finite)
        return out if sink is None else None, digest.hexdigest()

    def stored_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of P as stored, (r1 - r0, d) float32, unchecked against the digest; a chunk that does
        not decode (cut short, or not the array's format) is :class:`CorruptSnapshotError` with what to do, or
        :class:`SubspaceChangedError` when the subspace was replaced meanwhile."""
        try:
            return self.basis[r0:r1, :]
        except (ValueError, RuntimeError, TypeError, IndexError, ArithmeticError) as exc:  # (not OSError: a
            self.check_unchanged()  # denied read or an object store's throttling is no damage, raised as it is)
            raise CorruptSnapshotError(
                f"the basis of subspace {self.name!r} in {self.path} does not decode in rows {r0}..{r1 - 1} ({exc}): "
                f"its files are damaged. Extract it again: `{self.extract_command()}`") from None

    @property
    def columns(self) -> ColumnMap:
        """Where each element of the global parameter vector sits among P's stored rows: the store's
        column map (rank-major for a store recorded sharded), the identity for stores without one."""
        found = getattr(self.store, "columns", None) if self.store is not None else None
        return found if found is not None else ColumnMap.identity(self.n_params)

    def read_rows(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[lo, hi)`` of P in the *global* parameter order, (hi - lo, d) float32 (into ``out``).

        The one way to read P's rows by parameter: the rows come from the stored ranges
        :meth:`ColumnMap.stored_ranges` gives, concatenated, read about 8 MiB at a time. Unchecked: use
        :meth:`read_ranges` (or :meth:`read` for the whole basis in stored order) for a checked read.
        """
        columns = self.columns
        if not 0 <= lo <= hi <= columns.n:
            raise InvalidArgumentError(f"rows [{lo}, {hi}) are outside the {columns.n} parameters of subspace {self.name!r}")
        d = self.dim
        out = np.empty((hi - lo, d), np.float32) if out is None else out
        if out.shape != (hi - lo, d):
            raise InvalidArgumentError(f"out has shape {out.shape}, rows [{lo}, {hi}) need {(hi - lo, d)}")
        rows, pos = block_rows((self.n_columns, d), int(self.basis.chunks[0])), 0
        for s0, s1 in columns.stored_ranges(lo, hi):
            for a in range(s0, s1, rows):
                b = min(s1, a + rows)
                out[pos:pos + b - a] = self.stored_rows(a, b)
                pos += b - a
        return out

    def read_ranges(self, ranges: "list[tuple[int, int]] | tuple[tuple[int, int], ...]") -> np.ndarray:
        """The rows of P of each global range ``(lo, hi)`` in turn, stacked: (Σ (hi - lo), d) float32, checked.

        For a part of P (one rank's rows of a sharded model) the whole-basis digest cannot be checked without
        reading all of P, so this read is checked as one of a subspace written before digests is: the
        subspace's attributes must be this extraction's before and after the read (else
        :class:`SubspaceChangedError`: it was replaced meanwhile), and the rows must be finite (else
        :class:`CorruptSnapshotError`; a chunk missing on disk reads as NaN, the basis's fill value). A
        chunk damaged into other finite values can go unnoticed here: :meth:`read` (whole P) would find it.
        """
        self.check_unchanged()
        total = sum(hi - lo for lo, hi in ranges)
        out = np.empty((total, self.dim), np.float32)  # (n_local, d)
        pos, finite = 0, True
        try:
            for lo, hi in ranges:
                block = self.read_rows(lo, hi, out[pos:pos + hi - lo])
                finite = finite and bool(np.isfinite(block).all())
                pos += hi - lo
        except (KeyError, FileNotFoundError):  # its files went with a subspace replaced meanwhile
            self.check_unchanged()
            raise
        self.check_unchanged()
        if not finite:
            raise CorruptSnapshotError(
                f"the basis of subspace {self.name!r} in {self.path} holds NaN or Inf in the rows read: its files "
                f"are damaged. Extract it again: `{self.extract_command()}`")
        return out

    def current_attrs(self) -> dict | None:
        """The subspace's attributes as stored now (None when it is gone)."""
        store = self.store if self.store is not None else TrajectoryStore.open(self.path, "r")
        try:
            return store.group[f"{SUBSPACES}/{self.name}"].attrs.asdict()
        except (KeyError, FileNotFoundError):
            return None

    def check_unchanged(self) -> None:
        """Raise :class:`SubspaceChangedError` when the stored subspace is no longer this extraction."""
        now = self.current_attrs()
        if now is None or not now.get("complete") or identity(now) != identity(self.attrs):
            raise SubspaceChangedError(
                f"subspace {self.name!r} of {self.path} was replaced or deleted while it was being read (an "
                "`extract --overwrite` or `extract --follow` rewrote it); open it again (Basis.from_store and "
                "open_subspace retry by themselves) once that extraction has finished")

    def verify(self, digest: str, finite: bool) -> None:
        """Check a whole read of the basis: ``digest`` of what was read, ``finite`` whether it had no NaN/Inf.

        Raises :class:`SubspaceChangedError` when the subspace changed meanwhile, and
        :class:`CorruptSnapshotError` when it did not but the data disagrees with its digest (or, without
        a digest, holds NaN/Inf): damaged on disk.
        """
        if self.digest == digest and finite:
            return
        self.check_unchanged()  # without a digest, this re-read of the attributes is what ties P to them
        if self.digest is None and finite:
            return
        what = (f"does not match the digest its extraction recorded ({self.digest})" if self.digest is not None
                else "holds NaN or Inf")
        raise CorruptSnapshotError(
            f"the basis of subspace {self.name!r} in {self.path} {what}: its files are damaged. Extract it again: "
            f"`{self.extract_command()}`")

    def extract_command(self) -> str:
        """The ``trajstore extract ... --overwrite`` command that extracts this subspace again with the settings
        it was extracted with (dimension or variance, snapshot selection, sampling, method), over the snapshots
        the store holds by then."""
        import shlex

        attrs = self.attrs
        args = ["trajstore", "extract", self.path]
        try:
            if attrs.get("variance_requested") is not None:
                args += ["--variance", repr(float(attrs["variance_requested"]))]  # every digit: 0.9999999 is not 1
            else:
                args += ["--dim", str(int(attrs.get("dim_requested") or self.dim))]
            chosen = attrs.get("snapshots_requested")
            if isinstance(chosen, dict) and chosen.get("slice"):
                start, stop, step = ("" if v is None else str(int(v)) for v in chosen["slice"])
                args += ["--snapshots", f"{start}:{stop}" + (f":{step}" if step else "")]  # "2:" stays a slice
            elif isinstance(chosen, list):
                args += ["--snapshots", ",".join(str(int(i)) for i in chosen)]
            sampling = attrs.get("sampling") or {}
            args += ["--window", str(int(sampling["window"]))] if sampling.get("window") else []
            args += ["--smooth", repr(float(sampling["smooth"]))] if sampling.get("smooth") is not None else []
            args += ["--method", str(attrs["method"])] if attrs.get("method") not in (None, "gram") else []
            args += ["--basis-precision", "float32"] if attrs.get("basis_precision") == "float32" else []
        except (TypeError, ValueError, AttributeError, KeyError):  # damaged attributes: the settings are unknown
            args = ["trajstore", "extract", self.path, "--dim", "D"]
        return shlex.join(args + ["--name", self.name, "--overwrite"])

    def summary(self) -> dict:
        """A JSON-friendly description."""
        return {
            "path": self.path, "name": self.name, "dim": self.dim, "n_params": self.n_params,
            "snapshots": self.snapshots, "method": self.method,
            "orthonormality_error": self.orthonormality_error,
            "singular_values": self.singular_values.tolist(),
            "explained_variance_ratio": [None if r != r else r for r in self.explained_variance_ratio.tolist()],
            "sampling": self.attrs.get("sampling"),
            "explained_variance": float(self.explained_variance_ratio[: self.dim].sum()),
            "seconds": self.attrs.get("seconds"),
        }


def _open_store(path: "str | os.PathLike") -> TrajectoryStore:
    """The store at ``path``, read-only; a ``trajstore train`` run directory is named as such, with its store."""
    try:
        return TrajectoryStore.open(path, "r")
    except NotAStoreError:
        inner = os.path.join(os.fspath(path), "trajectory.zarr")
        if os.path.isdir(inner):
            raise NotAStoreError(f"{path} is a `trajstore train` run directory, not a store: its store is {inner}; "
                                 "pass that path") from None
        raise


def open_subspace(path: "str | os.PathLike | TrajectoryStore", name: str = "default") -> Subspace:
    """Read back a subspace written by :func:`pipeline.extract_subspace`.

    A subspace deleted or replaced while it is opened (``extract --overwrite`` / ``--follow``) is opened
    again, a few times; :class:`SubspaceChangedError` when it keeps changing. Read the basis through
    :meth:`Subspace.read` / :meth:`Subspace.to_numpy` (checked against the extraction's digest);
    ``basis`` and ``mean`` are the raw zarr arrays.
    """
    store = path if isinstance(path, TrajectoryStore) else _open_store(path)
    seen = False  # listed (or complete) on an earlier try: going missing now means it is being replaced
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(0.05 * 2 ** (attempt - 1))
        sub, seen = _open_once(store, name, seen)
        if sub is not None:
            return sub
    raise SubspaceChangedError(
        f"subspace {name!r} of {store.path} was replaced or deleted while it was being opened, {ATTEMPTS} times "
        "in a row: an extraction (`extract --overwrite` or `extract --follow`) is rewriting it now. Open it again "
        "once that extraction has finished")


def _open_once(store: TrajectoryStore, name: str, seen: bool) -> tuple[Subspace | None, bool]:
    """(the subspace, True), or (None, True) when it changed while being opened; raises when it is
    missing or unfinished, unless ``seen`` (then it is being replaced: (None, True))."""
    group = store.group
    key = f"{SUBSPACES}/{name}"
    try:
        available = sorted(group[SUBSPACES].group_keys()) if SUBSPACES in group else []
    except (KeyError, FileNotFoundError):  # a folder renamed away while it was listed
        return None, True
    if name not in available:
        if seen:
            return None, True
        raise SubspaceNotFoundError(
            f"no subspace {name!r} in {store.path}; available: {available or 'none'}. "
            f"Run `trajstore extract {store.path} --dim D --name {name}`")
    try:
        sub = group[key]
        attrs = sub.attrs.asdict()
        if not attrs.get("complete"):
            if seen:
                return None, True
            raise SubspaceNotFoundError(
                f"subspace {name!r} in {store.path} is unfinished (an extraction is writing it now, or was "
                "interrupted); wait for it, or rerun the same extract command to resume it")
        found = Subspace(store.path, name, sub["basis"], sub["mean"], sub["singular_values"][:],
                         sub["explained_variance_ratio"][:], sub["eigenvectors"][:], attrs, store)
    except SubspaceNotFoundError:  # a KeyError too: an answer, not a sign of a replacement
        raise
    except (KeyError, FileNotFoundError):  # deleted between the listing and the reads
        return None, True
    now = found.current_attrs()
    if now is None or not now.get("complete") or identity(now) != identity(attrs):
        return None, True  # the spectrum just read may be the next extraction's
    return found, True


def list_subspaces(store: TrajectoryStore) -> list[str]:
    """The subspaces' names (not the ones ``extract --follow`` stages: names starting ``__``)."""
    group = store.group
    return sorted(k for k in group[SUBSPACES].group_keys() if not k.startswith("__")) if SUBSPACES in group else []
