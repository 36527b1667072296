"""DLDR out of core: spectrum of the centred Gram, choice of d, and the basis P written to zarr.

With G the cached shifted Gram (see gram.py) restricted to the chosen snapshots S:
K = C G_S C (C = I − 11ᵀ/t) is the centred Gram, eigh(K) = (λ, V) descending, and since
Vᵀ1 = 0 the orthonormal basis is P = D_Sᵀ V_d Λ_d^{-1/2} for any shift of the rows: no
mean is subtracted from the data and no second copy of the trajectory is made. P is
computed per column block straight into ``subspaces/<name>/basis``; finished blocks are
flagged, so a killed extraction resumes where it stopped and gives the identical result.
``complete`` is set together with ``basis_digest`` (the digest of the whole basis as read back; each
extraction also has an ``extraction_id``): readers check what they read against them. ``--overwrite``
deletes the old subspace first (on a local store by one rename into the trash) and extracts in place.
"""
from __future__ import annotations

import functools
import os
import shutil
import time
import uuid
from typing import Callable, Sequence

import numpy as np
import zarr

from trajstore import TrajectoryStore
from trajstore.errors import InvalidArgumentError, NonFiniteError, SubspaceExistsError
from trajstore.reader import RowReader

from .checks import check_choice, check_fraction, check_int, check_node_name
from .compute import Progress, StopFlag, run_tasks
from .gram import SUB_BLOCK, block_columns, column_blocks, read_rows, scratch, update_gram, widen_shifted
from .locking import extraction_access
from .subspace import SUBSPACES, BasisDigest, Subspace, open_subspace


def resolve_snapshots(snapshots: "slice | Sequence[int] | None", t: int) -> list[int]:
    """Committed snapshot indices for a slice / list; refuses anything beyond ``committed``."""
    if snapshots is None:
        rows = list(range(t))
    elif isinstance(snapshots, slice):
        start, stop = snapshots.start, snapshots.stop
        if snapshots.step is not None and snapshots.step < 1:
            raise InvalidArgumentError(f"the step of snapshots {start}:{stop}:{snapshots.step} must be >= 1")
        if (start is not None and start >= t) or (stop is not None and stop > t):
            raise InvalidArgumentError(
                f"snapshots {start}:{stop} reach beyond the {t} committed snapshots")
        rows = list(range(*snapshots.indices(t)))
    else:
        rows = [int(i) for i in snapshots]
        bad = [i for i in rows if not 0 <= i < t]
        if bad:
            raise InvalidArgumentError(f"snapshots {bad} are beyond the {t} committed snapshots (0..{t - 1})")
        if len(set(rows)) != len(rows):
            raise InvalidArgumentError("snapshot indices must be unique")
    if len(rows) < 2:
        raise InvalidArgumentError(f"DLDR needs at least two snapshots, got {len(rows)}")
    return rows


def _spec_json(snapshots: "slice | Sequence[int] | None") -> object:
    """The user's snapshot selection as JSON (to recognise the same request on a resume)."""
    if snapshots is None:
        return None
    if isinstance(snapshots, slice):
        return {"slice": [snapshots.start, snapshots.stop, snapshots.step]}
    return [int(i) for i in snapshots]


def _check_finite(store: TrajectoryStore, rows: list[int], default: bool) -> None:
    """Refuse snapshots recorded with NaN or Inf, and say exactly which selection leaves them out."""
    from .gram import nonfinite_rows

    bad = sorted(set(nonfinite_rows(store)) & set(rows))
    if not bad:
        return
    keep = [i for i in rows if i not in set(bad)]
    if keep == list(range(keep[0], keep[-1] + 1)) if keep else False:
        spec = f"{keep[0]}:{keep[-1] + 1}"
    else:
        spec = ",".join(map(str, keep))
    raise NonFiniteError(
        f"snapshots {bad} of {store.path} hold NaN or Inf (recorded with allow_nonfinite); extraction needs "
        f"finite snapshots. Leave them out: --snapshots {spec} (snapshots=[...] in Python)"
        + ("" if default else ", or choose another selection"))


