"""Store maintenance: ``repair`` (back to a consistent committed prefix) and ``gc`` (orphans, stale caches).

Both hold the writer lock (mode ``"a"``) for their whole run, so they never race a live writer,
and never touch a row below ``committed`` except by the store's own truncate path; a dry run reads
without it and writes nothing. ``gc`` lives in :mod:`trajstore.collect` (re-exported here).

``repair --drop-bad-only`` builds the compacted store at ``RUN.repair-tmp`` through the public
API, checks it (every check of the scan, plus each row's decoded bytes against the original's),
marks it with ``.trajstore.repair-new`` and swaps it in with one atomic ``renameat2(RENAME_EXCHANGE)``.
At every instant ``RUN`` is a whole store, old or new; a leftover is told apart by the marker:

* ``RUN.repair-tmp`` holding the marker, or with no marker anywhere: never swapped in (junk);
* ``RUN`` holding the marker (``RUN.repair-tmp`` / ``RUN.repair-old``: the pre-repair store): swapped.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ._scan import (Files, Scan, check_dry_run_current, derived_locked, digest, open_for, open_locked, row_arrays,
                    scan)
from .collect import MARKER, OLD_SUFFIX, TMP_SUFFIX, GcItem, GcReport, gc, repair_leftovers
from .errors import LocalPathRequiredError, RepairError
from .format import (BUFFERS, EPOCH, GRAM, METRICS, NONFINITE, PARAMS, ROW_ARRAYS,
                     STEP, SUBSPACES, WALL_TIME, local_dir, normalize)
from ._creating import create_files
from .layout import BF16, bf16_to_float32, float32_to_bf16_bits
from .store import TrajectoryStore

__all__ = ["repair", "gc", "RepairReport", "GcReport", "GcItem", "SnapshotNote"]

# -- repair ---------------------------------------------------------------------------------
@dataclass
class SnapshotNote:
    """One snapshot in a repair plan: dropped (``bad`` or good-after-bad) or moved to ``new_index``."""

    index: int
    step: int | None
    bad: bool
    reasons: list[str] = field(default_factory=list)
    new_index: int | None = None


@dataclass
class RepairReport:
    """What :func:`repair` found and did (or, with ``dry_run``, would do)."""

    path: str
    action: str  # "none" | "truncate" | "compact"
    dry_run: bool
    committed_before: int = 0
    committed_after: int = 0
    ok: bool = False  # the store is consistent now (dry run: already was)
    dropped: list[SnapshotNote] = field(default_factory=list)
    moved: list[SnapshotNote] = field(default_factory=list)
    store_problems: list[str] = field(default_factory=list)
    derived_discarded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    leftovers: list[GcItem] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def repair(path: "str | os.PathLike", *, dry_run: bool = False, drop_bad_only: bool = False,
           storage_options: dict | None = None, break_lock: bool = False,
           progress: Callable[[int, int], None] | None = None) -> RepairReport:
    """Bring a store to its largest consistent committed prefix: ``committed = k``, k the first bad
    snapshot, through :meth:`TrajectoryStore.truncate` (recorded in ``truncations``). Every dropped
    snapshot is reported with its step and why, good ones after k included. ``drop_bad_only``
    instead removes only the bad snapshots, moving the later good ones down (local stores only;
    subspaces and the Gram cache are not carried over). ``dry_run`` changes nothing. ``break_lock``
    takes over an object store's lock left by a killed writer."""
    path = normalize(path)
    store, notes = open_for(path, storage_options, break_lock, dry_run)
    report = RepairReport(path, "none", dry_run, notes=notes)
    try:
        report.leftovers = repair_leftovers(path, remove=not dry_run)
        found = scan(store, Files(path, storage_options), progress)
        if dry_run:
            check_dry_run_current(store, storage_options)
        t, k = found.committed, found.first_bad
        report.committed_before, report.committed_after, report.store_problems = t, t, found.store_problems
        if k == t:
            report.ok = True
            return report
        step = (lambda i: int(found.steps[i]) if found.steps[i] >= 0 else None)
        keep = [i for i in range(t) if i not in found.problems]
        position = {i: j for j, i in enumerate(keep)}
        compact = bool(drop_bad_only and keep and keep[-1] > k)
        report.action = "compact" if compact else "truncate"
        for i in range(k, t):
            if i in found.problems:
                report.dropped.append(SnapshotNote(i, step(i), True, found.problems[i]))
            elif compact:
                report.moved.append(SnapshotNote(i, step(i), False, [], position[i]))
            else:
                report.dropped.append(SnapshotNote(i, step(i), False, [
                    f"good, but after the first bad snapshot {k}: dropped to keep a dense prefix "
                    "(--drop-bad-only keeps it; its files stay on disk until gc or the next append)"]))
        report.committed_after = len(keep) if compact else k
        subspaces = sorted(store.group[SUBSPACES].group_keys()) if SUBSPACES in store.group else []
        if compact:
            if store._meta.get("optimizer_state"):
                raise RepairError(
                    f"--drop-bad-only cannot carry {path}'s optimizer state into the rebuilt store yet, and would lose "
                    "it; rerun without --drop-bad-only to truncate to the first bad snapshot (the state of the "
                    "snapshots kept stays), or copy the good snapshots out first (`trajstore export`)")
            if local_dir(path) is None:
                raise LocalPathRequiredError(
                    f"--drop-bad-only rebuilds {path} next to itself and swaps directories, which needs a local "
                    "path; rerun without it to truncate to the first bad snapshot, or copy the store to local disk")
            report.derived_discarded = [f"{SUBSPACES}/{s}" for s in subspaces] + [GRAM] * (GRAM in store.group)
        else:
            for s in subspaces:
                used = store.group[f"{SUBSPACES}/{s}"].attrs.get("snapshots") or []
                if used and max(used) >= k:
                    report.notes.append(f"subspace {s!r} was extracted from dropped snapshots; it no longer matches "
                                        f"the store (remove it with `trajstore gc {path} --subspace {s}`)")
        if not dry_run:
            if compact:
                with derived_locked(store, report.notes):
                    _compact(store, keep, found)
            else:
                store.truncate(k)
            report.ok = True
        return report
    finally:
        store.close()


