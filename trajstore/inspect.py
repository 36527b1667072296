"""Store summaries (``info``) and integrity checks (``verify``) behind the CLI."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import CorruptMetadataError, CorruptSnapshotError, InvalidArgumentError, SubspaceNotFoundError
from .format import (BUFFERS, GRAM, LANDSCAPES, METRICS, NONFINITE, OPTIMIZER, PARAMS, REFERENCE, ROW_ARRAYS, SUBSPACES,
                     local_dir)
from . import reader as _reader
from ._scan import TRASH, Files
from . import optstate
from .codecs import describe_chain
from .fastread import open_fast
from .layout import HALF_DTYPES, raw_dtype
from .store import TrajectoryStore

ONE_ROW_PER_FILE = (PARAMS, REFERENCE, BUFFERS)  # shards (1, S): the file c/<row>/<k> holds row <row> only


def info(path: "str | os.PathLike") -> dict:
    """Snapshots, parameters, steps, sizes, compression ratio, codec and format of a store.

    ``stored_bytes`` is the trajectory's own: the snapshots (params and the delta codecs' reference
    row), buffers, per-snapshot arrays, metrics and metadata; ``snapshot_bytes`` the encoded snapshots
    alone, and ``compression_ratio`` = ``raw_bytes / snapshot_bytes``, the codec's ratio. Derived
    data are counted apart in ``derived_bytes``: the Gram cache, each subspace (with its memory-map
    copy of the basis), and temporary files (writes killed part-way, rows beyond the committed count,
    an interrupted gc's trash: what ``trajstore gc`` frees). ``total_bytes`` is all of it.

    ``dtype`` is what the rows hold (``bfloat16`` / ``float16``: the model's own, 2 bytes a value);
    ``model_dtypes`` counts the model's elements per dtype, and ``widened`` says when the rows are
    wider than the model (a mixed model, or a half model recorded by trajstore before format 3).
    ``optimizer_state`` (None unless recorded) gives its keys and ``bytes``, which ``stored_bytes``
    includes.
    """
    with TrajectoryStore.open(path, "r") as store:
        t, n = len(store), store.n_params
        raw = t * n * raw_dtype(store.values).itemsize
        parts = disk_usage(store)
        size, encoded = parts["trajectory"], parts["snapshots"]
        steps = store.steps
        meta = store.attrs
        return {
            "path": store.path,
            "snapshots": t,
            "parameters": n,
            "tensors": len(store.layout),
            "first_step": int(steps[0]) if len(steps) else None,
            "last_step": int(steps[-1]) if len(steps) else None,
            "steps": steps.tolist(),
            "stored_bytes": size,
            "raw_bytes": raw,
            "snapshot_bytes": encoded,
            "compression_ratio": raw / encoded if encoded and raw else None,
            "derived_bytes": {key: parts[key] for key in ("gram", "subspaces", "per_subspace", "landscapes",
                                                          "temporary")},
            "total_bytes": parts["total"],
            "codec": store.codec.spec,
            "lossless": store.codec.lossless,
            "error_bound": store.codec.error_bound(),  # this version's statement of the bound
            "chunk_codecs": _chunk_codecs(store),  # what the bytes are: read from each array's zarr.json
            "dtype": meta["dtype"],
            "model_dtypes": store.layout.dtype_counts(),
            "widened": _widened(store),
            "optimizer_state": ({"keys": store.optimizer_state_keys, "bytes": parts["optimizer"]}
                                if meta.get("optimizer_state") else None),
            "format_version": meta["format_version"],
            "created": meta.get("created"),
            "buffers": store.buffer_layout.n if store.buffer_layout else 0,
            "metrics": [name.split("/", 1)[1] for name in _row_arrays(store) if name.startswith(f"{METRICS}/")],
            "subspaces": _subspaces(store),
            "subspace_sampling": _subspace_sampling(store),  # the sampling each was extracted with (None: none)
            "metadata": meta.get("metadata", {}),
        }


def _chunk_codecs(store: TrajectoryStore) -> dict:
    """The chunk codec chain each row-per-file array records in its metadata (params, reference,
    buffers), e.g. ``{"params": "blosc(lz4, level 1, bitshuffle) + crc32c"}``: a preset name alone does
    not say it (a ``lossless`` store of an earlier trajstore holds zstd)."""
    chains = {}
    for name in ONE_ROW_PER_FILE:
        try:
            if name in store.group:
                chains[name] = describe_chain(store.group[name].metadata.to_dict())
        except (ValueError, TypeError, KeyError) as exc:  # zarr refuses a damaged zarr.json: say which, typed
            raise CorruptMetadataError(f"{store.path}/{name}/zarr.json is damaged ({type(exc).__name__}: {exc}); "
                                       "run `trajstore verify` and restore the file from a backup") from None
    return chains


def disk_usage(store: TrajectoryStore) -> dict:
    """Bytes on disk (or in the object store) by kind: ``trajectory`` (the store's own data, of which
    ``snapshots``: the chunks of params and reference), ``gram``, ``subspaces`` (``per_subspace``:
    name -> bytes), ``landscapes`` (cached loss-landscape grids), ``temporary`` and ``total``."""
    t = len(store)
    usage: dict = {"trajectory": 0, "snapshots": 0, "optimizer": 0, "gram": 0, "subspaces": 0, "per_subspace": {}, "landscapes": 0,
                   "temporary": 0, "total": 0}
    for key, size in Files(store.path, store.storage_options).sizes().items():
        usage["total"] += size
        top, _, rest = key.partition("/")
        if top == TRASH or key.endswith(".partial") or _uncommitted_row(top, rest, t):
            usage["temporary"] += size
        elif top == GRAM:
            usage["gram"] += size
        elif top == LANDSCAPES:
            usage["landscapes"] += size
        elif top == SUBSPACES:
            usage["subspaces"] += size
            if "/" in rest:
                name = rest.split("/", 1)[0]
                usage["per_subspace"][name] = usage["per_subspace"].get(name, 0) + size
        else:
            usage["trajectory"] += size
            if top in (PARAMS, REFERENCE) and rest.startswith("c/"):
                usage["snapshots"] += size
            elif top == OPTIMIZER:
                usage["optimizer"] += size
    return usage


def _uncommitted_row(top: str, rest: str, committed: int) -> bool:
    """Whether ``top/rest`` is a chunk file of a row at or beyond ``committed`` (a killed writer's)."""
    parts = rest.split("/")
    if top == OPTIMIZER:  # optimizer/<key>/<values|scalars|present>/c/<row>/<k>: one row per file too
        top, parts = PARAMS, parts[2:]
    return top in ONE_ROW_PER_FILE and len(parts) >= 2 and parts[0] == "c" and parts[1].isdigit() \
        and int(parts[1]) >= (committed if top != REFERENCE else 1)


def _widened(store: TrajectoryStore) -> str | None:
    """Why the rows are wider than the model's tensors, or None when they hold its own dtype."""
    halves = sorted(set(store.layout.dtype_counts()) & set(HALF_DTYPES))
    if not halves or store.values in HALF_DTYPES:
        return None
    why = "a mixed-dtype model" if len(store.layout.dtype_counts()) > 1 else "recorded before format 3"
    return f"{' and '.join(halves)} tensors stored as {store.values} ({why}); exact, 2x the bytes of native storage"


def subspace_name(path: "str | os.PathLike", name: str | None) -> str:
    """``name``, or when None the store's only subspace; an error listing them when there are none
    or several (the CLI's ``--name`` default)."""
    if name is not None:
        return name
    with TrajectoryStore.open(path, "r") as store:
        names = _subspaces(store)
        where = store.path
    if len(names) == 1:
        return names[0]
    if not names:
        raise SubspaceNotFoundError(f"{where} holds no subspace; extract one first: "
                                    f"`trajstore extract {where} --dim D`")
    raise InvalidArgumentError(f"{where} holds {len(names)} subspaces ({', '.join(names)}); choose one with "
                               f"--name (e.g. --name {names[0]})")


def subspace_names(path: "str | os.PathLike") -> list[str]:
    """The subspaces a store holds (the groups under ``subspaces/``; those ``extract --follow`` stages, named
    ``__*``, left out): `trajstore verify` checks them only when there are any."""
    with TrajectoryStore.open(path, "r") as store:
        return [name for name in _subspaces(store) if not name.startswith("__")]


def _subspace_sampling(store: TrajectoryStore) -> dict:
    """name -> the ``sampling`` attribute its extraction recorded (``extract --smooth/--window``), or None."""
    found = {}
    for name in _subspaces(store):
        try:
            found[name] = store.group[f"{SUBSPACES}/{name}"].attrs.get("sampling")
        except (KeyError, FileNotFoundError):  # replaced (extract --follow) while listed
            found[name] = None
    return found


def _subspaces(store: TrajectoryStore) -> list[str]:
    try:
        return sorted(store.group[SUBSPACES].group_keys()) if SUBSPACES in store.group else []
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, ArithmeticError, OSError) as exc:
        raise _damaged(store, SUBSPACES, exc) from None


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`: ``problems`` maps snapshot index to what is wrong with it."""

    path: str
    snapshots: int
    problems: dict[int, list[str]] = field(default_factory=dict)
    store_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # not defects, but worth knowing (e.g. NaN on purpose)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.store_problems

    def to_json(self) -> dict:
        return {"path": self.path, "snapshots": self.snapshots, "ok": self.ok,
                "bad_snapshots": {str(k): v for k, v in sorted(self.problems.items())},
                "store_problems": self.store_problems, "notes": self.notes}


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
        shapes: dict[str, int] = {}
        for name in _row_arrays(store, report):
            try:
                arr = _array(store, name)
                rows = shapes[name] = arr.shape[0]
            except CorruptSnapshotError as exc:
                report.store_problems.append(str(exc))
                continue
            if rows < t:
                report.store_problems.append(
                    f"the committed count {t} exceeds the {rows} rows of '{name}' (metadata damaged); "
                    f"`trajstore repair {store.path}` truncates to the rows that exist")
            elif name == BUFFERS:  # read through zarr (read_buffers): its layout must be the one we write
                try:
                    open_fast(f"{store.path.rstrip('/')}/{BUFFERS}", store.storage_options, layout_required=True)
                except CorruptSnapshotError as exc:
                    report.store_problems.append(str(exc))
            elif name != PARAMS:
                try:
                    store._row_values(name)  # layout, checksums and missing chunk files of the small arrays
                except CorruptSnapshotError as exc:
                    if isinstance(exc, CorruptMetadataError):
                        shapes.pop(name)
                    report.store_problems.append(str(exc))
                except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError, RuntimeError, OSError) as exc:
                    report.store_problems.append(str(_damaged(store, name, exc)))
        t = min([t] + [shapes.get(name, t) for name in (PARAMS, NONFINITE)])
        if store.codec.transform == "delta" and t:
            try:
                store.group[REFERENCE][0, :1]
            except Exception as exc:  # noqa: BLE001 -- any failure here is a damaged reference
                report.store_problems.append(f"the reference snapshot every row decodes from is unreadable: {exc}")
        try:
            if NONFINITE not in shapes:
                raise KeyError(NONFINITE)  # its metadata are damaged: reported above
            allowed_nonfinite = store.group[NONFINITE][:t]
        except (ValueError, RuntimeError, OSError, KeyError, TypeError, IndexError):  # a store problem above
            allowed_nonfinite = np.zeros(t, bool)
        reader = store.reader()
        try:
            reader._open()  # the params/reference metadata agree with the attributes
        except CorruptSnapshotError as exc:  # no snapshot can be read
            report.store_problems.append(str(exc))
            return report
        group = max(1, store.codec.keyframe_interval if store.codec.transform == "xor" else 8)
        for g0 in range(0, t, group):
            g1 = min(t, g0 + group)
            try:
                bad_values = _check_rows(reader, g0, g1, store.n_columns)
            except CorruptSnapshotError:
                bad_values = {}
                for i in range(g0, g1):  # find every bad row of the group, and what depends on it
                    try:
                        bad_values.update(_check_rows(reader, i, i + 1, store.n_columns))
                    except CorruptSnapshotError as exc:
                        reason = (f"unreadable: {exc}" if exc.index in (None, i) else
                                  f"cannot be decoded: it is stored relative to corrupt snapshot {exc.index}")
                        report.problems.setdefault(i, []).append(reason)
            for i, count in bad_values.items():
                if count and not allowed_nonfinite[i]:
                    report.problems.setdefault(i, []).append(f"{count} non-finite values")
                elif count:
                    report.notes.append(f"snapshot {i} holds {count} NaN/Inf values, recorded on purpose "
                                        "(allow_nonfinite): extraction must leave it out (--snapshots)")
            if progress:
                progress(g1, t)
        _verify_optimizer(store, t, allowed_nonfinite, report)
        return report


def _verify_optimizer(store: TrajectoryStore, t: int, allowed: np.ndarray, report: VerifyReport) -> None:
    """Every committed row of the optimizer state: checksums, missing files, layout, finiteness."""
    read_errors = (CorruptSnapshotError, ValueError, TypeError, KeyError, OSError)
    for i, problem, _ in optstate.problems(store, t, allowed, _reader.CONTEXT_BYTES, read_errors):
        if i is None:
            report.store_problems.append(problem)
        else:
            report.problems.setdefault(i, []).append(problem)


def _row_arrays(store: TrajectoryStore, report: VerifyReport | None = None) -> list[str]:
    """Every per-snapshot array the store must hold (a missing one is reported when opened)."""
    names = [PARAMS, *([BUFFERS] if store.buffer_layout is not None else []), *ROW_ARRAYS]
    local = local_dir(store.path)
    folder = local / METRICS if local is not None else None
    # a metric folder whose zarr.json is gone is damage too (zarr lists only arrays it can open)
    orphans = {d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")} \
        if folder is not None and folder.is_dir() else set()
    try:
        return names + [f"{METRICS}/{name}" for name in sorted(orphans | set(store.metric_names()))]
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, ArithmeticError, OSError) as exc:
        problem = _damaged(store, METRICS, exc)
        if report is None:
            raise problem from None
        report.store_problems.append(str(problem))
        return names


def _array(store: TrajectoryStore, name: str):
    """The zarr array ``name``; missing or damaged metadata raises CorruptMetadataError naming the file."""
    try:
        arr = store.group[name]
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, ArithmeticError, OSError) as exc:
        raise _damaged(store, name, exc) from None
    if not hasattr(arr, "shape") or not arr.shape:
        raise _damaged(store, name, ValueError("it is not a 1-d or 2-d array"))
    return arr


def _damaged(store: TrajectoryStore, name: str, exc: Exception) -> CorruptMetadataError:
    what = "is missing" if isinstance(exc, KeyError) else f"is damaged ({type(exc).__name__}: {exc})"
    return CorruptMetadataError(f"the metadata of '{name}' ({store.path}/{name}/zarr.json) {what}; restore it "
                                f"from a copy of the store, or `trajstore repair {store.path}`")


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
