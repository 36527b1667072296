"""pipeline: the maths over a trajectory store (DLDR extraction, subspace optimizers, experiments)."""
