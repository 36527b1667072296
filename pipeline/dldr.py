"""DLDR out of core: spectrum of the centred Gram, choice of d, and the basis P written to zarr.

With G the cached shifted Gram (see gram.py) restricted to the chosen snapshots S, and A (t_S, t') the
sampling map (pipeline/sampling.py; the identity unless ``smooth``/``window`` is given):
K = C Aᵀ G_S A C (C = I − 11ᵀ/t') is the centred Gram of the sampled rows, eigh(K) = (λ, V)
descending, and since Vᵀ1 = 0 and A's columns sum to 1 the orthonormal basis is
P = D_Sᵀ (A V_d Λ_d^{-1/2}) for any shift of the rows: no mean is subtracted from the data, and neither
the sampled trajectory nor a second copy of the snapshots is ever written. P is computed per column
block straight into ``subspaces/<name>/basis``; finished blocks are flagged, so a killed extraction
resumes where it stopped and gives the identical result (the randomized method also keeps its finished
spectrum passes). ``complete`` is set together with ``basis_digest`` (the digest of the whole basis as
read back; each extraction also has an ``extraction_id``): readers check what they read against them.
``--overwrite`` deletes the old subspace first (on a local store by one rename into the trash).
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import zarr

from trajstore import TrajectoryStore
from trajstore.errors import InvalidArgumentError, NonFiniteError, SubspaceExistsError
from trajstore.reader import RowReader

from .blocks import SUB_BLOCK, check_finite, column_blocks, read_rows, run_resumable, scratch, wide_blocks
from .compute import Progress, StopFlag
from .gram import update_gram
from .locking import extraction_access
from .readback import ReadBackDigest
from .sampling import Sampling
from .settings import (STAGING, ExtractionSettings, check_dim_fits, check_dim_variance,  # noqa: F401 (re-exported)
                       describe_differences, parse_snapshots, request_differences, resolve_snapshots,
                       selection_json)
from .subspace import SUBSPACES, Subspace, open_subspace
from .subspace_write import create_subspace_group, digest_of, discard, promote_subspace, staging_name  # noqa: F401
from .subspace_write import ORTHONORMALISE, begin_orthonormalising, needs_orthonormalising, orthonormaliser


def check_extract_args(*, dim: int | None, variance: float | None, method: str, name: str,
                       block_size: int | None = None, smooth: float | None = None, window: int | None = None) -> None:
    """The store-independent checks of :func:`extract_subspace` (see :meth:`ExtractionSettings.validate`)."""
    ExtractionSettings(dim=dim, variance=variance, method=method, name=name, block_size=block_size,
                       smooth=smooth, window=window).validate()


def _check_finite(store: TrajectoryStore, rows: list[int], default: bool, sampling: Sampling | None = None) -> None:
    """Refuse snapshots recorded with NaN or Inf, and say exactly which selection leaves them out (with a
    window: the whole windows holding them, so that the later windows keep their snapshots)."""
    from .gram import nonfinite_rows

    bad = sorted(set(nonfinite_rows(store)) & set(rows))
    if not bad:
        return
    drop, why = set(bad), ""
    if sampling is not None and (sampling.window or 1) > 1:
        k = sampling.window
        spans = {pos // k for pos, i in enumerate(rows) if i in drop}  # the windows (or the left-out tail) holding them
        drop = {i for pos, i in enumerate(rows) if pos // k in spans}
        why = (f"; with --window {k} the whole window holding each is left out (dropping a snapshot alone would "
               "shift every later window by one snapshot, e.g. out of line with the epochs)")
    keep = [i for i in rows if i not in drop]
    if keep == list(range(keep[0], keep[-1] + 1)) if keep else False:
        spec = f"{keep[0]}:{keep[-1] + 1}"
    else:
        spec = ",".join(map(str, keep))
    raise NonFiniteError(
        f"snapshots {bad} of {store.path} hold NaN or Inf (recorded with allow_nonfinite); extraction needs "
        f"finite snapshots. Leave them out: --snapshots {spec} (snapshots=[...] in Python){why}"
        + ("" if default else ", or choose another selection"))


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
    number of (sampled) rows.
    """
    t = lam.shape[0] if t is None else t
    check_dim_variance(dim, variance)
    total = lam.sum() if total is None else total
    if total <= 0:
        raise InvalidArgumentError("the selected snapshots are all identical: there is no direction to extract")
    if variance is not None:
        cumulative = np.cumsum(lam) / total
        dim = int(np.searchsorted(cumulative, variance - 1e-12) + 1)
        dim = min(dim, t - 1, lam.shape[0])
    check_dim_fits(dim, t)
    rank = int((lam > lam[0] * 1e-12).sum())
    if dim > rank:
        raise InvalidArgumentError(f"the selected snapshots span only {rank} directions; dim {dim} is too large")
    return dim


