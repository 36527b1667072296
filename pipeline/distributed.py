"""torch.distributed for training in a subspace: which rows of P a rank holds, and the group it talks over.

* **Replicated parameters** (a plain module, or DDP): every rank holds all of P; DDP has already
  averaged the gradients, so g̃ = Pᵀg is the same on every rank and needs no communication.
* **FSDP2** (``fully_shard``: every parameter a DTensor placed ``Shard(0)`` on one 1-D mesh): a rank
  holds only the rows of P its local shards cover, g̃ = all_reduce(SUM, Σ_local P_lᵀ g_l) (d floats
  on the wire) and w_local += P_local c needs none.

Process groups follow trajstore's convention: ``"auto"`` is the default group when torch.distributed
is initialised with more than one rank (a sharded basis: its mesh's group), ``None`` no communication.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from trajstore.errors import InvalidArgumentError
from trajstore.layout import ParamLayout, TensorSpec

SUPPORTED = ("FSDP2 parameters sharded as fully_shard does by default: every parameter a DTensor placed "
             "(Shard(0),) on one 1-D device mesh; or replicated parameters (a plain module, or DDP)")


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (FSDP2 parameters and their gradients are)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover -- torch built without distributed
        return False
    return isinstance(t, DTensor)


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The tensor this rank holds: a DTensor's local shard (sharing its storage, so in-place updates
    write the parameter), anything else as it is. Call under ``torch.no_grad()`` to update through it."""
    if t is None or not is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


@dataclass(frozen=True)
class Sharding:
    """The rows of P one rank of an FSDP2 model holds, in the store's layout order.

    ``layout`` has each tensor's *local* shape (a rank may hold an empty shard of a small parameter);
    ``rows[i]`` is ``(r0, r1)``, the dim-0 rows of tensor i that rank holds, and ``ranges[i]`` the same
    as global flat elements ``[off_i + r0 * rowsize_i, off_i + r1 * rowsize_i)``."""

    layout: ParamLayout  # local shapes, (n_local,) in all
    rows: tuple[tuple[int, int], ...]
    ranges: tuple[tuple[int, int], ...]
    group: object  # the mesh's process group

    @property
    def n_local(self) -> int:
        return self.layout.n


def shard_rows(name: str, param: torch.Tensor) -> tuple[int, int]:
    """Dim-0 rows ``[r0, r1)`` of ``param`` (a DTensor) that this rank holds; InvalidArgumentError for
    any placement but ``(Shard(0),)`` on a 1-D mesh."""
    from torch.distributed.tensor import Shard

    mesh, placements = param.device_mesh, tuple(param.placements)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise InvalidArgumentError(
            f"parameter {name!r} is placed {placements} on a {mesh.ndim}-D device mesh; subspace training supports "
            f"{SUPPORTED}. HSDP (a 2-D mesh), Shard(1) (shard_placement_fn) and mixed placements are not supported")
    shard = local(param)
    if param.dim() == 0:
        raise InvalidArgumentError(f"parameter {name!r} is a 0-d DTensor; {SUPPORTED}")
    try:
        from torch.distributed.tensor._utils import (
            compute_local_shape_and_global_offset,
        )

        shape, offset = compute_local_shape_and_global_offset(param.shape, mesh, param.placements)
        r0 = int(offset[0])
    except ImportError:  # pragma: no cover -- the private helper moved: every rank's row count instead
        counts = [0] * mesh.size()
        torch.distributed.all_gather_object(counts, int(shard.shape[0]), group=mesh.get_group())
        shape, r0 = tuple(shard.shape), sum(counts[:mesh.get_local_rank()])
    if tuple(shape) != tuple(shard.shape) or tuple(shard.shape[1:]) != tuple(param.shape[1:]):
        raise InvalidArgumentError(
            f"parameter {name!r}: this rank holds a {tuple(shard.shape)} shard, but its placement gives "
            f"{tuple(shape)}; {SUPPORTED}")
    return r0, r0 + int(shard.shape[0])


