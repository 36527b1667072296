"""Subspace: an extracted basis P (n, d) and its spectrum, as stored under ``subspaces/<name>/``."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import zarr

from trajstore import TrajectoryStore
from trajstore.errors import SubspaceNotFoundError

SUBSPACES = "subspaces"


@dataclass
class Subspace:
    """The result of :func:`pipeline.extract_subspace`.

    ``basis`` (n, d) float32 and ``mean`` (n,) stay on disk as zarr arrays (read them in row
    blocks, or whole with ``np.asarray``); the spectrum is small and held in memory.
    """

    path: str
    name: str
    basis: zarr.Array  # (n, d) float32, chunked by rows
    mean: zarr.Array  # (n,) float32
    singular_values: np.ndarray  # (d,) float64
    explained_variance_ratio: np.ndarray  # (t,) float64: the whole spectrum
    eigenvectors: np.ndarray  # (t, d) float64: V of the centred Gram
    attrs: dict

    @property
    def dim(self) -> int:
        return int(self.basis.shape[1])

    @property
    def n_params(self) -> int:
        return int(self.basis.shape[0])

    @property
    def snapshots(self) -> list[int]:
        """Indices of the snapshots the subspace was extracted from."""
        return list(self.attrs["snapshots"])

    @property
    def orthonormality_error(self) -> float:
        """‖PᵀP − I‖_F, measured on the stored float32 basis."""
        return float(self.attrs["orthonormality_error"])

    @property
    def method(self) -> str:
        return str(self.attrs["method"])

    def coordinates(self) -> np.ndarray:
        """The trajectory's coordinates in the basis, (t, d): (w_i − w̄)ᵀ P = V_d Λ_d^{1/2}."""
        return self.eigenvectors * self.singular_values[None, :]

    def cumulative_variance(self) -> np.ndarray:
        return np.cumsum(self.explained_variance_ratio)

    def to_numpy(self) -> np.ndarray:
        """The whole basis as an (n, d) float32 array (only when it fits in memory)."""
        return self.basis[:, :]

    def summary(self) -> dict:
        """A JSON-friendly description."""
        return {
            "path": self.path, "name": self.name, "dim": self.dim, "n_params": self.n_params,
            "snapshots": self.snapshots, "method": self.method,
            "orthonormality_error": self.orthonormality_error,
            "singular_values": self.singular_values.tolist(),
            "explained_variance_ratio": self.explained_variance_ratio.tolist(),
            "explained_variance": float(self.explained_variance_ratio[: self.dim].sum()),
            "seconds": self.attrs.get("seconds"),
        }


def open_subspace(path: "str | os.PathLike | TrajectoryStore", name: str = "default") -> Subspace:
    """Read back a subspace written by :func:`pipeline.extract_subspace`."""
    store = path if isinstance(path, TrajectoryStore) else TrajectoryStore.open(path, "r")
    group = store.group
    key = f"{SUBSPACES}/{name}"
    available = sorted(group[SUBSPACES].group_keys()) if SUBSPACES in group else []
    if name not in available:
        raise SubspaceNotFoundError(
            f"no subspace {name!r} in {store.path}; available: {available or 'none'}. "
            f"Run `trajstore extract {store.path} --dim D --name {name}`")
    sub = group[key]
    attrs = sub.attrs.asdict()
    if not attrs.get("complete"):
        raise SubspaceNotFoundError(
            f"subspace {name!r} in {store.path} is unfinished (its extraction was interrupted); "
            "rerun the same extract command to resume it")
    return Subspace(store.path, name, sub["basis"], sub["mean"], sub["singular_values"][:],
                    sub["explained_variance_ratio"][:], sub["eigenvectors"][:], attrs)


def list_subspaces(store: TrajectoryStore) -> list[str]:
    group = store.group
    return sorted(group[SUBSPACES].group_keys()) if SUBSPACES in group else []
