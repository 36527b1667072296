"""Store summaries (``info``) and integrity checks (``verify``) behind the CLI."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import CorruptSnapshotError
from .format import BUFFERS, METRICS, NONFINITE, PARAMS, REFERENCE, ROW_ARRAYS, stored_bytes
from . import reader as _reader
from .store import TrajectoryStore


def info(path: "str | os.PathLike") -> dict:
    """Snapshots, parameters, steps, stored/raw bytes, compression ratio, codec and format of a store."""
    with TrajectoryStore.open(path, "r") as store:
        t, n = len(store), store.n_params
        raw = t * n * store.dtype.itemsize
        size = stored_bytes(store.path)
        steps = store.steps
        meta = store.attrs
        return {
            "path": store.path,
            "snapshots": t,
            "parameters": n,
            "tensors": len(store.layout),
            "first_step": int(steps[0]) if t else None,
            "last_step": int(steps[-1]) if t else None,
            "steps": steps.tolist(),
            "stored_bytes": size,
            "raw_bytes": raw,
            "compression_ratio": raw / size if size and raw else None,
            "codec": meta["codec"]["spec"],
            "lossless": meta["codec"]["lossless"],
            "error_bound": meta["codec"]["error_bound"],
            "dtype": meta["dtype"],
            "format_version": meta["format_version"],
            "created": meta.get("created"),
            "buffers": store.buffer_layout.n if store.buffer_layout else 0,
            "metrics": store.metric_names(),
            "subspaces": sorted(store.group["subspaces"].group_keys()) if "subspaces" in store.group else [],
            "metadata": meta.get("metadata", {}),
        }


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`: ``problems`` maps snapshot index to what is wrong with it."""

    path: str
    snapshots: int
    problems: dict[int, list[str]] = field(default_factory=dict)
    store_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.store_problems

    def to_json(self) -> dict:
        return {"path": self.path, "snapshots": self.snapshots, "ok": self.ok,
                "bad_snapshots": {str(k): v for k, v in sorted(self.problems.items())},
                "store_problems": self.store_problems}


def verify(path: "str | os.PathLike", progress: Callable[[int, int], None] | None = None,
           storage_options: dict | None = None) -> VerifyReport:
    """Read every committed chunk: checksums, missing shard files and chunks, finiteness, and
    whether every per-snapshot array holds the committed rows.

    Rows are read a group at a time and a column range at a time, so memory stays bounded
    (``reader.CONTEXT_BYTES``) whatever n and the codec's keyframe interval are.
    """
    with TrajectoryStore.open(path, "r", storage_options=storage_options) as store:
        t = len(store)
        report = VerifyReport(store.path, t)
        for name in _row_arrays(store):
            rows = store.group[name].shape[0]
            if rows < t:
                report.store_problems.append(
                    f"the committed count {t} exceeds the {rows} rows of '{name}' (metadata damaged); "
                    f"`trajstore repair {store.path}` truncates to the rows that exist")
            elif name != PARAMS and name != BUFFERS:
                try:
                    store._row_values(name)  # checksums and missing chunk files of the small arrays
                except CorruptSnapshotError as exc:
                    report.store_problems.append(str(exc))
        t = min([t] + [store.group[name].shape[0] for name in (PARAMS, NONFINITE)])
        if store.codec.transform == "delta" and t:
            try:
                store.group[REFERENCE][0, :1]
            except Exception as exc:  # noqa: BLE001 -- any failure here is a damaged reference
                report.store_problems.append(f"the reference snapshot every row decodes from is unreadable: {exc}")
        try:
            allowed_nonfinite = store.group[NONFINITE][:t]
        except (ValueError, RuntimeError, OSError):  # reported above as a store problem
            allowed_nonfinite = np.zeros(t, bool)
        reader = store.reader()
        group = max(1, store.codec.keyframe_interval if store.codec.transform == "xor" else 8)
        for g0 in range(0, t, group):
            g1 = min(t, g0 + group)
            try:
                bad_values = _check_rows(reader, g0, g1, store.n_params)
            except CorruptSnapshotError:
                bad_values = {}
                for i in range(g0, g1):  # find every bad row of the group, and what depends on it
                    try:
                        bad_values.update(_check_rows(reader, i, i + 1, store.n_params))
                    except CorruptSnapshotError as exc:
                        reason = (f"checksum or decode failure: {exc}" if exc.index in (None, i) else
                                  f"cannot be decoded: it is stored relative to corrupt snapshot {exc.index}")
                        report.problems.setdefault(i, []).append(reason)
            for i, count in bad_values.items():
                if count and not allowed_nonfinite[i]:
                    report.problems.setdefault(i, []).append(f"{count} non-finite values")
            if progress:
                progress(g1, t)
        return report


def _row_arrays(store: TrajectoryStore) -> list[str]:
    names = [name for name in (PARAMS, BUFFERS, *ROW_ARRAYS) if name in store.group]
    return names + [f"{METRICS}/{name}" for name in store.metric_names()]


def _check_rows(reader, r0: int, r1: int, n: int) -> dict[int, int]:
    """Non-finite counts of rows [r0, r1), read a column range at a time."""
    width = max(1, _reader.CONTEXT_BYTES // ((r1 - r0) * reader.dtype.itemsize))
    counts = dict.fromkeys(range(r0, r1), 0)
    for c0 in range(0, n, width):
        block = reader.read_block(r0, r1, c0, min(n, c0 + width))  # (r1 - r0, width)
        bad = (~np.isfinite(block)).sum(axis=1)
        for i, count in zip(range(r0, r1), bad):
            counts[i] += int(count)
    return counts
