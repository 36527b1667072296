"""The integrity scan behind ``trajstore repair``, and the locked handles and file listings that
``repair`` and ``gc`` share (see :mod:`trajstore.maintenance`)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import fsspec
import numpy as np

from . import optstate
from ._creating import BACKFILL
from .errors import CorruptSnapshotError, InvalidArgumentError, StoreLockedError
from .format import BUFFERS, METRICS, NONFINITE, PARAMS, REFERENCE, ROW_ARRAYS, STEP, local_dir, open_root
from .holders import describe_holder, gone
from .lock import BREAK_ADVICE, WRITER_ADVICE, local_lock_held, recorded_writer
from .store import TrajectoryStore

READ_ERRORS = (CorruptSnapshotError, ValueError, RuntimeError, OSError, TypeError, KeyError)
TRASH = ".trajstore-trash"  # a node is renamed here (atomically) before it is deleted
MAINTENANCE_ADVICE = "repair and gc need the store to themselves: wait for that writer to finish, or stop it"
BLOCK_BYTES = 64 << 20  # decoded bytes held at once while scanning (a keyframe group x a column range)


class Handle(TrajectoryStore):
    """The store opened with the writer lock for maintenance. Nothing is ever appended through it:
    opening decodes no row and resizes no array, so a damaged last row or a short array can be
    inspected and truncated (``TrajectoryStore.open`` decodes the last row and grows short arrays)."""

    def _load_encoder_state(self) -> None:
        self._next_index = len(self)

    def _ensure_capacity(self, rows: int) -> None:
        pass

    def _check_row_arrays(self) -> None:
        pass  # damage is what maintenance inspects

    LOCK_PURPOSE = "trajstore repair or gc (maintenance)"  # what its lock record says holds the store
    dry_run_lock: "dict | None" = None  # a dry run's: the writer lock's record when it opened the store

    def append(self, *args, **kwargs) -> int:
        raise InvalidArgumentError("a maintenance handle cannot append")


BREAK_FLAG = "rerun with --break-lock (break_lock=True from Python)"


def open_locked(path: str, storage_options: dict | None, break_lock: bool = False) -> tuple[Handle, list[str]]:
    """The store under its writer lock, and the lock warnings (a broken stale lock) as notes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            store = Handle.open(path, "a", storage_options=storage_options, break_lock=break_lock, process_group=None)
        except StoreLockedError as exc:  # the API's advice (mode='r', open(..., break_lock=True)) is not for these
            message = str(exc)
            if message.endswith(WRITER_ADVICE):
                message = f"{message[:-len(WRITER_ADVICE)]}{MAINTENANCE_ADVICE}"
            elif message.endswith(BREAK_ADVICE):
                message = f"{message[:-len(BREAK_ADVICE)]}{BREAK_FLAG}"
            else:
                raise
            raise type(exc)(message, exc.holder) from None
    return store, [str(w.message) for w in caught]


def open_for(path: str, storage_options: dict | None, break_lock: bool, dry_run: bool) -> tuple[Handle, list[str]]:
    """:func:`open_locked`, or for a dry run the store read without its lock: a dry run writes nothing, not
    even the lock's record, and never breaks or takes over a lock. It refuses, as the real run would, while
    a writer holds the lock (the plan would be out of date at its next commit): locally whoever holds the
    flock, whatever the record says; on an object store a record whose holder may still run. A lock the real
    run would break or take over is named in the notes and left as it lies."""
    if not dry_run:
        return open_locked(path, storage_options, break_lock)
    notes, holder = [], recorded_writer(path, storage_options)
    remote = local_dir(path) is None
    live = writer_live(path, holder)
    who = (f"{describe_holder(holder)}, {holder.get('purpose') or 'a writer'}" if holder
           else "a writer that has not written its record yet")
    if live and not (remote and break_lock):
        gone_advice = f"; if that process is gone, {BREAK_FLAG}" if remote else ""
        raise StoreLockedError(f"{path} is being written by {who}; {MAINTENANCE_ADVICE} (a dry run's plan would "
                               f"be out of date at its next commit){gone_advice}", holder or {})
    if holder is not None:
        whose = f"{describe_holder(holder)} ({holder.get('purpose') or 'a writer'})"
        notes.append(f"dry run: the lock object of {whose} would be broken by the real run (with --break-lock); "
                     "left as it lies" if live else f"dry run: {whose} left a stale lock; the real run would "
                     f"{'break it (with --break-lock)' if remote else 'take it over'}; left as it lies")
    store = Handle.open(path, "r", storage_options=storage_options)
    store.dry_run_lock = holder
    return store, notes


