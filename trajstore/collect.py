"""``trajstore gc``: remove what no reader can see (rows at or beyond ``committed``, zarr temp files, the
leftovers of an interrupted repair or gc) and, under the derived-data lock, stale derived data. Derived
nodes are renamed into a trash folder first, so a kill part-way never leaves a half-deleted node that looks
resumable. The leftovers of ``repair --drop-bad-only`` (see :mod:`trajstore.maintenance`) are told apart
here by the marker it leaves in the rebuilt store until the swap is finished."""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ._scan import TRASH, Files, check_dry_run_current, derived_locked, open_for, row_arrays, tree_bytes
from .errors import RepairError, StoreLockedError, SubspaceNotFoundError
from .format import BUFFERS, GRAM, LANDSCAPES, OPTIMIZER, PARAMS, REFERENCE, SUBSPACES, local_dir, normalize
from . import optstate
from .store import TrajectoryStore

TMP_SUFFIX, OLD_SUFFIX = ".repair-tmp", ".repair-old"
MARKER = ".trajstore.repair-new"  # inside the compacted store until the swap is finished
# zarr 3.1.6 LocalStore writes each key to path.with_suffix(f".{uuid4().hex}.partial"), then renames it
ZARR_TEMP = re.compile(r"\.[0-9a-f]{32}\.partial$")
# pipeline.basis memory-map copies in progress (each writer its own file, renamed into place when whole):
# basis-<fingerprint>.f32.npy.<pid>-<hex>.partial, and basis.f32.npy.partial of older versions
CACHE_PARTIAL = re.compile(r"^basis[^/]*\.f32\.npy(\.[0-9]+-[0-9a-f]+)?\.partial$")
CACHE_PARTIAL_AGE_S = 3600.0  # ... so gc removes one only once it has been idle this long



@dataclass
class GcItem:
    """One file or directory gc removed (or, dry run, would remove)."""

    path: str  # relative to the store, or absolute outside it
    bytes: int
    reason: str
    kind: str


def repair_leftovers(path: str, remove: bool) -> list[GcItem]:
    """Directories left by an interrupted ``repair --drop-bad-only``, told apart by the marker (see top)."""
    src = local_dir(path)
    if src is None:
        return []
    tmp, old = src.with_name(src.name + TMP_SUFFIX), src.with_name(src.name + OLD_SUFFIX)
    swapped = (src / MARKER).exists()
    items = []
    if old.exists():
        items.append(GcItem(str(old), tree_bytes(old), "the pre-repair store, left by a repair interrupted "
                                                           "after its swap", "repair-leftover"))
    if tmp.exists():
        why = ("the pre-repair store, left by a repair interrupted after its swap" if swapped and
               not (tmp / MARKER).exists() else "an unfinished rebuild of a repair interrupted before its swap "
               "(the store was never replaced)")
        items.append(GcItem(str(tmp), tree_bytes(tmp), why, "repair-leftover"))
    if remove:
        for item in items:
            shutil.rmtree(item.path, ignore_errors=True)  # another gc may be removing it too
            if Path(item.path).exists():
                raise RepairError(f"could not remove {item.path} ({item.reason}); remove it by hand")
        if swapped:
            (src / MARKER).unlink(missing_ok=True)
    return items


@dataclass
class GcReport:
    """What :func:`gc` removed (or would), what it kept on purpose, and notes."""

    path: str
    dry_run: bool
    removed: list[GcItem] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(item.bytes for item in self.removed)

    def to_json(self) -> dict:
        return {**asdict(self), "bytes_freed": self.bytes_freed}


def gc(path: "str | os.PathLike", *, subspace: str | None = None, incomplete: bool = False, dry_run: bool = False,
       storage_options: dict | None = None, break_lock: bool = False) -> GcReport:
    """Remove files beyond ``committed`` (a killed writer's rows), zarr temp files, leftovers of an
    interrupted repair or gc, a Gram update that no longer matches the store, and, when asked,
    subspace ``subspace`` or every unfinished subspace (``incomplete``). Holds the writer lock, and the
    derived-data lock for ``gram/`` and ``subspaces/`` (skipped with a note when an extraction runs).
    Nothing under a committed row is ever removed."""
    path = normalize(path)
    store, notes = open_for(path, storage_options, break_lock, dry_run)
    report = GcReport(path, dry_run, notes=notes)
    try:
        files = Files(path, storage_options)
        report.removed += repair_leftovers(path, remove=not dry_run)
        drop = lambda key, size, why, kind: _drop(files, report, key, size, why, kind)  # noqa: E731
        sizes = files.sizes()
        if files.local is not None and (files.local / TRASH).exists():
            report.removed.append(GcItem(TRASH, tree_bytes(files.local / TRASH), "left by an interrupted gc", "trash"))
            shutil.rmtree(files.local / TRASH) if not dry_run else None
        for key, size in sizes.items():
            if key.split("/", 1)[0] not in (GRAM, SUBSPACES, LANDSCAPES, TRASH) and ZARR_TEMP.search(key):
                drop(key, size, "zarr temporary file of a write killed part-way", "temp")
        t, g = len(store), store.group
        state = [f"{OPTIMIZER}/{key}/{kind}" for key in (sorted(g[OPTIMIZER].group_keys()) if OPTIMIZER in g else [])
                 for kind in optstate.KINDS]  # optimizer state rows, like params
        for name in [PARAMS, BUFFERS, REFERENCE] + row_arrays(g) + state:
            if name not in g:
                continue
            per_key = int((g[name].shards or g[name].chunks)[0])
            for key, size in sizes.items():
                parts = key[len(name) + 1:].split("/")
                if key.startswith(f"{name}/c/") and parts[1].isdigit() and not ZARR_TEMP.search(key) \
                        and int(parts[1]) * per_key >= t:
                    drop(key, size, f"{name} rows from {int(parts[1]) * per_key}, at or beyond committed = {t}",
                         "orphan")
        if dry_run:
            report.notes.append("dry run: nothing was removed (derived data listed without its lock)")
            _gc_derived(store, g, files, sizes, report, subspace, incomplete)
            check_dry_run_current(store, storage_options)
            return report
        try:
            with derived_locked(store, report.notes) as root:
                _gc_derived(store, root, files, sizes, report, subspace, incomplete)
        except StoreLockedError as exc:  # only the derived lock is taken in there
            if subspace or incomplete:
                raise
            report.kept.append(f"gram/ and subspaces/ left alone: {exc}")
        if files.local is not None:
            _remove_empty_dirs(files.local)
        return report
    finally:
        store.close()