def _basis_task(reader: RowReader, path: str, storage_options, name: str, rows: list[int], weights: np.ndarray,
                mean_weights: np.ndarray, precision: str, block: int, c0: int, c1: int) -> int:
    """P[c0:c1] = (X_S − x_s0)[:, c0:c1]ᵀ W, the block's mean Σ m_i x_i and its PᵀP, written to the store.

    W (t_S, d) = A V Λ^{-1/2} and m (t_S,) = A 1/t' carry the sampling A; Σ m_i = 1 and W's columns sum
    to 0, so the shift by the first selected row drops out of P and comes back exactly in the mean.
    ``precision`` "float64" (default) widens the rows and multiplies in float64; "float32" subtracts and
    multiplies in float32 (faster; measured errors in benchmarks/results/bench_extract.txt)."""
    x = read_rows(reader, rows, c0, c1)  # (t_S, C) float32
    dim = weights.shape[1]
    dtype = np.dtype(precision)
    basis = np.empty((c1 - c0, dim), np.float32)
    mean = np.empty(c1 - c0, np.float32)
    coeffs = np.hstack([weights, mean_weights[:, None]]).astype(dtype)  # (t_S, d + 1): one GEMM gives P and the mean
    both_buf = scratch(f"both_{dtype.name}", (SUB_BLOCK, dim + 1), dtype)
    stored_buf = scratch("stored", (SUB_BLOCK, dim), np.float64)
    ptp = np.zeros((dim, dim), np.float64)
    for s0, d in wide_blocks(x, dtype=dtype):  # (t_S, S): rows minus the first
        s1 = s0 + d.shape[1]
        both = np.matmul(d.T, coeffs, out=both_buf[:s1 - s0])  # (S, d + 1): P's rows, in their stored layout
        basis[s0:s1] = both[:, :dim]
        mean[s0:s1] = both[:, dim] + x[0, s0:s1]
        stored = stored_buf[:s1 - s0]
        stored[...] = basis[s0:s1]  # PᵀP of the float32 values as stored
        ptp += stored.T @ stored
    check_finite(ptp, x, reader.path, c0, c1, rows)
    from trajstore.format import zarr_store

    group = zarr.open_group(zarr_store(path, False, storage_options), mode="r+")[f"{SUBSPACES}/{name}"]
    group["basis"][c0:c1, :] = basis
    group["mean"][c0:c1] = mean
    group["_ptp"][block] = ptp
    group["_done"][block] = True
    return block


@dataclass
class _Runtime:
    """How an extraction runs (not part of its settings)."""

    scheduler: object = None
    progress: Progress | None = None
    stop: StopFlag | None = None
    log: Callable[[str], None] | None = None