def writer_live(path: str, holder: dict | None) -> bool:
    """Whether a writer holds the store now: locally the kernel's flock (the record may be stale), falling back to
    the record where the filesystem has no flock; on an object store a record whose holder may still run."""
    live = None if local_dir(path) is None else local_lock_held(path)
    if live is None:
        live = holder is not None and not gone(holder, strict=local_dir(path) is None)
    return live


def check_dry_run_current(store: Handle, storage_options: dict | None) -> None:
    """Refuse a dry run's plan (StoreLockedError) if, while it read the store without its lock, a writer took
    the lock or the store was appended to, truncated or re-created: the plan describes a store that is gone."""
    path, then = store.path, store._meta
    holder = recorded_writer(path, storage_options)
    remote = local_dir(path) is None
    live = writer_live(path, holder)
    try:
        now = open_root(path, "r", storage_options)[1]
    except READ_ERRORS as exc:
        now = {"unreadable": str(exc)}
    changed = [what for what, key in (("appended to", "committed"), ("re-created", "created"))
               if now.get(key) != then.get(key)]
    changed += ["truncated"] * (len(now.get("truncations", [])) != len(then.get("truncations", [])))
    took = live and (not remote or (holder or {}).get("token") != (store.dry_run_lock or {}).get("token"))
    if changed or took:
        who = f" (the writer lock is held by {describe_holder(holder)})" if took and holder else ""
        raise StoreLockedError(
            f"{path} changed while the dry run read it ({', '.join(changed) or 'a writer took the lock'}){who}: "
            f"its plan is out of date. {MAINTENANCE_ADVICE}, then rerun the dry run", holder or {})


@contextlib.contextmanager
def derived_locked(store: TrajectoryStore, notes: list[str]) -> Iterator:
    """``store.derived()`` (the derived-data lock), its lock warnings added to ``notes``."""
    manager = store.derived()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        root = manager.__enter__()
    notes.extend(str(w.message) for w in caught)
    try:
        yield root
    finally:
        manager.__exit__(None, None, None)


class Files:
    """Keys and sizes under a store root, local or remote, through fsspec."""

    def __init__(self, path: str, storage_options: dict | None):
        self.local = local_dir(path)
        self.fs, root = fsspec.core.url_to_fs(str(self.local) if self.local else path, **(storage_options or {}))
        self.root = root.rstrip("/")

    def sizes(self, prefix: str = "") -> dict[str, int]:
        base = f"{self.root}/{prefix}".rstrip("/")
        if not self.fs.exists(base):
            return {}
        found = self.fs.find(base, detail=True)
        return {key[len(self.root) + 1:]: int(info.get("size") or 0) for key, info in found.items()
                if info.get("type") != "directory"}

    def remove_file(self, key: str) -> None:
        self.fs.rm_file(f"{self.root}/{key}")

    def remove_tree(self, key: str, first: tuple[str, ...] = ("_done", "done")) -> None:
        """Delete a node so that a crash part-way never leaves it looking resumable: locally it is
        renamed into the trash first (atomic); remotely its completion flags go first."""
        if self.local is not None:
            (self.local / TRASH).mkdir(exist_ok=True)
            target = self.local / TRASH / uuid.uuid4().hex
            os.rename(self.local / key, target)
            shutil.rmtree(target)
            return
        for sub in first:
            if self.fs.exists(f"{self.root}/{key}/{sub}"):
                self.fs.rm(f"{self.root}/{key}/{sub}", recursive=True)
        self.fs.rm(f"{self.root}/{key}", recursive=True)


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def row_arrays(group) -> list[str]:
    """The small per-snapshot arrays: step, epoch, wall_time, nonfinite, metrics/*."""
    metrics = sorted(group[METRICS].array_keys()) if METRICS in group else []
    return list(ROW_ARRAYS) + [f"{METRICS}/{m}" for m in metrics]


