"""Shared plumbing of the subspace optimizers: one param group, state in the subspace, float64 kept."""
from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch

from trajstore.errors import InvalidArgumentError, LayoutMismatchError

from ..basis import Basis
from ..distributed import agree, all_reduce_sum_, is_dtensor, local, resolve_group, same_everywhere, shard_rows, world_size
from ._params import match_params


def _subclasses(cls: type) -> list[type]:
    """Every subclass of ``cls``, at any depth."""
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


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

    **torch.distributed.** Pass the parameters of the model as the job trains it. DDP: every rank holds all
    of P and DDP has averaged the gradients; g̃ is averaged over the ranks all the same (d values), so the
    replicas never drift apart, even where ranks compute P's products differently (resident and streamed
    P round differently). The ranks must hold one basis: checked when the optimizer is made. FSDP2
    (``fully_shard``; load the basis with ``Basis.from_store(..., model=model)``, which holds only this
    rank's rows): the optimizer reads and writes each parameter's local shard (``p.to_local()``,
    ``p.grad.to_local()``) and sums g̃ = Σ_local P_lᵀ g_l over the ranks (one all_reduce of d float64 values
    per projection); w_local += P_local · step needs none. ``process_group``: ``"auto"`` (the basis's mesh
    group when sharded, else the default group when torch.distributed is initialised with more than one
    rank, else none), ``None`` (no communication: independent runs per rank; refused for a sharded basis)
    or a process group. State dicts are per rank; the subspace state is the same on every rank.
    """

    def __init__(self, params: Iterable, basis: Basis, defaults: dict, process_group: object = "auto"):
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise InvalidArgumentError("subspace optimizers take one parameter group: the basis spans all of them")
        self.basis = basis
        shards = [is_dtensor(p) for p in self.params]
        if any(shards) and not basis.sharded:
            raise InvalidArgumentError(
                "the parameters are FSDP2 shards (DTensors) but the basis holds the whole of P: load it with "
                "Basis.from_store(path, name, model=model) on every rank, so that it holds this rank's rows")
        if basis.sharded and not all(shards):
            raise InvalidArgumentError(
                "the basis holds one rank's rows of P of an FSDP2 model (from_store(..., model=)), but the "
                "parameters given are not all FSDP2 shards (DTensors): pass that model's parameters. After a "
                "forward under no_grad (an evaluation) FSDP2 leaves the root's parameters gathered: call "
                "model.reshard() before building the optimizer")
        self._slots = match_params(basis, [local(p) for p in self.params], self.param_groups[0].get("param_names"))
        if basis.sharded:
            self._check_shards()
        self.process_group = resolve_group(process_group, basis.sharding.group if basis.sharded else None)
        if not same_everywhere(basis.fingerprint().to(basis.device), self.process_group):
            raise LayoutMismatchError(
                "the ranks of the job hold different bases (another extraction replaced the subspace between their "
                "loads, or they loaded different names): load it again on every rank, once no extraction is running")

    @property
    def params(self) -> list[torch.Tensor]:
        return self.param_groups[0]["params"]

    @property
    def subspace_state(self) -> dict[str, Any]:
        """The optimizer state (tensors in the subspace), stored under the first parameter."""
        return self.state[self.params[0]]

    def _check_shards(self) -> None:
        """Refuse shards that are not the rows the basis was loaded for (another sharding of the model)."""
        for i, j in enumerate(self._slots):
            if j is None:
                continue
            name = self.basis.layout.specs[i].name
            rows, expected = shard_rows(name, self.params[j]), self.basis.sharding.rows[i]
            if rows != expected:
                raise LayoutMismatchError(
                    f"parameter {name!r} holds dim-0 rows {rows} on this rank, but the basis was loaded for rows "
                    f"{expected}: another sharding of the model. Load it with Basis.from_store(..., model=) of this "
                    "model")

    def trainable(self) -> list[torch.Tensor | None]:
        """Per basis tensor (layout order): the parameter to update, or None (not passed, or frozen)."""
        return [None if j is None or not self.params[j].requires_grad else self.params[j] for j in self._slots]

    def updated(self, params: list[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
        """Per basis tensor: the trainable parameter if it has a gradient now, else None (not written)."""
        params = self.trainable() if params is None else params
        return [None if p is None or p.grad is None else p for p in params]

    def grads(self, params: list[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
        """Per basis tensor: the gradient (this rank's shard of it) of a trainable parameter, else None
        (no gradient counts as zero)."""
        params = self.trainable() if params is None else params
        return [None if p is None else local(p.grad) for p in params]

    @staticmethod
    def local(params: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Per basis tensor: what this rank writes (a DTensor's local shard; a plain tensor itself)."""
        return [local(p) for p in params]

    def project(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        """g̃ = Pᵀg (d,) float64 of the whole model: summed over the ranks when the basis is sharded."""
        g = self.basis.project(grads)
        if self.basis.sharded:
            all_reduce_sum_(g, self.process_group)
        elif self.process_group is not None:  # replicated: equal up to rounding; make it exactly equal
            all_reduce_sum_(g, self.process_group).div_(world_size(self.process_group))
        return g

    def _init_state(self) -> dict[str, Any]:
        state = self.subspace_state
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float64)
            state["basis_fingerprint"] = self.basis.fingerprint()
        return state

    _per_param_keys: tuple[str, ...] = ()  # state kept per parameter (torch's casts are right for those)
    hyperparameters: tuple[str, ...] = ()  # a subclass's defaults' keys: a state holding another's is refused

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict`; float64 subspace state stays float64, and hyperparameters a state
        saved by an earlier version lacks take this optimizer's defaults."""
        saved_keys = {k for group in state_dict.get("param_groups", []) for k in group}
        others = set().union(*(c.hyperparameters for c in _subclasses(SubspaceOptimizer))) - set(self.defaults)
        foreign = saved_keys & others  # another subspace optimizer's own keys (a scheduler's initial_lr is no sign)
        if foreign:
            raise InvalidArgumentError(
                f"this optimizer state was saved by another optimizer: its hyperparameters {sorted(foreign)} are not "
                f"{type(self).__name__}'s ({sorted(self.defaults)}); load it into the optimizer that saved it "
                "(a SubspaceSGD state into SubspaceSGD, a SubspaceBFGS state into SubspaceBFGS)")
        saved = state_dict["state"].get(0, {})
        fingerprint = saved.get("basis_fingerprint")
        if fingerprint is not None:
            fingerprint = fingerprint.cpu().double()
            legacy = fingerprint.numel() == 3  # saved by an earlier version: a hash of the first 64 rows only
            same = torch.equal(fingerprint, self.basis.legacy_fingerprint() if legacy else self.basis.fingerprint())
            if not same and not legacy and (earlier := self.basis.earlier_fingerprint()) is not None:
                same = torch.equal(fingerprint, earlier)  # saved before the digest became sha256-128
            if not agree(same, self.process_group, self.basis.device):  # every rank raises, or none
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
        for p in self.params:  # per-parameter state was saved per rank: its shapes must be this rank's shards
            for key, value in self.state.get(p, {}).items():
                if key in self._per_param_keys and isinstance(value, torch.Tensor) and value.shape != local(p).shape:
                    raise LayoutMismatchError(
                        f"optimizer state {key!r} has shape {tuple(value.shape)}, but this rank's parameter is "
                        f"{tuple(local(p).shape)}: the state was saved by another rank or another sharding")
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