def extract_subspace(store_or_path: "TrajectoryStore | str | os.PathLike", settings: ExtractionSettings | None = None,
                     *, dim: int | None = None, variance: float | None = None,
                     snapshots: "slice | Sequence[int] | None" = None, name: str = "default", method: str = "gram",
                     smooth: float | None = None, window: int | None = None, scheduler: object = None,
                     block_size: int | None = None, overwrite: bool = False,
                     progress: Progress | None = None, stop: StopFlag | None = None,
                     log: Callable[[str], None] | None = None, break_lock: bool = False,
                     basis_precision: str = "float64", _staging: bool = False) -> Subspace:
    """Extract the top-d DLDR subspace of a store's trajectory and write it under ``subspaces/<name>/``.

    The settings come as keyword arguments or as one :class:`~pipeline.settings.ExtractionSettings`.
    Give exactly one of ``dim`` and ``variance``. ``snapshots`` is a slice (burn-in and stride:
    ``slice(10, None, 2)``) or a list of committed indices. ``window=K`` replaces each K consecutive
    selected snapshots by their mean, ``smooth=β`` by an EMA (pipeline/sampling.py); both are exact
    linear maps applied to the cached Gram and folded into the basis pass. ``method`` is ``"gram"``
    (exact, cached, incremental) or ``"randomized"`` (our randomized range finder, pipeline/randomized.py,
    for t in the thousands). ``scheduler`` is None (threads), a ``distributed.Client`` or a scheduler
    address. ``progress(done, total)`` is called as column blocks finish. Rerunning an interrupted call
    resumes it, over the snapshots it started with even if the store grew meanwhile (``log`` receives a
    message saying so). Snapshots recorded with NaN or Inf must be left out through ``snapshots``; the
    error says which. ``break_lock=True`` takes over the derived-data lock of an extraction that died
    (object stores). Extractions into different names of a local store run side by side; see
    pipeline/locking.py. ``basis_precision="float32"`` computes the basis product P = Dᵀ W in float32
    (the Gram stays float64): measured at n = 10M, t = 100 it is faster at a principal angle of about 1e-5
    rad to the float64 P (benchmarks/results/bench_extract.txt); the default float64 is exact to float32
    storage.
    """
    began = time.perf_counter()
    if settings is not None and not isinstance(settings, ExtractionSettings):
        raise InvalidArgumentError(
            f"the second argument of extract_subspace is settings=ExtractionSettings(...), got {settings!r}; give "
            "the other settings as keyword arguments, e.g. extract_subspace(path, dim=3)")
    if settings is None:
        settings = ExtractionSettings(dim=dim, variance=variance, snapshots=snapshots, name=name, method=method,
                                      block_size=block_size, smooth=smooth, window=window,
                                      basis_precision=basis_precision, staging=_staging)
    elif any(v is not None for v in (dim, variance, snapshots, smooth, window, block_size)) \
            or (name, method, basis_precision, _staging) != ("default", "gram", "float64", False):
        raise InvalidArgumentError("give the extraction's settings either as settings=ExtractionSettings(...) or as "
                                   "keyword arguments, not both")
    settings.validate()
    run = _Runtime(scheduler, progress, stop, log)
    store = store_or_path if isinstance(store_or_path, TrajectoryStore) else TrajectoryStore.open(store_or_path, "r")
    rows = resolve_snapshots(settings.snapshots, len(store))
    _check_finite(store, rows, settings.snapshots is None, settings.sampling)
    _sampled_count(settings, rows)
    name, requested = settings.name, settings.requested()
    state = [store.attrs.get("created"), len(store.attrs.get("truncations", []))]
    attrs = {"snapshots": rows, **requested, "committed": len(store), "store_state": state,
             "basis_precision": settings.basis_precision}
    with extraction_access(store, name, break_lock=break_lock, stop=stop, log=log) as access:
        root = access.root
        if SUBSPACES not in root:
            with access.gram():  # the one node that extractions into other names share
                root.require_group(SUBSPACES)
        subspaces = root[SUBSPACES]
        if name in subspaces and "complete" not in subspaces[name].attrs:
            discard(store, subspaces, name)  # killed while creating the group (its attributes come last): afresh
        if name in subspaces:
            rows, attrs = _resume_or_discard(store, subspaces, settings, attrs, overwrite, log)
        _extract(store, access, rows, settings, attrs, run)
        group = root[f"{SUBSPACES}/{name}"]
        group.attrs.update({"seconds": time.perf_counter() - began})
    return open_subspace(TrajectoryStore.open(store.path, "r", storage_options=store.storage_options), name)


