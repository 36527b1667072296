"""ColumnMap: where each element of the global parameter vector sits among the store's columns.

A store recorded by one process (or by DDP, where one rank writes) holds the parameter vector
as it is: column j is element j. A store recorded under FSDP2 holds it rank-major: each rank
writes the elements it owns (one contiguous piece of every parameter it shards) into a range of
columns of its own, padded to whole zarr shards so that two ranks never write one shard file.

    global  [ w0(rank0) w0(rank1) | w1(rank0) w1(rank1) ]         (n,)
    stored  [ w0(rank0) w1(rank0) 0 0 | w0(rank1) w1(rank1) 0 ]    (n_columns,), zeros are padding

The Gram matrix does not depend on the column order, and padding columns are zero in every
snapshot, so extraction runs on the stored columns as they are; a basis P extracted from such a
store has its rows in the stored order too. ``read()``, ``state_dict()`` and ``Basis`` map back
to the global order with :meth:`ColumnMap.to_global` / :meth:`ColumnMap.stored_ranges`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import CorruptMetadataError


class ColumnMap:
    """Segments ``(global_lo, stored_lo, length)`` that place the global vector (n,) among the
    store's ``n_columns`` columns; columns no segment covers are zero padding."""

    def __init__(self, n: int, n_columns: int, segments: Sequence[Sequence[int]] | None = None,
                 rank_columns: Sequence[Sequence[int]] | None = None):
        self.n, self.n_columns = int(n), int(n_columns)
        segs = np.asarray(segments if segments is not None else [(0, 0, n)], dtype=np.int64).reshape(-1, 3)
        self.segments = segs[np.argsort(segs[:, 0], kind="stable")] if len(segs) else segs  # (k, 3) by global_lo
        self.rank_columns = [tuple(int(x) for x in r) for r in (rank_columns or [(0, self.n_columns)])]
        self._check()

    def _check(self) -> None:
        g, s, length = self.segments.T if len(self.segments) else (np.zeros(0, np.int64),) * 3
        ends = np.concatenate([[0], g + length])[:-1]
        stored = np.sort(np.stack([s, s + length], 1), axis=0) if len(s) else np.zeros((0, 2), np.int64)
        ok = (self.n_columns >= self.n and (length > 0).all() and (g == ends).all() and int((g + length)[-1]) == self.n
              and (s >= 0).all() and (s + length <= self.n_columns).all()
              and (stored[1:, 0] >= stored[:-1, 1]).all()) if len(g) else self.n == 0
        ranks = np.asarray(self.rank_columns, np.int64).reshape(-1, 2)
        ok = ok and bool((ranks[:, 0] <= ranks[:, 1]).all() and (ranks[1:, 0] >= ranks[:-1, 1]).all()
                         and ranks[0, 0] >= 0 and ranks[-1, 1] <= self.n_columns)
        if ok and len(g):  # every segment inside one rank's range: where that rank writes it
            owner = np.searchsorted(ranks[:, 0], s, side="right") - 1
            ok = bool((owner >= 0).all() and (s + length <= ranks[np.maximum(owner, 0), 1]).all())
        if not ok:
            raise CorruptMetadataError(f"column map of {self.n} parameters in {self.n_columns} columns is "
                                       "inconsistent (segments or rank ranges overlap, leave gaps or run past "
                                       "the columns)")

    def check_aligned(self, shard: int) -> None:
        """Raise unless every rank's range starts on a shard boundary (no two ranks write one shard file)."""
        if any(lo % shard for lo, _ in self.rank_columns):
            raise CorruptMetadataError(f"the column map's rank ranges {self.rank_columns} do not start on the "
                                       f"params array's shard boundaries (every {shard} columns)")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def identity(cls, n: int) -> "ColumnMap":
        """The map of a store recorded unsharded: column j holds element j."""
        return cls(n, n)

    @classmethod
    def rank_major(cls, n: int, pieces: Sequence[Sequence[tuple[int, int]]], align: int) -> "ColumnMap":
        """Rank ``r`` stores ``pieces[r]`` (``(global_lo, length)`` in the order it writes them) in
        one range of columns starting at a multiple of ``align`` (the zarr shard width)."""
        segments, ranks, base = [], [], 0
        for rank_pieces in pieces:
            col = base
            for g, length in rank_pieces:
                if length:
                    segments.append((g, col, length))
                    col += length
            ranks.append((base, col))
            base = col if col == base else -(-col // align) * align
        n_columns = ranks[-1][1] if ranks else 0
        ranks = [(lo, min(hi, n_columns)) for lo, hi in ranks]
        return cls(n, max(n_columns, 1), segments, ranks)

    @property
    def is_identity(self) -> bool:
        return self.n == self.n_columns and len(self.segments) == 1 and int(self.segments[0, 1]) == 0

    # -- mapping ------------------------------------------------------------------------
    def to_global(self, stored: np.ndarray) -> np.ndarray:
        """Rows in stored order (..., n_columns) -> the same rows in global order (..., n)."""
        if self.is_identity:
            return stored
        out = np.empty((*stored.shape[:-1], self.n), stored.dtype)
        for g, s, length in self.segments:
            out[..., g:g + length] = stored[..., s:s + length]
        return out

    def to_stored(self, flat: np.ndarray) -> np.ndarray:
        """A global vector (..., n) in stored order (..., n_columns), zero in the padding."""
        if self.is_identity:
            return flat
        out = np.zeros((*flat.shape[:-1], self.n_columns), flat.dtype)
        for g, s, length in self.segments:
            out[..., s:s + length] = flat[..., g:g + length]
        return out

    def stored_ranges(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Stored column ranges whose concatenation is global elements ``[lo, hi)``, in order."""
        if self.is_identity:
            return [(lo, hi)] if hi > lo else []
        out = []
        first = max(0, int(np.searchsorted(self.segments[:, 0], lo, side="right")) - 1)
        for g, s, length in self.segments[first:]:
            if g >= hi:
                break
            a, b = max(lo, g), min(hi, g + length)
            if b > a:
                out.append((int(s + a - g), int(s + b - g)))
        return out

    # -- serialisation ------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"n_columns": self.n_columns, "segments": self.segments.tolist(), "ranks": [list(r) for r in self.rank_columns]}

    @classmethod
    def from_json(cls, n: int, data: dict | None) -> "ColumnMap":
        """The map in a store's attributes; stores without one are unsharded (the identity)."""
        if data is None:
            return cls.identity(n)
        try:
            return cls(n, int(data["n_columns"]), data["segments"], data.get("ranks"))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptMetadataError(f"the store's column map is unreadable ({type(exc).__name__}: {exc})") from None

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ColumnMap) and self.n == other.n and self.n_columns == other.n_columns
                and np.array_equal(self.segments, other.segments) and self.rank_columns == other.rank_columns)

    def __repr__(self) -> str:
        return f"ColumnMap(n={self.n}, n_columns={self.n_columns}, {len(self.segments)} segments)"
