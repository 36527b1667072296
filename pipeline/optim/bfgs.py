"""P-BFGS: BFGS on the projected gradient, with backtracking Armijo line search on the mini-batch."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from trajstore.errors import InvalidArgumentError

from ..basis import Basis
from ._base import SubspaceOptimizer


class SubspaceBFGS(SubspaceOptimizer):
    """Quasi-Newton in span(P) (Li et al., Algorithm 2).

    Each ``step(closure)``:

    1. evaluates the closure (loss and gradient on the current mini-batch), then g̃ = Pᵀg;
    2. from the second step on, updates the inverse Hessian B (d, d), B₀ = I, with
       y = g̃_k − g̃_{k−1} and s = the previous step: B ← Vᵀ B V + ρ s sᵀ, V = I − ρ y sᵀ,
       ρ = 1 / yᵀs; skipped when yᵀs ≤ ``curvature_eps``;
    3. searches α from ``lr`` down by ``shrink`` until f(w + α P p̃) ≤ f(w) + c1 α g̃ᵀp̃ with
       p̃ = −B g̃ (Armijo), evaluating trial points in memory on the same mini-batch; buffers
       (BN running statistics) touched by a rejected trial are restored;
    4. sets w ← w + α P p̃.

    **Line-search failure** (no α in ``max_ls`` trials, or p̃ not a descent direction):
    the weights are left exactly as before the step (buffers as after the gradient
    evaluation, as in any training step), B is reset to I, the
    stored step is zero (so the next curvature update is skipped), and
    ``state["ls_failures"]`` counts it. Training continues with the next mini-batch.
    """

    def __init__(self, params: Iterable, basis: Basis, lr: float = 1.0, c1: float = 0.4, shrink: float = 0.4,
                 max_ls: int = 20, curvature_eps: float = 1e-20, buffers: Iterable[torch.Tensor] = ()):
        if lr <= 0 or not 0 < c1 < 1 or not 0 < shrink < 1 or max_ls < 1:
            raise InvalidArgumentError(f"invalid lr={lr}, c1={c1}, shrink={shrink} or max_ls={max_ls}")
        defaults = dict(lr=lr, c1=c1, shrink=shrink, max_ls=max_ls, curvature_eps=curvature_eps)
        super().__init__(params, basis, defaults)
        self.buffers = [b for b in buffers if b.is_floating_point() or b.dtype in (torch.int64, torch.int32)]

    def _init_state(self):
        state = super()._init_state()
        if "inverse_hessian" not in state:
            d = self.basis.d
            state["inverse_hessian"] = torch.eye(d, dtype=torch.float64, device=self.basis.device)
            state["ls_failures"] = torch.zeros((), dtype=torch.float64)
            state["last_alpha"] = torch.zeros((), dtype=torch.float64)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        """One P-BFGS step; ``closure`` must zero the gradients, compute the loss, backprop and return it."""
        if closure is None:
            raise InvalidArgumentError("SubspaceBFGS.step needs a closure that recomputes the loss (as LBFGS)")
        group = self.param_groups[0]
        with torch.enable_grad():
            loss = closure()
        f0 = float(loss.detach())
        params = self.trainable()  # per basis tensor; None: frozen, never written
        g = self.basis.project(self.grads(params))  # (d,) float64
        state = self._init_state()
        b = state["inverse_hessian"]
        if "prev_grad" in state:
            y, s = g - state["prev_grad"], state["prev_step"]
            ys = float(y @ s)
            if ys > group["curvature_eps"]:
                rho = 1.0 / ys
                v = torch.eye(self.basis.d, dtype=torch.float64, device=b.device) - rho * torch.outer(y, s)
                b = v.T @ b @ v + rho * torch.outer(s, s)
                state["inverse_hessian"] = b
        direction = -(b @ g)  # p̃ (d,)
        slope = float(g @ direction)
        alpha = self._line_search(closure, params, f0, direction, slope, group) if slope < 0 else None
        if alpha is None:
            state["inverse_hessian"] = torch.eye(self.basis.d, dtype=torch.float64, device=b.device)
            state["prev_step"] = torch.zeros_like(g)
            state["ls_failures"] += 1
            state["last_alpha"].zero_()
        else:
            state["prev_step"] = alpha * direction
            state["last_alpha"].fill_(alpha)
        state["prev_grad"] = g
        state["step"] += 1
        return loss

    def _line_search(self, closure, params: list[torch.Tensor | None], f0: float, direction: torch.Tensor,
                     slope: float, group) -> float | None:
        """Backtracking Armijo; returns the accepted α (weights moved) or None (weights restored)."""
        live = [p for p in params if p is not None]
        start = [p.detach().clone() for p in live]
        saved_buffers = [buf.detach().clone() for buf in self.buffers]
        alpha = group["lr"]
        for _ in range(group["max_ls"]):
            self.basis.add_lifted_(params, direction, alpha=alpha)
            with torch.enable_grad():
                trial = float(closure().detach())
            if trial == trial and trial <= f0 + group["c1"] * alpha * slope:  # NaN never passes
                return alpha
            for p, w in zip(live, start):  # exact restore, no drift across trials
                p.copy_(w)
            for buf, saved in zip(self.buffers, saved_buffers):
                buf.copy_(saved)
            alpha *= group["shrink"]
        return None