def parse_snapshots(text: str | None) -> "slice | list[int] | None":
    """``"A:B"``, ``"A:B:S"`` (S > 0), ``"1,5,9"`` (indices >= 0) or None; InvalidArgumentError otherwise."""
    if not text:
        return None
    try:
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            if len(parts) > 3 or (len(parts) == 3 and parts[2] is not None and parts[2] < 1):
                raise ValueError
            return slice(*parts)
        rows = [int(p) for p in text.split(",")]
        if min(rows) < 0:
            raise ValueError
        return rows
    except ValueError:
        raise InvalidArgumentError(
            f"--snapshots {text!r} is not a selection: give START:STOP, START:STOP:STEP (STEP >= 1) or a list "
            "i,j,k of snapshot indices >= 0 (e.g. 0:20, 0:40:2 or 0,5,9)") from None


def check_extract_args(*, dim: int | None, variance: float | None, method: str, name: str,
                       block_size: int | None = None) -> None:
    """The store-independent checks of :func:`extract_subspace`, run before any work (InvalidArgumentError)."""
    check_choice("method", method, ("gram", "randomized"))
    check_node_name("name", name)
    if (dim is None) == (variance is None):
        raise InvalidArgumentError("give exactly one of dim (--dim) and variance (--variance)")
    if dim is not None:
        check_int("dim", dim, 1)
    if variance is not None:
        check_fraction("variance", variance)
    if block_size is not None:
        check_int("block_size", block_size, 1)


