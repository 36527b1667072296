"""Subspace optimizers (torch.optim.Optimizer subclasses) and the random-subspace baseline."""
from ..basis import random_subspace_basis
from .bfgs import SubspaceBFGS
from .sgd import SubspaceSGD

__all__ = ["SubspaceSGD", "SubspaceBFGS", "random_subspace_basis"]