def sharding_of(layout: ParamLayout, model: nn.Module) -> Sharding | None:
    """What P a rank of ``model`` needs: None when its parameters are replicated (plain or DDP: all of P),
    else the :class:`Sharding` of its FSDP2 shards. ``layout`` is the store's (global) layout; the model
    must match it (``module.`` / ``_orig_mod.`` prefixes stripped). Raises InvalidArgumentError for an
    unsupported placement, a mix of sharded and replicated parameters, or parameters on several meshes."""
    layout.check_same(ParamLayout.from_module(model), "model")
    params = layout.tensors_of(model)
    sharded = [is_dtensor(p) for p in params]
    if not any(sharded):
        return None
    if not all(sharded):
        plain = next(s.name for s, is_sh in zip(layout.specs, sharded) if not is_sh)
        raise InvalidArgumentError(
            f"parameter {plain!r} is not sharded while others are (DTensors); subspace training supports {SUPPORTED}: "
            "apply fully_shard to the root module too, so that it shards every parameter")
    meshes = {id(p.device_mesh): p.device_mesh for p in params}
    specs, rows, ranges = [], [], []
    for spec, p, off in zip(layout.specs, params, layout.offsets):
        r0, r1 = shard_rows(spec.name, p)
        rowsize = spec.numel // spec.shape[0] if spec.shape[0] else 0
        specs.append(TensorSpec(spec.name, (r1 - r0, *spec.shape[1:]), spec.dtype))
        rows.append((r0, r1))
        ranges.append((off + r0 * rowsize, off + r1 * rowsize))
    if len({tuple(m.mesh.flatten().tolist()) for m in meshes.values()}) > 1:
        raise InvalidArgumentError(f"the parameters are sharded over different device meshes; {SUPPORTED}")
    return Sharding(ParamLayout(specs), tuple(rows), tuple(ranges), next(iter(meshes.values())).get_group())


def resolve_group(process_group: object, sharded_group: object | None = None) -> object | None:
    """The group an optimizer talks over: ``"auto"`` (``sharded_group`` for a sharded basis, else the default
    group when torch.distributed is initialised with more than one rank, else None), ``None`` (none:
    refused for a sharded basis, whose g̃ needs every rank's rows), or a process group."""
    dist = torch.distributed
    if process_group is None:
        if sharded_group is not None:
            raise InvalidArgumentError("a sharded (FSDP2) basis needs its ranks' process group to sum g̃ over: "
                                       "pass process_group='auto' or the mesh's group, not None")
        return None
    if isinstance(process_group, str):
        if process_group != "auto":
            raise InvalidArgumentError(f"process_group must be 'auto', None or a process group, got {process_group!r}")
        if sharded_group is not None:
            return sharded_group
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidArgumentError("process_group was given but torch.distributed is not initialised")
    return process_group


def world_size(group: object | None) -> int:
    return 1 if group is None else torch.distributed.get_world_size(group)


def all_reduce_sum_(tensor: torch.Tensor, group: object | None) -> torch.Tensor:
    """``tensor`` summed over the ranks of ``group``, in place (no-op without a group)."""
    if group is not None:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=group)
    return tensor


def agree(ok: bool, group: object | None, device: torch.device) -> bool:
    """Whether ``ok`` holds on every rank of ``group`` (one all_reduce; True without a group)."""
    if group is None:
        return ok
    t = torch.tensor([0.0 if ok else 1.0], dtype=torch.float64, device=device)
    all_reduce_sum_(t, group)
    return float(t) == 0.0


def same_everywhere(value: torch.Tensor, group: object | None) -> bool:
    """Whether the float64 tensor ``value`` is bitwise the same on every rank of ``group``."""
    if group is None:
        return True
    low, high = value.detach().double().clone(), -value.detach().double()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN, group=group)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MIN, group=group)
    return bool(torch.equal(low, value.double()) and torch.equal(-high, value.double()))


def mean_over_ranks(value: float, group: object | None, device: torch.device) -> float:
    """The mean of every rank's ``value`` (float64; NaN on any rank gives NaN everywhere)."""
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    all_reduce_sum_(t, group)
    return float(t) / world_size(group)


def fsdp_modules(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The FSDP2 modules (``fully_shard`` roots and units) among ``modules``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in modules if isinstance(m, FSDPModule)]


def reshard(modules: Sequence[nn.Module]) -> None:
    """Put FSDP2 modules back to their sharded parameters. A forward without grad leaves the root's
    parameters all-gathered (FSDP2 frees them only in backward), and the next forward would use that
    stale copy after an update of the shards: call this after every forward-only evaluation."""
    for m in modules:
        m.reshard()


@contextmanager
def recording_modules(active: bool = True) -> Iterator[list[nn.Module]]:
    """While active, the modules that run a forward (a global forward pre-hook), in order of first call."""
    seen: dict[int, nn.Module] = {}

    def saw(module: nn.Module, args: tuple) -> None:  # returns None: the inputs stay as they are
        seen.setdefault(id(module), module)

    handle = nn.modules.module.register_module_forward_pre_hook(saw) if active else None
    found: list[nn.Module] = []
    try:
        yield found
    finally:
        if handle is not None:
            handle.remove()
        found.extend(seen.values())