def _resume_or_discard(store: TrajectoryStore, subspaces: zarr.Group, settings: ExtractionSettings, attrs: dict,
                       overwrite: bool, log) -> tuple[list[int], dict]:
    """What to do with an existing subspace of this name: refuse, discard it, or resume it (the rows and
    attributes to go on with). Only an unfinished extraction of the same request is resumed."""
    name = settings.name
    found = subspaces[name].attrs.asdict()
    differ = request_differences(found, settings)
    same = not differ  # never mix two requests (or two precisions) in one P
    if found.get("complete") and not overwrite:
        raise SubspaceExistsError(
            f"subspace {name!r} already exists in {store.path}; pass overwrite=True (--overwrite) "
            "or choose another --name")
    if overwrite:
        discard(store, subspaces, name)
    elif found.get("store_state") != attrs["store_state"] and same:
        discard(store, subspaces, name)  # its rows were truncated or re-recorded since: partial basis stale
        if log:
            log(f"discarded the interrupted extraction {name!r}: the store was truncated or re-created "
                "since it started; extracting afresh")
    elif same:
        started = found["snapshots"]
        if started != attrs["snapshots"] and log:  # the store grew while the extraction was interrupted
            log(f"resuming the interrupted extraction {name!r} over the {len(started)} snapshots it "
                f"started with (the store holds {len(store)} now); rerun with --overwrite afterwards "
                "to include the new ones")
        return started, {**attrs, "snapshots": started, "committed": found.get("committed")}
    elif found.get("stage") == "spectrum":  # nothing but another request's spectrum passes: start afresh
        discard(store, subspaces, name)
        if log:
            log(f"discarded the unfinished randomized passes of another request under {name!r} "
                f"({describe_differences(differ)}); extracting afresh")
    else:
        raise SubspaceExistsError(
            f"an unfinished extraction {name!r} with other settings is in {store.path} "
            f"({describe_differences(differ)}); pass overwrite=True "
            "(--overwrite) to discard it, or rerun it with its own settings to finish it")
    return attrs["snapshots"], attrs


def _sampled_count(settings: ExtractionSettings, rows: list[int]) -> int:
    """t', the rows the sampling makes of the selected snapshots; refuses fewer than two, or a dim too large."""
    sampling = settings.sampling
    t = sampling.rows_out(len(rows))
    if t < 2:
        raise InvalidArgumentError(
            f"window (--window) {sampling.window} makes {t} row{'s' * (t != 1)} of the {len(rows)} selected "
            "snapshots; DLDR needs at least two: select more snapshots or give a smaller --window")
    if settings.dim is not None and not 1 <= settings.dim <= t - 1:
        what = f"{t} snapshots" if not sampling.active or sampling.window is None else \
            f"{t} rows (--window {sampling.window} over {len(rows)} snapshots)"
        raise InvalidArgumentError(f"dim must be between 1 and t - 1 = {t - 1} for {what}, got {settings.dim}")
    return t


def _transform(settings: ExtractionSettings, rows: list[int]) -> "Sampling | None":
    """The sampling map A (t_S, t') as its :class:`Sampling` (A is never formed), or None when the rows are
    used as they are."""
    sampling = settings.sampling
    return sampling if sampling.active else None


def _spectrum(store, access, rows, settings: ExtractionSettings, transform, run: _Runtime, group):
    """(λ, V (t', ·), total variance, extra attrs) of the centred Gram of the sampled ``rows``."""
    t = len(rows) if transform is None else transform.rows_out(len(rows))
    progress = _phase(run.progress, 0)
    if settings.method == "gram":
        with access.gram() as root:  # gram/ is shared: one Gram pass at a time, the others reuse it
            g, stats = update_gram(store, root, scheduler=run.scheduler, block_size=settings.block_size,
                                   progress=progress, stop=run.stop)
        g = g[np.ix_(rows, rows)]  # (t_S, t_S)
        if transform is not None:
            g = transform.apply_to_gram(g)  # (t', t') = Aᵀ G A: the shifted Gram of the sampled rows, exactly
        lam, vec = centred_spectrum(g)
        return lam, vec, float(lam.sum()), {"gram_blocks_computed": stats.blocks_computed,
                                            "gram_blocks_resumed": stats.blocks_resumed,
                                            "gram_rows_reused": stats.old_rows}
    from .randomized import randomized_spectrum

    k = settings.dim if settings.dim is not None else min(t - 1, 100)
    info: dict = {}
    lam, vec, total = randomized_spectrum(store, rows, k, transform=transform, scheduler=run.scheduler,
                                          block_size=settings.block_size, progress=progress, stop=run.stop,
                                          checkpoint=group, info=info)
    if total <= 0:
        raise InvalidArgumentError("the selected snapshots are all identical: there is no direction to extract")
    variance = settings.variance
    if variance is not None and lam.sum() / total < variance - 1e-12:
        raise InvalidArgumentError(
            f"the top {len(lam)} randomized components explain {lam.sum() / total:.4f} of the variance, less "
            f"than {variance}; use method='gram' or give dim")
    return lam, vec, total, {"randomized_components": len(lam), "randomized_passes_resumed": info["passes_resumed"]}


