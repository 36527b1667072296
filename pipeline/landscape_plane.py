"""The plane of a loss landscape, w_K + span(u1, u2), and the projection of weights onto it.

See :mod:`pipeline.landscape` for the definitions (the relative residual, the projection error).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from trajstore import TrajectoryStore
from trajstore.errors import InvalidArgumentError
from trajstore.export import resolve_index
from trajstore.inspect import subspace_name

from .subspace import BasisDigest, block_rows, open_subspace


@dataclass
class Plane:
    """The plane w_K + span(u1, u2): ``center`` (n,) float32 and ``u`` (n, 2) float32, parameter order."""

    subspace: str
    snapshot: int
    step: int
    center: np.ndarray  # (n,)
    u: np.ndarray  # (n, 2)
    explained_variance_ratio: tuple[float, float]
    digest: str  # blake2b of center and u as read: part of the cache key

    def project(self, w: np.ndarray) -> tuple[float, float, float, float]:
        """(a, b, ‖residual‖, ‖w − w_K‖) of the weights ``w`` (n,), in float64."""
        d = np.asarray(w, np.float64) - self.center  # (n,)
        ab = d @ self.u  # (2,)
        residual = d - self.u @ ab  # (n,)
        return float(ab[0]), float(ab[1]), float(np.linalg.norm(residual)), float(np.linalg.norm(d))


@dataclass
class Projection:
    """Points projected on a :class:`Plane`: each array (m,)."""

    a: np.ndarray
    b: np.ndarray
    residual: np.ndarray  # ‖d_i − a_i u1 − b_i u2‖
    distance: np.ndarray  # ‖d_i‖
    steps: list[int] | None = None

    @property
    def relative_residual(self) -> np.ndarray:
        """See the module docstring (0 where the point is the centre itself)."""
        return np.divide(self.residual, self.distance, out=np.zeros_like(self.residual), where=self.distance > 0)

    def to_json(self) -> dict:
        return {"a": self.a.tolist(), "b": self.b.tolist(), "distance": self.distance.tolist(),
                "residual": self.residual.tolist(), "relative_residual": self.relative_residual.tolist(),
                **({"steps": self.steps} if self.steps is not None else {})}


def project_all(plane: Plane, vectors, steps: list[int] | None = None) -> Projection:
    """Project every weight vector (n,) of the iterable ``vectors`` on ``plane``."""
    rows = np.array([plane.project(w) for w in vectors], np.float64).reshape(-1, 4)  # (m, 4)
    return Projection(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], steps)


def open_plane(store: TrajectoryStore, name: str | None, snapshot: "int | str") -> Plane:
    """The plane of subspace ``name`` (None: the store's only one) centred at snapshot ``snapshot`` (an
    index, negative from the end, or ``"step=N"``). u1, u2 are read with the whole basis checked against
    its extraction's digest, about 8 MiB of P at a time."""
    name = subspace_name(store.path, name)
    sub = open_subspace(store, name)
    if sub.dim < 2:
        raise InvalidArgumentError(f"subspace {name!r} of {store.path} has d = {sub.dim}; a landscape needs the first "
                                   f"two directions: extract one with --dim 2 or more, at most t - 1 = {len(store) - 1} (`trajstore "
                                   f"extract {store.path} --dim {max(2, min(15, len(store) - 1))} --name NAME`)")
    k = resolve_index(store, snapshot)
    n, d = sub.basis.shape
    stored = np.empty((n, 2), np.float32)  # (n_columns, 2)
    digest, finite = BasisDigest.like(sub.digest), True
    rows = block_rows((n, d), int(sub.basis.chunks[0]))
    for r0 in range(0, n, rows):
        block = np.asarray(sub.stored_rows(r0, r0 + rows), np.float32)  # (rows, d)
        digest.update(block)
        finite = finite and bool(np.isfinite(block).all())
        stored[r0:r0 + len(block)] = block[:, :2]
    sub.verify(digest.hexdigest(), finite)
    u = stored if sub.columns.is_identity else np.ascontiguousarray(sub.columns.to_global(stored.T).T)
    center = np.ascontiguousarray(store.read(k), np.float32)  # (n,)
    h = hashlib.blake2b(center.tobytes(), digest_size=16)
    h.update(np.ascontiguousarray(u).tobytes())
    evr = sub.explained_variance_ratio
    return Plane(name, k, int(store.steps[k]), center, u, (float(evr[0]), float(evr[1])), h.hexdigest())
