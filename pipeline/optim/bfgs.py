"""P-BFGS: BFGS on the projected gradient, with backtracking Armijo line search on the mini-batch."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from trajstore.errors import InvalidArgumentError

from ..basis import Basis
from ..distributed import fsdp_modules, mean_over_ranks, recording_modules, reshard
from ._base import SubspaceOptimizer
from ._residual import KEY as RESIDUAL_KEY
from ._residual import apply_residual_, update_residual_momentum_
from ._trials import BufferGuard, RngState, accepts_backward, as_float

PAIRS = ("consecutive", "same_batch")
TESTS = ("absolute", "relative")
LS_FAILURES = ("paper", "reset")  # a failed line search: take the last shrunk step, or restore and reset B


class SubspaceBFGS(SubspaceOptimizer):
    """Quasi-Newton in span(P) (Li et al., Algorithm 2; the paper's code's ``P_plus_BFGS``).

    Each ``step(closure)``:

    1. evaluates the closure once with its backward (loss f₀ and gradient g on the current mini-batch),
       then g̃ = Pᵀg (d,);
    2. updates the inverse Hessian B (d, d), B₀ = I, from a curvature pair (y, s):
       B ← Vᵀ B V + ρ s sᵀ, V = I − ρ y sᵀ, ρ = 1 / yᵀs;
    3. searches α from ``lr`` down by ``shrink`` (at most ``max_ls`` trials) until
       f(w + α P p̃) ≤ f₀ + c1 α g̃ᵀp̃ with p̃ = −B g̃ (Armijo), on the same mini-batch;
    4. sets w ← w + α P p̃ (and, with ``residual_weight`` α_r > 0, w ← w − α_r m, below).

    **The closure.** Write it as ``closure(backward=True)``: when ``backward`` is false it must only
    compute and return the loss; the optimizer then evaluates every line-search trial forward-only
    under ``torch.no_grad()`` (the paper's code: one gradient per step). A closure without a
    ``backward`` parameter (``closure()`` as for ``torch.optim.LBFGS``, or Lightning's) still works:
    each trial then also runs its backward, with the same result, only slower::

        def closure(backward=True):
            loss = loss_fn(model(x), y)
            if backward:
                opt.zero_grad()
                loss.backward()
            return loss

    **Trials see f₀'s function.** The RNG state taken before f₀ is restored before every trial, so
    dropout draws f₀'s masks (``replay_rng``), and afterwards the RNG continues as after f₀ alone.
    Buffers (BN running statistics) are copied after f₀'s forward and put back after every trial, so
    a step leaves them as one training forward pass does. They are found without help: the buffers of
    every module that runs during the first step's f₀ (a global forward pre-hook held only then); or
    pass ``module=model`` (all its buffers) or ``buffers=`` (exactly those).

    **Curvature pairs** (``curvature_pairs``): ``"consecutive"`` (the paper's, default):
    y = g̃_k − g̃_{k−1} from two consecutive mini-batches, s = the previous step, applied at the next
    step; ``"same_batch"``: y = g̃(w + s) − g̃(w) on this step's mini-batch, s = this step, applied at
    once; it costs one more forward and backward at the accepted point (none with a plain closure,
    whose accepted trial already backpropagated). **Skip test** (``curvature_test``): ``"absolute"``
    (the paper's, default): skip when yᵀs ≤ ``curvature_eps`` (default 1e-20); ``"relative"``:
    skip when yᵀs ≤ ``curvature_eps`` ‖y‖‖s‖ (default 1e-8), which does not depend on the loss's
    scale. It changes results wherever the two tests disagree, hence an option, not the default.
    ``state["curvature_skips"]`` counts skipped pairs.

    **P(+) term** (``residual_weight`` α_r, ``residual_momentum`` γ): the gradient component outside
    the subspace, r = g − P g̃, kept as momentum m ← γ m + r and applied as w ← w − α_r m after the
    subspace step, line-search failure or not (as in the paper's code; there α_r = 0 by default and
    γ = 0.9). With α_r > 0 the iterates leave w₀ + span(P).

    **Weight decay**: none, and no option for it, as in the paper: its P-BFGS applies the step
    through ``SGD(lr=1, momentum=0)`` with no weight decay. Add an L2 term to the closure's loss if you
    want one: the line search and the curvature pairs then see the same regularised function, which a
    decay applied outside the loss would break (the Armijo test would compare two different functions).

    **A 16-bit basis** (``Basis(..., dtype=torch.bfloat16)``): g̃ = P̂ᵀg and the steps P̂ p̃ use the
    rounded P̂ (products in float32), so this is exactly BFGS on h(s) = f(w₀ + P̂ s); P̂ is not
    re-orthonormalised and no metric correction is applied (see :mod:`pipeline.basis`).

    **Line-search failure** (no α in ``max_ls`` trials), ``ls_failure``: ``"paper"`` (default, as the
    paper's code): the last shrunk step α = lr·shrink^max_ls is taken anyway, B is kept, and that tiny
    step is the next curvature pair's s; ``"reset"``: the weights are left exactly as before the step,
    B is reset to I, the stored step is zero (so the next consecutive-pair update is skipped). Either
    way ``state["ls_failures"]`` counts it and training continues with the next mini-batch. When p̃ is
    not a descent direction (g̃ᵀp̃ ≥ 0: g̃ = 0, or B lost positive definiteness), no trial runs and the
    step is handled as ``"reset"`` in both modes: the paper's test would accept a step uphill.

    **torch.distributed** (DDP, FSDP2; ``process_group``, see :class:`SubspaceOptimizer`): the loss the
    closure returns (this rank's mini-batch) is averaged over the ranks before every decision, f₀ and each
    trial, so every rank takes the same decisions and the same step (g̃ is the same everywhere: DDP averages
    the gradients, FSDP2's g̃ is summed over the ranks); ``step`` returns this rank's loss. Every rank must
    call ``step`` together. FSDP2 keeps the root module's parameters all-gathered after a forward without
    grad, so after each forward-only trial the FSDP2 modules are resharded (found in the first step's f₀,
    or those of ``module=``), making the next trial all-gather the updated shards.
    """

    hyperparameters = ("lr", "c1", "shrink", "max_ls", "curvature_eps", "curvature_test", "curvature_pairs",
                       "residual_momentum", "residual_weight", "replay_rng", "ls_failure")  # its defaults' keys

    def __init__(self, params: Iterable, basis: Basis, lr: float = 1.0, c1: float = 0.4, shrink: float = 0.4,
                 max_ls: int = 20, curvature_eps: float | None = None, curvature_test: str = "absolute",
                 curvature_pairs: str = "consecutive", residual_momentum: float = 0.9, residual_weight: float = 0.0,
                 replay_rng: bool = True, ls_failure: str = "paper", module: nn.Module | None = None,
                 buffers: Iterable[torch.Tensor] | None = None, process_group: object = "auto"):
        if lr <= 0 or not 0 < c1 < 1 or not 0 < shrink < 1 or max_ls < 1:
            raise InvalidArgumentError(f"invalid lr={lr}, c1={c1}, shrink={shrink} or max_ls={max_ls}")
        if curvature_pairs not in PAIRS or curvature_test not in TESTS:
            raise InvalidArgumentError(f"curvature_pairs must be one of {PAIRS} (got {curvature_pairs!r}) and "
                                       f"curvature_test one of {TESTS} (got {curvature_test!r})")
        if ls_failure not in LS_FAILURES:
            raise InvalidArgumentError(f"ls_failure must be one of {LS_FAILURES} (got {ls_failure!r})")
        if curvature_eps is None:
            curvature_eps = 1e-20 if curvature_test == "absolute" else 1e-8
        if curvature_eps < 0 or residual_weight < 0 or not 0 <= residual_momentum <= 1:
            raise InvalidArgumentError(f"invalid curvature_eps={curvature_eps}, residual_weight={residual_weight} "
                                       f"(>= 0) or residual_momentum={residual_momentum} (in [0, 1])")
        defaults = dict(lr=lr, c1=c1, shrink=shrink, max_ls=max_ls, curvature_eps=curvature_eps,
                        curvature_test=curvature_test, curvature_pairs=curvature_pairs,
                        residual_momentum=residual_momentum, residual_weight=residual_weight, replay_rng=replay_rng,
                        ls_failure=ls_failure)
        super().__init__(params, basis, defaults, process_group)
        self._guard = BufferGuard(module, buffers)
        self._fsdp: list[nn.Module] | None = None if module is None else fsdp_modules(module.modules())

    _per_param_keys = (RESIDUAL_KEY,)

    def _init_state(self):
        state = super()._init_state()
        if "inverse_hessian" not in state:
            state["inverse_hessian"] = torch.eye(self.basis.d, dtype=torch.float64, device=self.basis.device)
        for key in ("ls_failures", "last_alpha", "curvature_skips"):  # a state saved before a key existed
            state.setdefault(key, torch.zeros((), dtype=torch.float64))
        return state

    @torch.no_grad()
    def step(self, closure: Callable[..., torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        """One P-BFGS step; ``closure(backward=True)`` (or a plain ``closure()``), see the class docstring."""
        if closure is None:
            raise InvalidArgumentError("SubspaceBFGS.step needs a closure that recomputes the loss (as LBFGS)")
        group = self.param_groups[0]
        loss_only = accepts_backward(closure)
        params = self.trainable()  # per basis tensor; None: frozen, never written
        devices = RngState.devices_of(params)
        before = RngState(devices) if group["replay_rng"] else None
        find = self._fsdp is None and self.basis.sharded
        with self._guard.discovering(), recording_modules(find) as seen, torch.enable_grad():
            loss = closure(backward=True) if loss_only else closure()
        if find:
            self._fsdp = fsdp_modules(seen)
        reshard(self._fsdp or ())
        after = RngState(devices) if group["replay_rng"] else None
        saved = self._guard.save()  # the buffers as f₀'s forward left them

        def evaluate(backward: bool) -> "torch.Tensor | float":
            """The closure at the current weights with f₀'s RNG; buffers put back afterwards."""
            if before is not None:
                before.restore()
            try:
                if loss_only and not backward:
                    return closure(backward=False)
                with torch.enable_grad():
                    return closure(backward=True) if loss_only else closure()
            finally:
                reshard(self._fsdp or ())
                self._guard.restore(saved)

        try:
            self._step(group, params, self._mean(as_float(loss)), evaluate, loss_only)
        finally:
            self._guard.restore(saved)
            if after is not None:
                after.restore()
        return loss

    def _mean(self, value: float) -> float:
        """A loss averaged over the ranks (every rank gets the same value)."""
        return mean_over_ranks(value, self.process_group, self.basis.device)

    def _step(self, group: dict, params: list[torch.Tensor | None], f0: float, evaluate, loss_only: bool) -> None:
        params = self.updated(params)  # after f₀'s backward: a parameter it left without a gradient stays put
        grads = self.grads(params)  # this rank's shards
        g = self.project(grads)  # (d,) float64, the whole model's
        state = self._init_state()
        if group["residual_weight"]:  # before any trial can overwrite the gradients
            update_residual_momentum_(self, params, grads, g, group["residual_momentum"])
        if group["curvature_pairs"] == "consecutive" and "prev_grad" in state:
            self._update_inverse_hessian(state, g - state["prev_grad"], state["prev_step"], group)
        direction = -(state["inverse_hessian"] @ g)  # p̃ (d,)
        slope = float(g @ direction)
        alpha = self._line_search(lambda: self._mean(as_float(evaluate(False))), self.local(params), f0, direction,
                                  slope, group) if slope < 0 else None
        if alpha is None and slope < 0 and group.get("ls_failure", "paper") == "paper":
            state["ls_failures"] += 1  # the paper's code: take the last, tiny shrunk step and keep B
            alpha = group["lr"] * group["shrink"] ** group["max_ls"]
            self.basis.add_lifted_(self.local(params), direction, alpha=alpha)
        if alpha is None:
            state["inverse_hessian"] = torch.eye(self.basis.d, dtype=torch.float64, device=g.device)
            state["prev_step"] = torch.zeros_like(g)
            state["ls_failures"] += 1
            state["last_alpha"].zero_()
        else:
            state["prev_step"] = alpha * direction
            state["last_alpha"].fill_(alpha)
            if group["curvature_pairs"] == "same_batch":
                if loss_only:  # a plain closure's accepted trial already left its gradient
                    evaluate(True)
                g_new = self.project(self.grads(params))
                self._update_inverse_hessian(state, g_new - g, state["prev_step"], group)
        state["prev_grad"] = g
        if group["residual_weight"]:
            apply_residual_(self, params, group["residual_weight"])
        state["step"] += 1

    @staticmethod
    def _update_inverse_hessian(state: dict, y: torch.Tensor, s: torch.Tensor, group: dict) -> None:
        """B ← Vᵀ B V + ρ s sᵀ from the pair (y, s), both (d,), unless the skip test fails."""
        ys = float(y @ s)
        bound = group["curvature_eps"]
        if group["curvature_test"] == "relative":
            bound *= float(y.norm() * s.norm())
        if ys > bound:
            rho = 1.0 / ys
            b = state["inverse_hessian"]
            v = torch.eye(b.shape[0], dtype=torch.float64, device=b.device) - rho * torch.outer(y, s)
            state["inverse_hessian"] = v.T @ b @ v + rho * torch.outer(s, s)
        else:
            state["curvature_skips"] += 1

    def _line_search(self, trial: Callable[[], float], params: list[torch.Tensor | None], f0: float,
                     direction: torch.Tensor, slope: float, group) -> float | None:
        """Backtracking Armijo; returns the accepted α (weights moved) or None (weights restored)."""
        live = [p for p in params if p is not None]
        start = [p.detach().clone() for p in live]
        alpha = group["lr"]
        try:
            for _ in range(group["max_ls"]):
                self.basis.add_lifted_(params, direction, alpha=alpha)
                value = trial()
                if value == value and value <= f0 + group["c1"] * alpha * slope:  # NaN never passes
                    return alpha
                for p, w in zip(live, start):  # exact restore, no drift across trials
                    p.copy_(w)
                alpha *= group["shrink"]
        except BaseException:
            for p, w in zip(live, start):
                p.copy_(w)
            raise
        return None