def _extract(store, access, rows: list[int], settings: ExtractionSettings, attrs: dict, run: _Runtime) -> None:
    subspaces, name = access.root[SUBSPACES], settings.name
    group = subspaces[name] if name in subspaces else None
    transform = _transform(settings, rows)
    t = len(rows) if transform is None else transform.rows_out(len(rows))
    if group is not None and group.attrs.get("stage", "basis") in ("basis", ORTHONORMALISE):  # resume a basis pass
        lam = np.asarray(group.attrs["eigenvalues"])  # with the stored eigenvectors: the identical result
        vec = group["eigenvectors"][:]
        d = vec.shape[1]
    else:
        if group is None and settings.method == "randomized":  # its spectrum passes are kept in the group
            group = subspaces.create_group(name, attributes={**attrs, "complete": False, "stage": "spectrum"})
        try:
            lam, vec_all, total, extra = _spectrum(store, access, rows, settings, transform, run, group)
            d = choose_dim(lam, settings.dim, settings.variance, total, t)
        except InvalidArgumentError:  # refused: a randomized group with only its spectrum passes is of no use
            if group is not None:
                discard(store, subspaces, name)
            raise
        # V's columns are ⊥ 1 in exact arithmetic; K = C G C formed from a Gram shifted far from the
        # selected rows (the cache is shifted by the store's first snapshot) leaves them ~ε‖G‖/λ_k along 1,
        # and W = V Λ^-½ then adds (1ᵀw_k)(x̄_S − x_s0) to P's column k: with drift since s0, ‖PᵀP − I‖ of
        # 1e-4..1e-2 (the review's drift repro). Project it out.
        vec = vec_all[:, :d] - vec_all[:, :d].mean(axis=0)  # (t', d)
        left_out = rows[len(rows) - len(rows) % settings.window:] if settings.window else []
        if left_out and run.log:
            run.log(f"--window {settings.window}: the last {len(left_out)} of the {len(rows)} selected snapshots "
                    f"do not fill a window and are left out (snapshots {left_out})")
        group = create_subspace_group(subspaces, group, name, store, d, lam, vec, total,
                                       {**attrs, **extra, "sampling_left_out": left_out}, rows, settings)
    weights = vec / np.sqrt(lam[:d])[None, :]  # (t', d) = V Λ^{-1/2}
    if (inverse_t := orthonormaliser(group)) is not None:  # the second pass: P L⁻ᵀ
        weights = weights @ inverse_t
    mean_weights = np.full(t, 1.0 / t)
    if transform is not None:  # fold the sampling into the one pass over the snapshots
        weights = transform.to_snapshots(weights, len(rows))  # (t_S, d) = A V Λ^{-1/2}
        mean_weights = transform.to_snapshots(mean_weights, len(rows))  # (t_S,) = A 1/t'
    blocks = column_blocks(store.n_columns, int(group["basis"].chunks[0]))
    task = functools.partial(_basis_task, store.reader(), store.path, store.storage_options, name, rows, weights,
                             mean_weights, group.attrs.get("basis_precision", "float64"))
    done = group["_done"][:]
    digest = ReadBackDigest(group["basis"], blocks, done, name, store)
    try:
        offset = run_resumable(blocks, done, task, run.scheduler, _phase(run.progress, 1), run.stop,
                               finished=digest.finished)
    except BaseException:
        digest.cancel()
        raise
    basis_digest = digest.result()
    ptp = np.zeros((d, d), np.float64)
    for b in range(len(blocks)):
        ptp += group["_ptp"][b]
    error = float(np.linalg.norm(ptp - np.eye(d)))
    if needs_orthonormalising(group, error):  # P ← P L⁻ᵀ (PᵀP = L Lᵀ) by a second basis pass
        if run.log:
            run.log(f"‖PᵀP − I‖ = {error:.1e} after the basis pass: re-orthonormalising P (one more pass)")
        begin_orthonormalising(group, ptp, error)
        return _extract(store, access, rows, settings, attrs, run)
    group.attrs.update({"orthonormality_error": error, "complete": True,
                        "basis_blocks_resumed": offset, "basis_digest": basis_digest})


def _phase(progress: Progress | None, phase: int) -> Progress | None:
    """Progress over two passes (Gram, basis) reported as one bar: each pass is half."""
    if progress is None:
        return None

    def update(done: int, total: int) -> None:
        progress(phase * total + done, 2 * total) if total else None

    return update
