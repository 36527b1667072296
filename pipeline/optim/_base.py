"""Shared plumbing of the subspace optimizers: one param group, state in the subspace, float64 kept."""
from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch

from trajstore.errors import InvalidArgumentError, LayoutMismatchError

from ..basis import Basis
from ._params import match_params


class SubspaceOptimizer(torch.optim.Optimizer):
    """Base class: the basis spans every parameter, so there is exactly one param group.

    Optimizer state lives in the subspace, keyed (as torch.optim expects) by the first
    parameter. ``load_state_dict`` keeps float64 state in float64 (torch would cast it to
    the parameters' dtype) and refuses a state saved with a different basis.

    **Frozen parameters** (``requires_grad=False`` at the step, or not passed at all: pass
    ``model.parameters()``, ``model.named_parameters()`` or an unambiguous subset, see
    :func:`~pipeline.optim._params.match_params`) are never written: their rows of P count as
    zero, g̃ = P_Tᵀ g_T and w_T += P_T s over the trainable rows T only. The optimizer then runs
    exactly on h(s) = f(w₀ + M P s) (M masks the frozen rows): g̃ is ∇h, the Armijo slope g̃ᵀp̃ is
    h's directional derivative and P-BFGS's secant pairs (Δs, Δg̃) are h's, so P-BFGS is plain
    BFGS on h. Re-orthonormalising P_T instead only changes coordinates (s' = R s, Q R = P_T, i.e.
    B₀ = (P_TᵀP_T)⁻¹ in s) at the cost of an n x d QR that streaming cannot afford and a state
    whose meaning depends on the frozen set. With nothing frozen M = I: the paper's algorithm.

    **Parameters without a gradient** (``requires_grad=True`` but ``.grad is None`` at the step: not used
    by this forward, e.g. another task's head) are treated as frozen for that step, as torch.optim skips
    them: their rows of P count as zero and they are not written (no weight decay, no lift, no P(+) term).
    A gradient of zeros (``zero_grad(set_to_none=False)``) is a gradient: that parameter is updated. The
    subspace state (momentum, B) is shared by all rows, so such a step still advances it.
    """

    def __init__(self, params: Iterable, basis: Basis, defaults: dict):
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise InvalidArgumentError("subspace optimizers take one parameter group: the basis spans all of them")
        self.basis = basis
        self._slots = match_params(basis, self.params, self.param_groups[0].get("param_names"))

    @property
    def params(self) -> list[torch.Tensor]:
        return self.param_groups[0]["params"]

    @property
    def subspace_state(self) -> dict[str, Any]:
        """The optimizer state (tensors in the subspace), stored under the first parameter."""
        return self.state[self.params[0]]

    def trainable(self) -> list[torch.Tensor | None]:
        """Per basis tensor (layout order): the parameter to update, or None (not passed, or frozen)."""
        return [None if j is None or not self.params[j].requires_grad else self.params[j] for j in self._slots]

    def updated(self, params: list[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
        """Per basis tensor: the trainable parameter if it has a gradient now, else None (not written)."""
        params = self.trainable() if params is None else params
        return [None if p is None or p.grad is None else p for p in params]

    def grads(self, params: list[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
        """Per basis tensor: the gradient of a trainable parameter, else None (no gradient counts as zero)."""
        params = self.trainable() if params is None else params
        return [None if p is None else p.grad for p in params]

    def _init_state(self) -> dict[str, Any]:
        state = self.subspace_state
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float64)
            state["basis_fingerprint"] = self.basis.fingerprint()
        return state

    _per_param_keys: tuple[str, ...] = ()  # state kept per parameter (torch's casts are right for those)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict`; float64 subspace state stays float64, and hyperparameters a state
        saved by an earlier version lacks take this optimizer's defaults."""
        saved = state_dict["state"].get(0, {})
        fingerprint = saved.get("basis_fingerprint")
        if fingerprint is not None:
            fingerprint = fingerprint.cpu().double()
            legacy = fingerprint.numel() == 3  # saved by an earlier version: a hash of the first 64 rows only
            if not torch.equal(fingerprint, self.basis.legacy_fingerprint() if legacy else self.basis.fingerprint()):
                raise LayoutMismatchError(
                    "this optimizer state was saved with a different basis (n, d or values differ); load the basis "
                    "it was trained with")
            if legacy:
                warnings.warn(
                    "this optimizer state was saved by an earlier version, whose basis check covers only the first "
                    "64 rows of P: bases that agree there (e.g. a tensor frozen while recording) pass it. Make sure "
                    "this is the basis it was trained with; its next state_dict() records the whole-basis check",
                    UserWarning, stacklevel=2)
        exact = {k: v.clone() for k, v in saved.items()
                 if isinstance(v, torch.Tensor) and k not in self._per_param_keys}
        if fingerprint is not None:
            exact["basis_fingerprint"] = self.basis.fingerprint()
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        device = self.basis.device
        for key, value in exact.items():  # undo torch's cast of floating state to the params' dtype
            self.subspace_state[key] = value.to(device if value.dim() else "cpu")


def closure_loss(closure) -> torch.Tensor | None:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
