"""pipeline: the maths over a trajectory store (DLDR extraction, subspace optimizers, experiments)."""
from .compute import limit_malloc_arenas
from .dldr import extract_subspace
from .subspace import Subspace, open_subspace

limit_malloc_arenas()  # before zarr and dask start their threads

__all__ = ["extract_subspace", "open_subspace", "Subspace", "Basis"]


def __getattr__(name: str):  # torch is imported only by those who train
    if name == "Basis":
        from .basis import Basis

        return Basis
    raise AttributeError(name)
