"""The shifted float64 Gram matrix of a store's snapshots, out of core, cached and incremental.

G = D Dᵀ with D = X - x_0 (X the (t, n) committed snapshots, x_0 the store's first one).
Each column block of X is one task: it decodes (t, C) float32, shifts and widens to float64
in column sub-blocks (never a float32 product), and adds D_b D_bᵀ. Per-block partial sums
are written to ``gram/update/partial`` so a killed pass resumes; the cache ``gram/value``
then holds G for the first ``rows`` snapshots. New snapshots only add rows and columns:
the old x old block is never recomputed (the cross terms need the old rows once).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import zarr

from trajstore import TrajectoryStore
from trajstore.errors import NonFiniteError
from trajstore.format import NONFINITE
from trajstore.reader import RowReader

from .blocks import (SUB_BLOCK, block_columns, check_finite, column_blocks, read_rows, run_resumable,  # noqa: F401
                     scratch, wide_blocks, widen_shifted)
from .compute import Progress, StopFlag

GRAM = "gram"


@dataclass
class GramUpdateStats:
    """What one :func:`update_gram` call did (for tests, logs and benchmarks)."""

    old_rows: int
    new_rows: int
    blocks_computed: int
    blocks_resumed: int
    products: int  # entries of G computed from data (old x old are never recomputed)
    seconds: float


def nonfinite_rows(store: TrajectoryStore, rows: int | None = None) -> list[int]:
    """Snapshots among the first ``rows`` committed ones recorded with NaN or Inf
    (``append(..., allow_nonfinite=True)``)."""
    rows = len(store) if rows is None else rows
    return [int(i) for i in np.flatnonzero(store._row_values(NONFINITE)[:rows])]


def shift_row(store: TrajectoryStore, rows: int | None = None) -> int:
    """The row the Gram is shifted by: the first finite snapshot (``rows`` when there is none)."""
    rows = len(store) if rows is None else rows
    excluded = set(nonfinite_rows(store, rows))
    return next(i for i in range(rows + 1) if i not in excluded)


def _partial_gram(reader: RowReader, c0: int, c1: int, first_new: int, t: int, shift: int,
                  excluded: tuple[int, ...] = ()) -> np.ndarray:
    """(t, t - first_new) float64: D[:, c0:c1] D[first_new:, c0:c1]ᵀ for one column block.

    D = X − X[shift]. Rows in ``excluded`` (recorded non-finite with ``allow_nonfinite``) are
    replaced by the shift row, so they contribute zeros: their entries of G are marked NaN later
    and every other entry stays exact, so those snapshots can simply be left out of an extraction.
    """
    x = read_rows(reader, range(t), c0, c1)  # (t, C) float32
    if excluded:
        x[list(excluded)] = x[shift]
    out = np.zeros((t, t - first_new), np.float64)
    for _, d in wide_blocks(x, shift=shift):  # (t, S) float64
        if first_new == 0:
            out += d @ d.T  # numpy dispatches a @ a.T to syrk: half the flops
        else:
            out += d @ d[first_new:].T
    check_finite(out, x, reader.path, c0, c1)
    return out


def _gram_task(reader: RowReader, store_path: str, storage_options, first_new: int, t: int, shift: int,
               excluded: tuple[int, ...], block: int, c0: int, c1: int) -> int:
    partial = _partial_gram(reader, c0, c1, first_new, t, shift, excluded)
    group = zarr.open_group(_zstore(store_path, storage_options), mode="r+")
    group[f"{GRAM}/update/partial"][block] = partial
    group[f"{GRAM}/update/done"][block] = True
    return block


def _zstore(path: str, storage_options):
    from trajstore.format import zarr_store

    return zarr_store(path, False, storage_options)


def cached_rows(store: TrajectoryStore, root: zarr.Group | None = None) -> int:
    """How many leading snapshots the cached Gram still covers (0 when none or invalidated)."""
    root = store.group if root is None else root
    if GRAM not in root or "value" not in root[GRAM]:
        return 0
    attrs = root[GRAM].attrs.asdict()
    rows = int(attrs.get("rows", 0))
    if attrs.get("store_created") != store.attrs.get("created"):
        return 0  # the store was recreated under the same path
    if attrs.get("shift_row", 0) != shift_row(store, min(rows, len(store))):
        return 0  # shifted by another row (the first snapshots were replaced)
    truncations = store.attrs.get("truncations", [])
    for length in truncations[int(attrs.get("truncations_seen", 0)):]:
        rows = min(rows, int(length))  # rows past a truncation were replaced
    return min(rows, len(store))


def update_gram(store: TrajectoryStore, root: zarr.Group, *, scheduler: object = None,
                block_size: int | None = None, progress: Progress | None = None,
                stop: StopFlag | None = None) -> tuple[np.ndarray, GramUpdateStats]:
    """Bring the cached shifted Gram up to the store's committed snapshots; return it (t, t) float64.

    ``root`` is the writable root group from ``store.derived()``. An update interrupted while
    the store kept growing is first finished over the rows it started with (its finished blocks
    are kept), then extended to the rows committed now.
    """
    began = time.perf_counter()
    t = len(store)
    m = cached_rows(store, root)
    gram = root.require_group(GRAM)
    width = block_columns(store, block_size)
    blocks = column_blocks(store.n_columns, width)
    target = _unfinished_target(gram, m, t, width, len(blocks), store)
    if target is not None and target < t:
        _, first = _update_to(store, root, gram, m, target, blocks, width, scheduler, progress, stop, began)
        _, second = _update_to(store, root, gram, target, t, blocks, width, scheduler, progress, stop, began)
        return gram["value"][:t, :t], GramUpdateStats(
            m, t - m, first.blocks_computed + second.blocks_computed, first.blocks_resumed,
            first.products + second.products, time.perf_counter() - began)
    return _update_to(store, root, gram, m, t, blocks, width, scheduler, progress, stop, began)


def _update_to(store, root, gram, m, t, blocks, width, scheduler, progress, stop, began):
    """Extend the cached Gram from ``m`` to ``t`` rows."""
    if m == t and "value" in gram:
        g = gram["value"][:t, :t]
        return g, GramUpdateStats(m, 0, 0, 0, 0, time.perf_counter() - began)
    excluded = tuple(nonfinite_rows(store, t))
    shift = shift_row(store, t)
    if shift >= t:
        raise NonFiniteError(f"every snapshot of {store.path} holds NaN or Inf: there is nothing to extract")
    update = _prepare_update(gram, m, t, width, len(blocks), shift, excluded, _store_state(store))
    task = functools.partial(_gram_task, store.reader(), store.path, store.storage_options, m, t, shift, excluded)
    resumed = run_resumable(blocks, update["done"][:], task, scheduler, progress, stop)

    cross = np.zeros((t, t - m), np.float64)
    partial = update["partial"]
    for b in range(len(blocks)):  # fixed order: a resumed pass sums exactly like an uninterrupted one
        cross += partial[b]
    g = np.zeros((t, t), np.float64)
    if m:
        g[:m, :m] = gram["value"][:m, :m]
    g[:, m:] = cross
    g[m:, :] = cross.T
    g[list(excluded), :] = np.nan  # non-finite snapshots: never part of an extraction
    g[:, list(excluded)] = np.nan
    _write_value(gram, g, store, shift)
    del gram["update"]
    stats = GramUpdateStats(m, t - m, len(blocks) - resumed, resumed, t * t - m * m, time.perf_counter() - began)
    return g, stats


def _unfinished_target(gram: zarr.Group, m: int, t: int, width: int, nblocks: int,
                       store: TrajectoryStore) -> int | None:
    """The row count an interrupted update was computing, when it can still be finished."""
    if "update" not in gram:
        return None
    attrs = gram["update"].attrs.asdict()
    to_rows = int(attrs.get("to_rows", -1))
    same = (attrs.get("from_rows") == m and m < to_rows <= t and attrs.get("block_columns") == width
            and attrs.get("blocks") == nblocks and attrs.get("shift_row") == shift_row(store, to_rows)
            and attrs.get("excluded") == nonfinite_rows(store, to_rows)
            and attrs.get("store_state") == _store_state(store))
    return to_rows if same else None


def _store_state(store: TrajectoryStore) -> list:
    """Which incarnation of the rows an update summed: a truncation or a re-creation replaces rows,
    and partial sums over replaced rows must never be resumed."""
    return [store.attrs.get("created"), len(store.attrs.get("truncations", []))]


def _prepare_update(gram: zarr.Group, m: int, t: int, width: int, nblocks: int, shift: int,
                    excluded: tuple[int, ...], store_state: list) -> zarr.Group:
    """The in-progress update group: reused when it matches (resume), else started afresh."""
    want = {"from_rows": m, "to_rows": t, "block_columns": width, "blocks": nblocks, "shift_row": shift,
            "excluded": list(excluded), "store_state": store_state}
    if "update" in gram:
        update = gram["update"]
        if {k: update.attrs.get(k) for k in want} == want:
            return update
        del gram["update"]
    update = gram.create_group("update")
    update.create_array("partial", shape=(nblocks, t, t - m), chunks=(1, t, t - m), dtype="float64",
                        fill_value=0.0, config={"write_empty_chunks": True})
    update.create_array("done", shape=(nblocks,), chunks=(1,), dtype="bool", fill_value=False)
    update.attrs.update(want)
    return update


def _write_value(gram: zarr.Group, g: np.ndarray, store: TrajectoryStore, shift: int) -> None:
    t = g.shape[0]
    if "value" in gram:
        value = gram["value"]
        if value.shape[0] < t:
            value.resize((max(t, 2 * value.shape[0]),) * 2)
    else:
        cap = max(t, 16)
        value = gram.create_array("value", shape=(cap, cap), chunks=(256, 256), dtype="float64", fill_value=0.0)
    value[:t, :t] = g
    gram.attrs.update({"rows": t, "truncations_seen": len(store.attrs.get("truncations", [])),
                       "store_created": store.attrs.get("created"), "shift": f"snapshot {shift}",
                       "shift_row": shift,
                       "dtype": "float64", "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
