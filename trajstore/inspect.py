"""Store summaries (``info``) and integrity checks (``verify``) behind the CLI."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import CorruptSnapshotError
from .format import NONFINITE, PARAMS, local_dir
from .format import stored_bytes
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


def verify(path: "str | os.PathLike", progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Read every committed chunk: checksums, missing chunk files, finiteness and the committed count."""
    with TrajectoryStore.open(path, "r") as store:
        t = len(store)
        report = VerifyReport(store.path, t)
        params = store.group[PARAMS]
        if params.shape[0] < t:
            report.store_problems.append(
                f"committed count {t} exceeds the params array's {params.shape[0]} rows (metadata damaged)")
            t = params.shape[0]
        allowed_nonfinite = store.group[NONFINITE][:t]
        missing = _missing_chunks(store, t)
        reader = store.reader()
        for i in range(t):
            bad = report.problems.setdefault(i, [])
            if i in missing:
                bad.append(f"chunk files missing: {', '.join(missing[i])}")
            try:
                row = reader.read_block(i, i + 1)[0]
                if not allowed_nonfinite[i] and not np.isfinite(row).all():
                    bad.append(f"{int((~np.isfinite(row)).sum())} non-finite values")
            except CorruptSnapshotError as exc:
                bad.append(f"checksum or decode failure: {exc}")
            if not bad:
                del report.problems[i]
            if progress:
                progress(i + 1, t)
        return report


def _missing_chunks(store: TrajectoryStore, t: int) -> dict[int, list[str]]:
    """Shard files that should exist for committed rows but do not (local stores)."""
    root = local_dir(store.path)
    if root is None:
        return {}
    params = store.group[PARAMS]
    per_row = -(-params.shape[1] // (params.shards or params.chunks)[1])
    missing: dict[int, list[str]] = {}
    for i in range(t):
        for j in range(per_row):
            key = f"{PARAMS}/c/{i}/{j}"
            if not (root / key).exists():
                missing.setdefault(i, []).append(key)
    return missing
