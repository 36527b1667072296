"""pipeline: the maths over a trajectory store (DLDR extraction, subspace optimizers, experiments)."""
from .dldr import extract_subspace
from .subspace import Subspace, open_subspace

__all__ = ["extract_subspace", "open_subspace", "Subspace"]