def digest(row: np.ndarray) -> bytes:
    """Fingerprint of a decoded row's bytes (equal to hashing its column blocks in order)."""
    return hashlib.blake2b(np.ascontiguousarray(row).view(np.uint8), digest_size=16).digest()


@dataclass
class Scan:
    """What :func:`scan` found: bad snapshots with reasons, store-level problems, steps, digests."""

    committed: int
    problems: dict[int, list[str]] = field(default_factory=dict)
    store_problems: list[str] = field(default_factory=list)
    steps: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # -1 where unreadable
    digests: dict[int, bytes] = field(default_factory=dict)  # of every good row

    @property
    def first_bad(self) -> int:
        return min(self.problems) if self.problems else self.committed

    def flag(self, i: int, why: str) -> None:
        self.problems.setdefault(i, []).append(why)


def scan(store: TrajectoryStore, files: Files, progress: Callable[[int, int], None] | None = None) -> Scan:
    """verify's checks -- checksums, missing shard files and chunk files (stores that write every
    chunk), non-finite rows not recorded with allow_nonfinite, committed beyond the arrays -- per
    snapshot: every per-snapshot array (step, epoch, wall_time, nonfinite, metrics/*, buffers) long
    enough and readable, the reference row (delta codecs), and with xor-delta every row after a bad
    one in its keyframe group. Rows are decoded a keyframe group and a column range at a time
    (``BLOCK_BYTES``), so memory stays bounded whatever n is."""
    g, t = store.group, len(store)
    found = Scan(t, steps=np.full(t, -1, np.int64))
    rows_of = {name: (g[name].shape[0] if name in g else 0)
               for name in [PARAMS] + [BUFFERS] * (BUFFERS in g) + row_arrays(g)}
    for name, rows in rows_of.items():
        if rows < t:
            found.store_problems.append(
                f"committed count {t} exceeds the {name} array's {rows} rows (metadata damaged)")
            for i in range(rows, t):
                found.flag(i, f"beyond the end of {name} ({rows} rows)")
    allowed = np.zeros(t, bool)
    every_chunk = bool(store.attrs.get("all_chunks_written"))  # else fill-valued chunks were never written
    for name in row_arrays(g):
        n = min(t, rows_of[name])
        size = g[name].chunks[0] if n else 1
        present = set(files.sizes(f"{name}/c")) if n and every_chunk else set()
        # a metric created just before a kill: its rows before the marker are NaN by design, their chunk files
        # not written yet (a writer's opening backfills them; a dry run, which opens read-only, must agree)
        try:
            backfill_to = int(g[name].attrs.get(BACKFILL, 0)) if n and name.startswith(METRICS) else 0
        except (TypeError, ValueError):
            backfill_to = 0  # a damaged marker: every missing chunk file is damage
        for c0 in range(0, n, size):
            c1 = min(n, c0 + size)
            try:
                if every_chunk and f"{name}/c/{c0 // size}" not in present and c1 > backfill_to:
                    raise FileNotFoundError(f"its chunk file {name}/c/{c0 // size} is missing")
                values = g[name][c0:c1]
            except READ_ERRORS as exc:
                for i in range(c0, c1):
                    found.flag(i, f"{name} unreadable: {exc}")
                continue
            if name == STEP:
                found.steps[c0:c1] = values
            elif name == NONFINITE:
                allowed[c0:c1] = values
    data = [(name, min(t, rows_of[name])) for name in (PARAMS, BUFFERS) if name in rows_of]
    if store.codec.transform == "delta" and t:
        data.append((REFERENCE, 1))
    for name, rows in data * every_chunk:
        present, arr = set(files.sizes(f"{name}/c")), g[name]
        per_row = -(-arr.shape[1] // (arr.shards or arr.chunks)[1])
        for i in range(rows):
            missing = [f"{name}/c/{i}/{j}" for j in range(per_row) if f"{name}/c/{i}/{j}" not in present]
            for k in (range(t) if missing and name == REFERENCE else [i] if missing else []):
                found.flag(k, f"{name} shard files missing: {', '.join(missing)}")
    for i in range(min(t, rows_of.get(BUFFERS, 0))):
        try:
            g[BUFFERS][i, :]
        except READ_ERRORS as exc:
            found.flag(i, f"buffers unreadable: {exc}")
    _scan_params(store, found, allowed, min(t, rows_of[PARAMS]), progress)
    _scan_optimizer(store, found, allowed)
    return found


def _scan_optimizer(store: TrajectoryStore, found: Scan, allowed: np.ndarray) -> None:
    """verify's checks of the optimizer state (format 3): every committed row of every key from its
    ``first_row`` (checksums, missing files, finiteness) through :func:`optstate.check_row`; damaged
    metadata is a store problem, as in verify."""
    for i, problem, nonfinite in optstate.problems(store, found.committed, allowed, BLOCK_BYTES, READ_ERRORS):
        if i is None:
            found.store_problems.append(problem)
        else:
            found.flag(i, problem + (" (not recorded with allow_nonfinite)" if nonfinite else ""))


def _scan_params(store: TrajectoryStore, found: Scan, allowed: np.ndarray, rows: int,
                 progress: Callable[[int, int], None] | None) -> None:
    """Decode every params row: checksums, finiteness, and a digest of each good row."""
    preset, reader, n = store.codec, store.reader(), store.n_columns
    reader.committed = rows  # the rows that exist: a reader refuses a params array shorter than committed
    k = preset.keyframe_interval if preset.transform == "xor" else 1
    for g0 in range(0, rows, k):
        g1 = min(rows, g0 + k)
        width = max(1, BLOCK_BYTES // ((g1 - g0) * store.dtype.itemsize))
        bad = [i for i in range(g0, g1) if any(p.startswith(PARAMS) for p in found.problems.get(i, ()))]
        hashers, nonfinite = {}, {}
        for r0, r1 in [(g0, g1)] + [(i, i + 1) for i in range(g0, g1)] * (g1 - g0 > 1):  # the group, row by row
            if r0 in hashers:
                continue  # decoded with the group
            try:
                part = {i: hashlib.blake2b(digest_size=16) for i in range(r0, r1)}
                counts = dict.fromkeys(range(r0, r1), 0)
                for c0 in range(0, n, width):
                    block = reader.read_block(r0, r1, c0, min(n, c0 + width))  # (r1 - r0, width)
                    for i, values in zip(range(r0, r1), block):
                        counts[i] += int((~np.isfinite(values)).sum())
                        part[i].update(np.ascontiguousarray(values).view(np.uint8))
                hashers.update(part)
                nonfinite.update(counts)
            except CorruptSnapshotError as exc:  # the reader's verdict on the data; anything else (too many
                # open files, no thread to be had, a bad setting) is no damage: raised, never flagged for repair
                if r1 - r0 == 1:
                    source, why = getattr(exc, "index", None), str(exc).split(" (store ")[0]  # (not its advice: repair)
                    found.flag(r0, f"unreadable: {why}" if source in (None, r0) else
                               f"cannot be decoded: it is stored relative to corrupt snapshot {source}")
                    bad.append(r0)
        for i, count in nonfinite.items():
            if count and not allowed[i]:
                found.flag(i, f"{count} non-finite values (not recorded with allow_nonfinite)")
                bad.append(i)
        for i in range(min(bad) + 1 if k > 1 and bad else g1, g1):
            if i not in bad:
                found.flag(i, f"decodes through bad snapshot {min(bad)} (xor-delta keyframe group {g0}..{g1 - 1})")
        for i, hasher in hashers.items():
            if i not in found.problems:
                found.digests[i] = hasher.digest()
        if progress:
            progress(g1, rows)
