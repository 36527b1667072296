"""The "plus" of the paper's P(+)-BFGS: momentum SGD on the gradient component outside span(P).

With g the gradient of the trainable tensors and g̃ = Pᵀg, the residual r = g − P g̃ feeds a
full-space momentum buffer m ← γ m + r (m₀ = 0), and each step also moves w ← w − α m, after the
subspace step (the paper's code applies w + P s − α m as one SGD step with lr 1). α = 0 (the
paper's default) turns it off: nothing is computed or stored. The buffers are per parameter,
``optimizer.state[p]["residual_momentum_buffer"]``, shaped and typed like p.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..distributed import local

KEY = "residual_momentum_buffer"


@torch.no_grad()
def update_residual_momentum_(optimizer, params: Sequence[torch.Tensor | None], grads: Sequence[torch.Tensor | None],
                              g_tilde: torch.Tensor, gamma: float) -> None:
    """m_l ← γ m_l + (g_l − (P g̃)_l) for every trainable tensor l (``None`` entries: frozen, skipped).

    ``grads`` must be the gradients g̃ (d,) was projected from, read before any line-search trial (this
    rank's shards, for FSDP2: the buffers are then the local shards' too).
    """
    inside = [None if g is None else torch.zeros_like(g) for g in grads]  # P_l g̃, per tensor
    optimizer.basis.add_lifted_(inside, g_tilde)
    for p, g, pg in zip(params, grads, inside):
        if p is None:
            continue
        state = optimizer.state[p]
        buf = state.get(KEY)
        if buf is None:
            buf = state[KEY] = torch.zeros_like(g)
        buf.mul_(gamma).add_(g).sub_(pg)


@torch.no_grad()
def apply_residual_(optimizer, params: Sequence[torch.Tensor | None], weight: float) -> None:
    """w_l ← w_l − α m_l for every trainable tensor that has a residual buffer."""
    for p in params:
        if p is not None and KEY in optimizer.state[p]:
            local(p).add_(optimizer.state[p][KEY], alpha=-weight)
