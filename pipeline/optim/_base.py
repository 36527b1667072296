"""Shared plumbing of the subspace optimizers: one param group, state in the subspace, float64 kept."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from trajstore.errors import InvalidArgumentError, LayoutMismatchError

from ..basis import Basis


class SubspaceOptimizer(torch.optim.Optimizer):
    """Base class: the basis spans every parameter, so there is exactly one param group.

    Optimizer state lives in the subspace, keyed (as torch.optim expects) by the first
    parameter. ``load_state_dict`` keeps float64 state in float64 (torch would cast it to
    the parameters' dtype) and refuses a state saved with a different basis.
    """

    def __init__(self, params: Iterable, basis: Basis, defaults: dict):
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise InvalidArgumentError("subspace optimizers take one parameter group: the basis spans all of them")
        self.basis = basis
        basis.check_params(self.params)

    @property
    def params(self) -> list[torch.Tensor]:
        return self.param_groups[0]["params"]

    @property
    def subspace_state(self) -> dict[str, Any]:
        """The optimizer state (tensors in the subspace), stored under the first parameter."""
        return self.state[self.params[0]]

    def grads(self) -> list[torch.Tensor]:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def _init_state(self) -> dict[str, Any]:
        state = self.subspace_state
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float64)
            state["basis_fingerprint"] = self.basis.fingerprint()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["state"].get(0, {})
        fingerprint = saved.get("basis_fingerprint")
        if fingerprint is not None and not torch.equal(fingerprint.cpu().double(), self.basis.fingerprint()):
            raise LayoutMismatchError(
                "this optimizer state was saved with a different basis (n, d or values differ); load the basis it "
                "was trained with")
        exact = {k: v.clone() for k, v in saved.items() if isinstance(v, torch.Tensor)}
        super().load_state_dict(state_dict)
        device = self.basis.device
        for key, value in exact.items():  # undo torch's cast of floating state to the params' dtype
            self.subspace_state[key] = value.to(device if value.dim() else "cpu")


def closure_loss(closure) -> torch.Tensor | None:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
