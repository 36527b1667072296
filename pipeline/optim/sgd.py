"""P-SGD: momentum SGD with d free variables, w ← w − lr · P m̃."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from trajstore.errors import InvalidArgumentError

from ..basis import Basis
from ._base import SubspaceOptimizer, closure_loss


class SubspaceSGD(SubspaceOptimizer):
    """SGD in span(P), with torch.optim.SGD's momentum / dampening / nesterov semantics.

    g̃ = Pᵀ(g + weight_decay · w); m̃ = momentum · m̃ + (1 − dampening) · g̃ (m̃ = g̃ at the
    first step); the update is −lr · P m̃ (nesterov: −lr · P (g̃ + momentum · m̃)). The
    momentum buffer is a (d,) float64 tensor; w never leaves w_start + span(P).

    **Weight decay.** The paper's P-SGD is this with momentum 0.9 and **no weight decay**: its code
    runs ``torch.optim.SGD(lr=1, momentum=0.9)`` with no ``weight_decay`` on the projected gradient
    P Pᵀg (only its CIFAR-10 sampling run, which records the trajectory, uses 1e-4), so ``weight_decay``
    defaults to 0. A non-zero λ is L2 decay projected with the gradient, g̃ = Pᵀg + λ Pᵀw: with
    w = w₀ + P s it pulls Pᵀw = Pᵀw₀ + PᵀP s towards 0 (the origin's projection, not w₀), and never
    touches the component of w₀ outside span(P), which the iterates cannot change.

    **A 16-bit basis** (``Basis(..., dtype=torch.bfloat16)``): g̃ = P̂ᵀg and the update P̂ m̃ use the
    rounded P̂ (products in float32), so w stays exactly in w₀ + span(P̂); P̂ is not
    re-orthonormalised and no metric correction is applied (see :mod:`pipeline.basis`).

    Under torch.distributed (DDP, FSDP2; ``process_group``) see :class:`SubspaceOptimizer`: with FSDP2
    each rank projects its shards and g̃ is summed over the ranks, so every rank takes the same step.
    """

    def __init__(self, params: Iterable, basis: Basis, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, process_group: object = "auto"):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise InvalidArgumentError(f"invalid lr={lr}, momentum={momentum} or weight_decay={weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise InvalidArgumentError("nesterov momentum needs momentum > 0 and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(params, basis, defaults, process_group)

    hyperparameters = ("lr", "momentum", "dampening", "nesterov", "weight_decay")  # its defaults' keys

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One step; the closure (if any) is evaluated first, then the gradient is projected."""
        loss = closure_loss(closure)
        group = self.param_groups[0]
        params = self.updated()  # per basis tensor; None: frozen or no gradient now, never written
        grads, weights = self.grads(params), self.local(params)  # this rank's shards
        if group["weight_decay"]:
            grads = [None if w is None else g.add(w, alpha=group["weight_decay"]) for g, w in zip(grads, weights)]
        g = self.project(grads)  # (d,) float64, the whole model's
        state = self._init_state()
        momentum = group["momentum"]
        if momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.clone()
            else:
                buf.mul_(momentum).add_(g, alpha=1 - group["dampening"])
            g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
        self.basis.add_lifted_(weights, g, alpha=-group["lr"])
        state["step"] += 1
        return loss