def _create_like(store: TrajectoryStore, target: Path) -> TrajectoryStore:
    """An empty store with the same layout, buffers, codec, chunks, shards and metadata."""
    params = store.group[PARAMS]
    source: object = store.layout
    if store.buffer_layout is not None:  # the exact split (a float buffer, tied aliases), not a guess by name
        from ._template import LayoutTemplate

        source = LayoutTemplate(store.layout, store.buffer_layout)
    settings = dict(codec=store.codec, metadata=store.metadata, buffers=store.buffer_layout is not None,
                    chunk_size=int(params.chunks[1]), shard_size=int((params.shards or params.chunks)[1]))
    # the store's own storage dtype: a bf16 model recorded widened to float32 by an older trajstore stays
    # float32 (and its format version), never silently upgraded to native bf16 (format 3)
    group, meta, lock = create_files(
        str(target), source, overwrite=False, storage_options=None, durable=False, break_lock=False,
        columns=store.columns, values=store.values, **settings)
    try:
        new = TrajectoryStore(str(target), group, meta, "a", lock, None)
    except BaseException:
        lock.release()
        raise
    if (new.layout != store.layout or new.buffer_layout != store.buffer_layout or new.values != store.values
            or new.dtype != store.dtype or new.columns != store.columns
            or new._meta["format_version"] > store._meta.get("format_version", 1)):
        new.close()
        raise RepairError(f"cannot rebuild {store.path} with the same parameter/buffer layout; it is unchanged")
    # the same run, compacted: trainer checkpoints that carry its run id still resume into it ("created"
    # stays new: the rows are renumbered, and readers and caches key on it)
    new._commit_meta({**new._meta, "run_id": store.run_id})
    return new


