"""Writing a subspace's group in the store: create it with its spectrum, digest its basis, discard it, or
promote the version ``extract --follow`` staged. Only the extraction holding the subspace's lock calls these
(pipeline/locking.py)."""
from __future__ import annotations

import os
import shutil
import time
import uuid

import numpy as np
import zarr

from trajstore import TrajectoryStore
from trajstore.errors import InvalidArgumentError, NonFiniteError

from .blocks import block_columns, column_blocks
from .locking import extraction_access
from .settings import STAGING, ExtractionSettings
from .subspace import SUBSPACES, BasisDigest

ORTHONORMALISE = "orthonormalise"  # ``stage`` of the second basis pass, P L⁻ᵀ (see begin_orthonormalising)
ORTHONORMALISER = "_orthonormaliser"  # the (d, d) L⁻ᵀ that pass applies to the coefficients
ORTHONORMALITY_TOLERANCE = 1e-6  # ‖PᵀP − I‖_F above which a float64 basis pass is re-orthonormalised


def digest_of(basis: zarr.Array, name: str, store: TrajectoryStore) -> str:
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
            discard(store, subspaces, name)
        os.rename(staged, staged.with_name(name))


def discard(store: TrajectoryStore, subspaces: zarr.Group, name: str) -> None:
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


def create_subspace_group(subspaces: zarr.Group, group: zarr.Group | None, name: str, store: TrajectoryStore,
                           d: int, lam: np.ndarray, vec: np.ndarray, total: float, attrs: dict, rows: list[int],
                           settings: ExtractionSettings) -> zarr.Group:
    """Arrays of a new subspace (basis, mean, spectrum) and its attributes; ``complete`` comes last.

    The group is created with its attributes (``stage`` "spectrum") in one write; arrays left by a killed
    creation are replaced; ``stage`` becomes "basis" once every array and attribute is there
    ("orthonormalise" in a second basis pass: :func:`begin_orthonormalising`). P's rows
    follow the store's columns: the parameter order, or for a store recorded sharded its rank-major order
    with zero padding rows (``store.columns`` maps them; see trajstore/columns.py)."""
    from .randomized import CHECKPOINT

    if group is None:
        group = subspaces.create_group(name, attributes={**attrs, "complete": False, "stage": "spectrum"})
    for key in list(group.array_keys()):
        del group[key]
    n = store.n_columns
    width = block_columns(store, settings.block_size)
    # uncompressed: zstd gained 8% on float32 P at ~0.2 GB/s each way (written, then read back for the digest)
    group.create_array("basis", shape=(n, d), chunks=(min(width, n), d), dtype="float32", fill_value=np.nan,
                       compressors=None)
    group.create_array("mean", shape=(n,), chunks=(min(width, n),), dtype="float32", fill_value=np.nan,
                       compressors=None)
    group.create_array("singular_values", shape=(d,), dtype="float64", fill_value=0.0)[:] = np.sqrt(lam[:d])
    t = vec.shape[0]
    evr = np.full(t, np.nan)  # (t',): the whole spectrum; randomized: NaN beyond the components it computed
    evr[:len(lam)] = lam / total
    complete = len(lam) >= t - 1  # all but at most the centring null direction, whose eigenvalue is exactly 0
    if len(lam) == t - 1:
        evr[t - 1] = 0.0
    group.create_array("explained_variance_ratio", shape=evr.shape, dtype="float64", fill_value=0.0)[:] = evr
    group.create_array("eigenvectors", shape=vec.shape, dtype="float64", fill_value=0.0)[:] = vec
    nblocks = len(column_blocks(n, width))
    group.create_array("_ptp", shape=(nblocks, d, d), chunks=(1, d, d), dtype="float64", fill_value=0.0,
                       config={"write_empty_chunks": True})
    group.create_array("_done", shape=(nblocks,), chunks=(1,), dtype="bool", fill_value=False)
    steps = store.steps
    sampled_steps = [int(steps[rows[hi - 1]]) for _, hi in settings.sampling.groups(len(rows))]
    group.attrs.update({**attrs, "dim": d, "eigenvalues": lam.tolist(), "total_variance": total,
                        "steps": sampled_steps, "sampled_rows": t, "complete": False, "stage": "basis",
                        "uncomputed_variance_ratio": 0.0 if complete else float(max(0.0, 1.0 - lam.sum() / total)),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "orthonormality_error": None,
                        "orthonormality_error_before": None,
                        "extraction_id": uuid.uuid4().hex})
    if CHECKPOINT in group:
        del group[CHECKPOINT]
    return group


def needs_orthonormalising(group: zarr.Group, error: float) -> bool:
    """Whether the basis pass just finished (‖PᵀP − I‖_F = ``error``) must be re-orthonormalised: above
    :data:`ORTHONORMALITY_TOLERANCE`, once, and only for the float64 product (``basis_precision="float32"``
    is limited by its own rounding: a second pass would double its time and not reach the tolerance)."""
    return (error > ORTHONORMALITY_TOLERANCE and group.attrs.get("stage") == "basis"
            and group.attrs.get("basis_precision", "float64") == "float64")


def begin_orthonormalising(group: zarr.Group, ptp: np.ndarray, error: float) -> None:
    """Turn the finished basis pass into the start of a second one that writes P L⁻ᵀ (PᵀP = L Lᵀ, Cholesky).

    The second pass is the basis pass again with coefficients W L⁻ᵀ: every task recomputes its rows from the
    snapshots, so a task killed after writing its rows and before its flag is simply redone (transforming the
    stored P in place would apply L⁻ᵀ twice to such a block) and a resumed extraction gives the identical P.
    L⁻ᵀ is kept in ``_orthonormaliser`` before the flags are cleared and ``stage`` becomes
    "orthonormalise" (a kill in between resumes the first pass, which then gives the same L again); the
    digest and ``orthonormality_error`` are those of the final P, ``orthonormality_error_before`` the first's.
    """
    try:
        lower = np.linalg.cholesky(ptp)  # (d, d): PᵀP = L Lᵀ
    except np.linalg.LinAlgError:
        raise InvalidArgumentError(
            f"the basis computed is numerically rank-deficient (‖PᵀP − I‖ = {error:.1e}): the snapshots "
            "do not span that many directions accurately; extract with a smaller --dim") from None
    inverse_t = np.linalg.inv(lower).T  # (d, d) upper triangular: P L⁻ᵀ keeps column 1, Gram-Schmidt order
    if ORTHONORMALISER in group:
        del group[ORTHONORMALISER]
    group.create_array(ORTHONORMALISER, shape=inverse_t.shape, dtype="float64", fill_value=0.0)[...] = inverse_t
    group["_done"][...] = False
    group.attrs.update({"stage": ORTHONORMALISE, "orthonormality_error_before": error})


def orthonormaliser(group: zarr.Group) -> np.ndarray | None:
    """The (d, d) L⁻ᵀ the current basis pass applies to its coefficients (None in the first pass)."""
    return group[ORTHONORMALISER][...] if group.attrs.get("stage") == ORTHONORMALISE else None