def _drop(files: Files, report: GcReport, key: str, size: int, why: str, kind: str, tree: bool = False) -> None:
    report.removed.append(GcItem(key, size, why, kind))
    if not report.dry_run:
        files.remove_tree(key) if tree else files.remove_file(key)


def _gc_derived(store: TrajectoryStore, root, files: Files, sizes: dict[str, int], report: GcReport,
                subspace: str | None, incomplete: bool) -> None:
    """gram/: a stale update or a cache that covers no current row; subspaces/: asked-for ones, temps."""
    subtree = (lambda prefix: sum(s for k, s in sizes.items() if k.startswith(prefix + "/")))
    for key, size in sizes.items():
        if key.split("/", 1)[0] in (GRAM, SUBSPACES, LANDSCAPES) and ZARR_TEMP.search(key):
            _drop(files, report, key, size, "zarr temporary file of a write killed part-way", "temp")
    t = len(store)
    if GRAM in root and "update" in root[GRAM]:  # gram/value itself is never stale: update_gram reuses its prefix
        gram = root[GRAM]
        attrs = gram["update"].attrs.asdict()
        frm, to = int(attrs.get("from_rows", -1)), int(attrs.get("to_rows", -1))
        truncations = store.attrs.get("truncations", [])[int(gram.attrs.get("truncations_seen", 0)):]
        why = (f"it covers {to} snapshots but only {t} are committed" if to > t else
               f"the store was truncated to {min(truncations)} after the cached Gram was written, so its partial "
               "sums may hold replaced rows" if any(int(x) < to for x in truncations) else
               f"the store has grown to {t} snapshots since (it covers {to}): update_gram restarts it" if to < t
               else None)
        if why:
            _drop(files, report, f"{GRAM}/update", subtree(f"{GRAM}/update"), f"unfinished Gram update: {why}",
                  "stale-cache", tree=True)
        else:
            report.kept.append(f"{GRAM}/update: an unfinished Gram update of rows {frm}..{to - 1} that still "
                               "matches the store: resumable, kept (rerun the extraction to finish it)")
    names = sorted(root[SUBSPACES].group_keys()) if SUBSPACES in root else []
    if subspace is not None and subspace not in names:
        raise SubspaceNotFoundError(f"no subspace {subspace!r} in {store.path}; available: {names or 'none'}")
    for name in names:
        key, complete = f"{SUBSPACES}/{name}", bool(root[f"{SUBSPACES}/{name}"].attrs.get("complete"))
        if name == subspace or (incomplete and not complete):
            why = "asked for (--subspace)" if name == subspace else "unfinished extraction (--incomplete)"
            _drop(files, report, key, subtree(key), f"subspace {name!r}: {why}", "subspace", tree=True)
            continue
        if not complete:
            report.kept.append(f"{key}: unfinished extraction, resumable: kept (rerun the same extract to finish "
                               f"it, or gc --incomplete / --subspace {name} to remove it)")
        for partial in [k for k in sizes if CACHE_PARTIAL.match(k.removeprefix(f"{key}/"))]:
            if files.local is None:
                continue
            idle = time.time() - (files.local / partial).stat().st_mtime
            if idle >= CACHE_PARTIAL_AGE_S:
                _drop(files, report, partial, sizes[partial], "memory-map copy of the basis abandoned part-way",
                      "stale-cache")
            else:
                report.kept.append(f"{partial}: a basis copy written {idle:.0f} s ago, maybe still in progress: kept")
    if files.local is not None and (files.local / SUBSPACES).is_dir():
        for entry in sorted((files.local / SUBSPACES).iterdir()):
            if entry.is_dir() and not (entry / "zarr.json").exists():
                key = f"{SUBSPACES}/{entry.name}"
                _drop(files, report, key, subtree(key), "cache folder of a subspace that no longer exists",
                      "stale-cache", tree=True)


def _remove_empty_dirs(root: Path) -> None:
    """The row folders (params/c/<row>) emptied by gc."""
    for name in (PARAMS, BUFFERS, REFERENCE):
        if (root / name / "c").is_dir():
            for entry in (root / name / "c").iterdir():
                if entry.is_dir() and not any(entry.iterdir()):
                    entry.rmdir()
    if (root / TRASH).is_dir() and not any((root / TRASH).iterdir()):
        (root / TRASH).rmdir()