def _good_rows(store: TrajectoryStore, keep: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """The decoded rows ``keep``, in order, one at a time (memory O(n)): an xor-delta row that follows
    the previous one is its stored bits XOR that row's; any other row decodes on its own."""
    reader, preset, params = store.reader(), store.codec, store.group[PARAMS]
    last, prev = -2, np.empty(0)
    for i in keep:
        if preset.transform == "xor" and not preset.is_keyframe(i) and last == i - 1:
            stored = params[i, :]  # (n,) raw bits: uint32/uint64, or bfloat16's uint16
            if store.values == BF16:  # rows read back widened to float32: xor the bf16 bits, widen again
                row = bf16_to_float32(np.bitwise_xor(stored, float32_to_bf16_bits(prev)))
            else:
                row = np.bitwise_xor(stored, prev.view(stored.dtype)).view(store.dtype)
        else:
            row = reader.read_block(i, i + 1)[0]
        last, prev = i, row
        yield i, row


def _compact(store: TrajectoryStore, keep: list[int], found: Scan) -> None:
    """Rebuild the good rows ``keep`` at RUN.repair-tmp, check them, swap the directories atomically."""
    src = local_dir(store.path)
    tmp, old = src.with_name(src.name + TMP_SUFFIX), src.with_name(src.name + OLD_SUFFIX)
    g = store.group
    metrics = [m.removeprefix(f"{METRICS}/") for m in row_arrays(g)[len(ROW_ARRAYS):]]
    columns = {name: g[name][: len(store)][keep] for name in row_arrays(g)}  # (len(keep),) each
    new = None
    try:
        new = _create_like(store, tmp)
        for j, (i, row) in enumerate(_good_rows(store, keep)):
            if digest(row) != found.digests[i]:
                raise RepairError(f"snapshot {i} decoded differently on a second read; {store.path} is unchanged")
            source: object = store.columns.to_global(row)  # (n,) in parameter order
            if store.buffer_layout is not None:
                source = {**store.layout.unflatten(source), **store.buffer_layout.unflatten(g[BUFFERS][i, :])}
            new.append(source, step=int(columns[STEP][j]), epoch=int(columns[EPOCH][j]),
                       metrics={m: float(columns[f"{METRICS}/{m}"][j]) for m in metrics},
                       allow_nonfinite=bool(columns[NONFINITE][j]))
        new.flush()
        times = new.group[WALL_TIME].with_config({"write_empty_chunks": True})
        times[: len(keep)] = columns[WALL_TIME]  # append stamped the time of the copy
        new.close()
        check, _ = open_locked(str(tmp), None)  # held through the swap: RUN's next writer waits for us
        try:
            _check_rebuilt(check, store, keep, found, columns)
            (tmp / MARKER).write_text(json.dumps({"source": str(src), "snapshots": len(keep),
                                                  "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))
            _exchange(src, tmp)  # the commit point: RUN is the new store, RUN.repair-tmp the old one
            os.rename(tmp, old)
            (src / MARKER).unlink()
            shutil.rmtree(old, ignore_errors=True)  # still under the new store's lock: no gc races this
        finally:
            check.close()
    except BaseException:
        with contextlib.suppress(Exception):
            new.close() if new is not None else None  # idempotent
        if tmp.exists() and not (src / MARKER).exists():
            shutil.rmtree(tmp, ignore_errors=True)  # never swapped in: the original is untouched
        raise


def _check_rebuilt(new: TrajectoryStore, store: TrajectoryStore, keep: list[int], found: Scan,
                   columns: dict[str, np.ndarray]) -> None:
    """The rebuilt store passes every scan check and holds exactly the kept rows, bit for bit."""
    again = scan(new, Files(new.path, None))
    if len(new) != len(keep) or again.problems or again.store_problems:
        raise RepairError(f"the rebuilt store failed its checks ({again.store_problems or again.problems}); "
                          f"{store.path} is unchanged")
    for j, i in enumerate(keep):
        if again.digests.get(j) != found.digests[i]:
            raise RepairError(f"snapshot {i} differs after the rebuild (codec not idempotent?); {store.path} is "
                              "unchanged. Rerun without --drop-bad-only to truncate instead")
        if store.buffer_layout is not None and not np.array_equal(
                new.group[BUFFERS][j, :], store.group[BUFFERS][i, :], equal_nan=True):
            raise RepairError(f"the buffers of snapshot {i} differ after the rebuild; {store.path} is unchanged")
    for name, want in columns.items():
        have = new.group[name][: len(keep)]
        if have.tobytes() != np.asarray(want, have.dtype).tobytes():
            raise RepairError(f"{name} differs after the rebuild; {store.path} is unchanged")


def _exchange(a: Path, b: Path) -> None:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        raise LocalPathRequiredError("--drop-bad-only needs renameat2 (Linux) to swap directories atomically; "
                                     "the store is unchanged: rerun without it to truncate") from None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) != 0:  # AT_FDCWD, RENAME_EXCHANGE
        err = ctypes.get_errno()
        raise LocalPathRequiredError(f"cannot swap {a} and {b} atomically ({os.strerror(err)}): the filesystem "
                                     "lacks RENAME_EXCHANGE. The store is unchanged; rerun without --drop-bad-only")