def centred_spectrum(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of C G C, descending, eigenvalues clipped at 0: (λ (t,), V (t, t))."""
    t = g.shape[0]
    c = np.eye(t) - 1.0 / t
    k = c @ g @ c
    k = (k + k.T) / 2
    lam, vec = np.linalg.eigh(k)
    order = np.argsort(lam)[::-1]
    lam, vec = np.clip(lam[order], 0.0, None), vec[:, order]
    return lam, vec


def choose_dim(lam: np.ndarray, dim: int | None, variance: float | None, total: float | None = None,
               t: int | None = None) -> int:
    """d from ``dim`` or from the explained-variance threshold, validated against the spectrum.

    ``lam`` may be truncated (randomized): then ``total`` is the whole variance and ``t`` the
    number of snapshots.
    """
    t = lam.shape[0] if t is None else t
    if (dim is None) == (variance is None):
        raise InvalidArgumentError("give exactly one of dim and variance")
    total = lam.sum() if total is None else total
    if total <= 0:
        raise InvalidArgumentError("the selected snapshots are all identical: there is no direction to extract")
    if variance is not None:
        if not 0 < variance <= 1:
            raise InvalidArgumentError(f"variance must be in (0, 1], got {variance}")
        cumulative = np.cumsum(lam) / total
        dim = int(np.searchsorted(cumulative, variance - 1e-12) + 1)
        dim = min(dim, t - 1, lam.shape[0])
    if not 1 <= dim <= t - 1:
        raise InvalidArgumentError(
            f"dim must be between 1 and t - 1 = {t - 1} (t = {t} snapshots: centring removes one direction), got {dim}")
    rank = int((lam > lam[0] * 1e-12).sum())
    if dim > rank:
        raise InvalidArgumentError(f"the selected snapshots span only {rank} directions; dim {dim} is too large")
    return dim


def _basis_task(reader: RowReader, path: str, storage_options, name: str, block: int, c0: int, c1: int,
                rows: list[int], weights: np.ndarray) -> int:
    """P[c0:c1] = (X_S − x_s0)[:, c0:c1]ᵀ W and the block's mean and PᵀP, written to the store."""
    x = read_rows(reader, rows, c0, c1)  # (t_S, C) float32
    basis = np.empty((c1 - c0, weights.shape[1]), np.float32)
    mean = np.empty(c1 - c0, np.float32)
    buf = scratch("wide", (len(rows), SUB_BLOCK), np.float64)
    dim = weights.shape[1]
    # one GEMM gives P and the column means: the extra row of W is 1/t_S
    weights_t = np.vstack([weights.T, np.full((1, len(rows)), 1.0 / len(rows))])  # (d + 1, t_S)
    ptp = np.zeros((dim, dim), np.float64)
    for s0 in range(0, c1 - c0, SUB_BLOCK):
        d = widen_shifted(x[:, s0:s0 + SUB_BLOCK], buf)  # (t_S, S) float64: rows minus the first
        both = weights_t @ d  # (d + 1, S)
        basis[s0:s0 + SUB_BLOCK] = both[:dim].T
        mean[s0:s0 + SUB_BLOCK] = both[dim] + x[0, s0:s0 + SUB_BLOCK]
        stored = basis[s0:s0 + SUB_BLOCK].astype(np.float64)  # PᵀP of the float32 values as stored
        ptp += stored.T @ stored
    from trajstore.format import zarr_store

    group = zarr.open_group(zarr_store(path, False, storage_options), mode="r+")[f"{SUBSPACES}/{name}"]
    group["basis"][c0:c1, :] = basis
    group["mean"][c0:c1] = mean
    group["_ptp"][block] = ptp
    group["_done"][block] = True
    return block


def extract_subspace(store_or_path: "TrajectoryStore | str | os.PathLike", *, dim: int | None = None,
                     variance: float | None = None, snapshots: "slice | Sequence[int] | None" = None,
                     name: str = "default", method: str = "gram", scheduler: object = None,
                     block_size: int | None = None, overwrite: bool = False,
                     progress: Progress | None = None, stop: StopFlag | None = None,
                     log: Callable[[str], None] | None = None, break_lock: bool = False,
                     _staging: bool = False) -> Subspace:
    """Extract the top-d DLDR subspace of a store's trajectory and write it under ``subspaces/<name>/``.

    Give exactly one of ``dim`` and ``variance``. ``snapshots`` is a slice or a list of
    committed indices. ``method`` is ``"gram"`` (exact, cached, incremental) or
    ``"randomized"`` (dask ``svd_compressed``, for t in the thousands). ``scheduler`` is None
    (threads), a ``distributed.Client`` or a scheduler address. ``progress(done, total)`` is
    called as column blocks finish. Rerunning an interrupted call resumes it, over the snapshots
    it started with even if the store grew meanwhile (``log`` receives a message saying so).
    Snapshots recorded with NaN or Inf must be left out through ``snapshots``; the error says which.
    ``break_lock=True`` takes over the derived-data lock of an extraction that died (object stores).
    Extractions into different names of a local store run side by side; see pipeline/locking.py.
    """
    began = time.perf_counter()
    check_extract_args(dim=dim, variance=variance, method=method, name=name[len(STAGING):] if _staging else name,
                       block_size=block_size)
    store = store_or_path if isinstance(store_or_path, TrajectoryStore) else TrajectoryStore.open(store_or_path, "r")
    rows = resolve_snapshots(snapshots, len(store))
    _check_finite(store, rows, snapshots is None)
    if dim is not None and not 1 <= dim <= len(rows) - 1:
        raise InvalidArgumentError(
            f"dim must be between 1 and t - 1 = {len(rows) - 1} for {len(rows)} snapshots, got {dim}")
    requested = {"snapshots_requested": _spec_json(snapshots), "method": method, "dim_requested": dim,
                 "variance_requested": variance}
    state = [store.attrs.get("created"), len(store.attrs.get("truncations", []))]
    settings = {"snapshots": rows, **requested, "committed": len(store), "store_state": state}
    with extraction_access(store, name, break_lock=break_lock, stop=stop, log=log) as access:
        root = access.root
        if SUBSPACES not in root:
            with access.gram():  # the one node that extractions into other names share
                root.require_group(SUBSPACES)
        subspaces = root[SUBSPACES]
        if name in subspaces and "complete" not in subspaces[name].attrs:
            _discard(store, subspaces, name)  # killed while creating the group (its attributes come last): afresh
        if name in subspaces:
            attrs = subspaces[name].attrs.asdict()
            if attrs.get("complete") and not overwrite:
                raise SubspaceExistsError(
                    f"subspace {name!r} already exists in {store.path}; pass overwrite=True (--overwrite) "
                    "or choose another --name")
            if overwrite:
                _discard(store, subspaces, name)
            elif attrs.get("store_state") != state and all(attrs.get(k) == v for k, v in requested.items()):
                _discard(store, subspaces, name)  # its rows were truncated or re-recorded since: partial basis stale
                if log:
                    log(f"discarded the interrupted extraction {name!r}: the store was truncated or re-created "
                        "since it started; extracting afresh")
            elif all(attrs.get(k) == v for k, v in requested.items()):
                started = attrs["snapshots"]
                if started != rows and log:  # the store grew while the extraction was interrupted
                    log(f"resuming the interrupted extraction {name!r} over the {len(started)} snapshots it "
                        f"started with (the store holds {len(store)} now); rerun with --overwrite afterwards "
                        "to include the new ones")
                rows, settings = started, {**settings, "snapshots": started, "committed": attrs.get("committed")}
            else:
                raise SubspaceExistsError(
                    f"an unfinished extraction {name!r} with other settings is in {store.path} "
                    f"({', '.join(f'{k}={attrs.get(k)!r}' for k in requested)}); pass overwrite=True "
                    "(--overwrite) to discard it, or rerun it with its own settings to finish it")
        _extract(store, access, rows, dim, variance, name, settings, scheduler, block_size, progress, stop)
        group = root[f"{SUBSPACES}/{name}"]
        group.attrs.update({"seconds": time.perf_counter() - began})
    return open_subspace(TrajectoryStore.open(store.path, "r", storage_options=store.storage_options), name)


def _spectrum(store, access, rows, dim, variance, method, scheduler, block_size, progress, stop):
    """(λ, V, total variance, extra attrs) of the centred Gram of ``rows``, by the chosen method."""
    if method == "gram":
        with access.gram() as root:  # gram/ is shared: one Gram pass at a time, the others reuse it
            g, stats = update_gram(store, root, scheduler=scheduler, block_size=block_size, progress=progress,
                                   stop=stop)
        lam, vec = centred_spectrum(g[np.ix_(rows, rows)])
        return lam, vec, float(lam.sum()), {"gram_blocks_computed": stats.blocks_computed,
                                            "gram_blocks_resumed": stats.blocks_resumed,
                                            "gram_rows_reused": stats.old_rows}
    from .randomized import randomized_spectrum

    k = dim if dim is not None else min(len(rows) - 1, 100)
    lam, vec, total = randomized_spectrum(store, rows, k, scheduler=scheduler, block_size=block_size,
                                          progress=progress, stop=stop)
    if variance is not None and lam.sum() / total < variance - 1e-12:
        raise InvalidArgumentError(
            f"the top {len(lam)} randomized components explain {lam.sum() / total:.4f} of the variance, less "
            f"than {variance}; use method='gram' or give dim")
    return lam, vec, total, {"randomized_components": len(lam)}


def _extract(store, access, rows, dim, variance, name, settings, scheduler, block_size, progress, stop):
    subspaces = access.root[SUBSPACES]
    if name in subspaces:  # resume: reuse the stored eigenvectors so the result is identical
        group = subspaces[name]
        lam = np.asarray(group.attrs["eigenvalues"])
        vec = group["eigenvectors"][:]
        d = vec.shape[1]
    else:
        lam, vec_all, total, extra = _spectrum(store, access, rows, dim, variance, settings["method"], scheduler,
                                               block_size, _phase(progress, 0), stop)
        d = choose_dim(lam, dim, variance, total, len(rows))
        vec = vec_all[:, :d]
        group = _create_subspace_group(subspaces, name, store, d, lam, vec, total, settings, block_size)
        group.attrs.update(extra)
    weights = vec / np.sqrt(lam[:d])[None, :]  # (t_S, d) = V Λ^{-1/2}
    width = int(group["basis"].chunks[0])
    blocks = column_blocks(store.n_columns, width)
    done = group["_done"][:]
    pending = [b for b in range(len(blocks)) if not done[b]]
    reader = store.reader()
    tasks = [functools.partial(_basis_task, reader, store.path, store.storage_options, name, b, *blocks[b],
                               rows, weights) for b in pending]
    offset = len(blocks) - len(pending)
    basis_progress = _phase(progress, 1)
    run_tasks(tasks, scheduler, (lambda k, total: basis_progress(offset + k, len(blocks))) if basis_progress else None,
              stop)
    ptp = np.zeros((d, d), np.float64)
    for b in range(len(blocks)):
        ptp += group["_ptp"][b]
    group.attrs.update({"orthonormality_error": float(np.linalg.norm(ptp - np.eye(d))), "complete": True,
                        "basis_blocks_resumed": offset, "basis_digest": _digest_of(group["basis"], name, store)})


def _digest_of(basis: zarr.Array, name: str, store: TrajectoryStore) -> str:
    """The digest of the written basis (read back in row blocks; readers check what they read against it).
    Refuses a basis with NaN or Inf (a block that never got written): it must not be marked complete."""
    digest = BasisDigest()
    rows = int(basis.chunks[0])  # one chunk at a time: no more memory than one basis task held
    for r0 in range(0, basis.shape[0], rows):
        block = basis[r0:r0 + rows, :]
        if not np.isfinite(block).all():
            raise NonFiniteError(
                f"the basis written for subspace {name!r} of {store.path} holds NaN or Inf in rows {r0}.."
                f"{r0 + len(block) - 1} (a lost write?); extract it again with overwrite=True (--overwrite)")
        digest.update(block)
    return digest.hexdigest()


STAGING = "__next__"  # prefix of the name a refresh (extract --follow) writes before it replaces the subspace


def staging_name(name: str) -> str:
    """Where ``extract --follow`` writes the next version of subspace ``name`` (users cannot name one so)."""
    return STAGING + name


def promote_subspace(store: TrajectoryStore, name: str) -> None:
    """Replace subspace ``name`` with its complete staged version (local stores): the old one goes to the
    trash and the new one takes its name, two renames. A reader sees the old subspace, for an instant none
    (it retries), or the new one; never a partial one. A kill between the two leaves the new one staged,
    complete, and the next refresh replaces it again."""
    from trajstore.format import local_dir

    with extraction_access(store, name) as access:
        subspaces = access.root[SUBSPACES]
        staged = local_dir(store.path) / SUBSPACES / staging_name(name)
        if name in subspaces:
            _discard(store, subspaces, name)
        os.rename(staged, staged.with_name(name))


def _discard(store: TrajectoryStore, subspaces: zarr.Group, name: str) -> None:
    """Delete ``subspaces/<name>``. Locally it is first renamed into the store's trash (atomic), so a reader
    never sees half of it deleted and a memory-map copy a reader writes into its folder meanwhile cannot
    make the deletion fail; object stores delete it in place (readers check what they read, see subspace.py)."""
    from trajstore._scan import TRASH
    from trajstore.format import local_dir

    local = local_dir(store.path)
    if local is None:
        del subspaces[name]
        return
    source, target = local / SUBSPACES / name, local / TRASH / f"subspace-{uuid.uuid4().hex}"
    for attempt in range(5):
        (local / TRASH).mkdir(exist_ok=True)
        try:
            os.rename(source, target)
            break
        except FileNotFoundError:  # the trash folder was just removed by an extraction into another name
            if attempt == 4 or not source.exists():
                raise
    shutil.rmtree(target, ignore_errors=True)  # a reader's file appearing meanwhile: gc removes the rest
    try:
        (local / TRASH).rmdir()  # only when empty
    except OSError:
        pass


def _create_subspace_group(subspaces: zarr.Group, name: str, store: TrajectoryStore, d: int, lam: np.ndarray,
                           vec: np.ndarray, total: float, settings: dict, block_size: int | None = None) -> zarr.Group:
    """Arrays of a new subspace (basis, mean, spectrum) and its attributes; ``complete`` comes last.

    P's rows follow the store's columns: the parameter order, or for a store recorded sharded its
    rank-major order with zero padding rows (``store.columns`` maps them; see trajstore/columns.py)."""
    n = store.n_columns
    width = block_columns(store, block_size)
    group = subspaces.create_group(name)
    group.create_array("basis", shape=(n, d), chunks=(min(width, n), d), dtype="float32", fill_value=np.nan)
    group.create_array("mean", shape=(n,), chunks=(min(width, n),), dtype="float32", fill_value=np.nan)
    group.create_array("singular_values", shape=(d,), dtype="float64", fill_value=0.0)[:] = np.sqrt(lam[:d])
    evr = lam / total  # all t components (gram) or the computed ones (randomized)
    group.create_array("explained_variance_ratio", shape=evr.shape, dtype="float64", fill_value=0.0)[:] = evr
    group.create_array("eigenvectors", shape=vec.shape, dtype="float64", fill_value=0.0)[:] = vec
    nblocks = len(column_blocks(n, width))
    group.create_array("_ptp", shape=(nblocks, d, d), chunks=(1, d, d), dtype="float64", fill_value=0.0,
                       config={"write_empty_chunks": True})
    group.create_array("_done", shape=(nblocks,), chunks=(1,), dtype="bool", fill_value=False)
    steps = store.steps
    group.attrs.update({**settings, "dim": d, "eigenvalues": lam.tolist(), "total_variance": total,
                        "steps": [int(steps[i]) for i in settings["snapshots"]], "complete": False,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "orthonormality_error": None,
                        "extraction_id": uuid.uuid4().hex})
    return group


def _phase(progress: Progress | None, phase: int) -> Progress | None:
    """Progress over two passes (Gram, basis) reported as one bar: each pass is half."""
    if progress is None:
        return None

    def update(done: int, total: int) -> None:
        progress(phase * total + done, 2 * total) if total else None

    return update
