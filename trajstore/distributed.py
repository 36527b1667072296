"""Recording from a multi-process job (torch.distributed): who writes what, and agreeing on errors.

When a process group is initialised with more than one rank, :meth:`TrajectoryStore.create`,
:meth:`TrajectoryStore.open` (append), ``append``, ``flush``, ``truncate`` and ``close`` are
collective: every rank calls them, in the same order.

* **Replicated parameters** (DDP, or plain modules): rank 0 writes; the other ranks check their
  arguments and learn rank 0's outcome, so every rank raises the same error or none.
* **Sharded parameters** (FSDP2 ``fully_shard``: DTensors with ``Shard(0)`` on a 1-D mesh): each
  rank writes the elements it holds into a column range of its own (see columns.py), in its own
  background thread; a snapshot is committed by rank 0 only once every rank has written its part.

The background threads talk over a gloo group of their own, and the callers' collectives go over
another: collectives from two threads on one group could interleave differently on each rank.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Callable, TypeVar

from . import errors
from ._lazy import is_module, is_tensor, torch as _torch
from .columns import ColumnMap
from .errors import InvalidArgumentError, LayoutMismatchError, RankFailedError, TrajstoreError
from .layout import ParamLayout, _copy_exact, strip_prefixes, torch_view

if TYPE_CHECKING:
    import numpy as np

T = TypeVar("T")


@dataclass
class RankContext:
    """This process's place in the job: rank, world size, and the groups trajstore talks over."""

    rank: int
    world: int
    group: object  # collectives from the caller's thread
    writer_group: object  # collectives from the background writer thread
    sharded: bool  # parameters are FSDP2 shards: every rank writes its own columns
    tag: str = ""  # names the store in every collective, so ranks in different stores' collectives are caught
    calls: dict = field(default_factory=dict)  # collectives made so far, per group: ranks must agree

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes rows (rank 0 always; every rank when sharded)."""
        return self.sharded or self.rank == 0

    def exchange(self, error: BaseException | None, value: object = None, group: object | None = None,
                 op: str = "") -> list:
        """Collective: raise on every rank the first error any rank had (rank order), else return
        every rank's ``value`` in rank order.

        The rank that had the error re-raises its own exception; the others raise the same trajstore
        error type with the rank named, so every rank stops at the same point. Each exchange carries
        the store, the operation ``op`` and a count of this context's collectives: ranks that reach
        different operations (one appends while another closes) all raise RankFailedError, instead
        of pairing the two silently.
        """
        group = group or self.group
        count = self.calls[id(group)] = self.calls.get(id(group), 0) + 1
        status = None if error is None else (type(error).__name__, str(error))
        gathered: list = [None] * self.world
        try:
            _dist().all_gather_object(gathered, ((self.tag, op, count), status, value), group=group)
        except RuntimeError as exc:  # gloo: a rank never came (timeout) or its process ended
            raise RankFailedError(
                f"rank {self.rank} was in {op or 'a collective call'} on {self.tag or 'a store'} and the other ranks "
                f"did not join it ({str(exc).splitlines()[0][:200]}). Every rank must make the same trajstore calls "
                "in the same order (Recorder, append, flush, truncate, close); one that failed or called them "
                f"alone (under `if rank == 0:`) leaves the others waiting, up to {timeout().seconds} s "
                "(TRAJSTORE_DIST_TIMEOUT)") from None
        where = [call for call, _, _ in gathered]
        if any(call != where[0] for call in where):
            raise RankFailedError(
                "the ranks of the job made different trajstore calls at the same point (the n-th collective call "
                "on a store): " + "; ".join(f"rank {r}: {op or 'a collective'} (#{n}) on {tag}"
                                            for r, (tag, op, n) in enumerate(where))
                + ". Every rank must call create/open (one path), append (with the same step), flush, truncate "
                "(to one length) and close, in the same order")
        for rank, (_, found, _) in enumerate(gathered):
            if found is None:
                continue
            if rank == self.rank and error is not None:
                raise error
            kind = getattr(errors, found[0], None)
            cls = kind if isinstance(kind, type) and issubclass(kind, TrajstoreError) else RankFailedError
            raise cls(f"rank {rank} of the job: {found[1]}")
        return [value for _, _, value in gathered]

    def run_on_zero(self, fn: Callable[[], T], op: str = "", undo: Callable[[T], object] | None = None) -> T | None:
        """Collective: run ``fn`` on rank 0, raise its error on every rank; returns its result on
        rank 0 and None elsewhere. When another rank failed, ``undo(result)`` runs on rank 0 first
        (closing what ``fn`` opened: a store, a lock)."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 -- shared with every rank below
                error = exc
        try:
            self.exchange(error, op=op)
        except BaseException:
            if result is not None and undo is not None:
                undo(result)
            raise
        return result

    def broadcast(self, value: T, op: str = "") -> T:
        """Collective: rank 0's ``value`` on every rank."""
        return self.exchange(None, value, op=op)[0]


def is_alive() -> bool:
    """Whether torch.distributed is still initialised (collectives can run)."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def with_sharding(context: RankContext, sharded: bool) -> RankContext:
    """``context`` for a store whose rows every rank writes (``sharded``) or rank 0 alone."""
    return RankContext(context.rank, context.world, context.group, context.writer_group, sharded, context.tag,
                       context.calls)


def timeout() -> timedelta:
    """How long a rank waits for the others in trajstore's collectives: ``TRAJSTORE_DIST_TIMEOUT`` seconds
    (default 300). Long enough for the slowest rank to write its shards; short enough that a call made by
    one rank alone (under ``if rank == 0:``) ends in an error, not a job stuck for torch's 30 minutes."""
    try:
        seconds = float(os.environ.get("TRAJSTORE_DIST_TIMEOUT", "300"))
    except ValueError:
        raise InvalidArgumentError("TRAJSTORE_DIST_TIMEOUT must be a number of seconds") from None
    return timedelta(seconds=max(1.0, seconds))


def _arrive(context_rank: int, world: int, what: str) -> None:
    """Wait, at most :func:`timeout`, for every rank to reach this point (by the job's key-value store);
    raise RankFailedError naming the ranks that did not. The first contact before trajstore's own groups
    exist: making a group is itself collective, and would wait silently for torch's timeout."""
    global _ARRIVALS
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
    except Exception:  # noqa: BLE001 -- private in torch: without it, no early check
        return
    _ARRIVALS += 1
    key = f"trajstore/arrive/{_ARRIVALS}"
    store.set(f"{key}/{context_rank}", what)
    missing = []
    for rank in range(world):
        try:
            store.wait([f"{key}/{rank}"], timeout())
        except Exception:  # noqa: BLE001 -- a timeout: that rank never came
            missing.append(rank)
    if missing:
        raise RankFailedError(
            f"rank {context_rank} called {what} inside a torch.distributed job of {world} ranks, and rank(s) "
            f"{missing} did not within {timeout().seconds} s: every rank must call it (recording is collective), "
            "or pass process_group=None to record from this rank alone (replicated/DDP parameters only)")


_ARRIVALS = 0


def for_store(context: RankContext, path: str) -> RankContext:
    """Collective: ``context`` for the store at ``path``, with a writers' group of its own (two stores
    recorded at once never interleave their writer threads' collectives) and its own call count."""
    dist = _dist()
    return RankContext(context.rank, context.world, context.group, dist.new_group(backend="gloo", timeout=timeout()),
                       context.sharded, path)


def release(context: RankContext) -> None:
    """Free the store's writers' group (after its writer thread has stopped)."""
    try:
        if is_alive():
            _dist().destroy_process_group(context.writer_group)
    except Exception:  # noqa: BLE001 -- the job may be tearing down; nothing to keep
        pass


_CONTEXTS: dict[int, tuple[object, RankContext]] = {}  # by id of the default group (held: ids are never reused)


def resolve(process_group: object = "auto", source: object = None, what: str = "a trajstore call"
            ) -> RankContext | None:
    """The rank context to record with, or None for a single-process recording.

    ``"auto"`` (or the default group itself): the default group when torch.distributed is initialised
    with more than one rank. ``None``: single-process, even inside a job (only this process records:
    call it so from rank 0 alone). Collective (the first call makes a gloo group) when a context is
    returned: every rank must call it, or the job waits until the gloo timeout.
    """
    if process_group is None:
        return None
    if "torch" not in __import__("sys").modules and process_group == "auto":
        return None  # torch never imported: no process group can exist
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        if process_group != "auto":
            raise InvalidArgumentError("process_group was given but torch.distributed is not initialised")
        return None
    group = dist.group.WORLD
    if process_group != "auto" and process_group is not group:
        # a subgroup's members alone would make trajstore's gloo groups, which puts torch's group count
        # out of step across the job: every later new_group / device mesh would hang
        raise InvalidArgumentError("process_group must be 'auto' (the default group) or None: recording over a "
                                   "subgroup is not supported; record from the whole job, or from one rank with None")
    world = dist.get_world_size(group)
    if world == 1:
        return None
    _arrive(dist.get_rank(group), world, what)
    reshard(source)
    sharded = _is_sharded(source)
    held = _CONTEXTS.get(id(group))
    if held is None or held[0] is not group:  # a new job (re-initialised): new groups
        context = RankContext(dist.get_rank(group), world, dist.new_group(backend="gloo", timeout=timeout()), None,
                              False)
        _CONTEXTS.clear()
        _CONTEXTS[id(group)] = held = (group, context)
    context = held[1]
    return RankContext(context.rank, context.world, context.group, None, sharded)


def reshard(source: object) -> None:
    """Put an FSDP2 module's parameters back in their sharded state: after a forward without gradients
    (an evaluation), fully_shard leaves the root's parameters gathered as plain tensors."""
    if not is_module(source):
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover -- torch without FSDP2
        return
    for module in source.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _dist():
    return _torch().distributed


def copy_into(tensor: "object", value: "object") -> None:
    """``tensor.copy_(value)``; for an FSDP2 shard (DTensor, ``Shard(0)`` on a 1-D mesh) only this rank's
    dim-0 rows of the full ``value`` go into its local tensor."""
    if not _is_dtensor(tensor):
        tensor.copy_(value.to(tensor.dtype))
        return
    from torch.distributed.tensor import Shard

    mesh = tensor.device_mesh
    if mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
        raise InvalidArgumentError(f"cannot load into a tensor placed {tuple(tensor.placements)} on a {mesh.ndim}-D "
                                   "mesh: load the snapshot before sharding the model, or into a plain copy")
    local = tensor.to_local()
    first = mesh.get_local_rank() * -(-value.shape[0] // mesh.size()) if value.dim() else 0
    local.copy_(value[first:first + local.shape[0]].to(local.dtype))


def has_shards(source: object) -> bool:
    """Whether ``source`` (module or state_dict) holds FSDP2 shards (DTensors); never imports torch."""
    return "torch" in __import__("sys").modules and _is_sharded(source)


def _is_sharded(source: object) -> bool:
    """Whether ``source`` (module or state_dict) holds DTensor parameters."""
    return any(_is_dtensor(t) for _, t in _named(source))


def _is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor; never imports torch.distributed.tensor (a DTensor can only exist once
    something imported it, and the import costs a second in every process that records)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _named(source: object) -> list[tuple[str, object]]:
    if is_module(source):
        return [(strip_prefixes(k), v) for k, v in source.named_parameters()]
    if isinstance(source, dict):
        return [(strip_prefixes(k), v) for k, v in source.items() if is_tensor(v)]
    return []


def rank_pieces(layout: ParamLayout, world: int) -> list[list[tuple[int, int]]]:
    """``(global_lo, length)`` of the piece of each tensor every rank holds under ``fully_shard``
    (dim 0 split as ``torch.chunk`` splits it: ceil(rows / world) rows a rank, the last ones fewer
    or none), per rank, in layout order. A pure function: no collective."""
    pieces: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    for spec, lo in zip(layout.specs, layout.offsets):
        rows = spec.shape[0] if spec.shape else 1
        per_row = spec.numel // rows if rows else 0
        size = -(-rows // world)
        for r in range(world):
            r0, r1 = min(rows, r * size), min(rows, (r + 1) * size)
            pieces[r].append((lo + r0 * per_row, (r1 - r0) * per_row))
    return pieces


def check_shards(layout: ParamLayout, source: object, rank: int, world: int) -> None:
    """Raise unless every tensor of ``source`` on this rank is the ``fully_shard`` shard
    :func:`rank_pieces` expects: a DTensor, ``Shard(0)`` on a 1-D mesh of the job's ranks."""
    from torch.distributed.tensor import Shard

    expected = rank_pieces(layout, world)[rank]
    for spec, tensor, (_, length) in zip(layout.specs, _tensors(layout, source), expected):
        if not _is_dtensor(tensor):
            raise LayoutMismatchError(
                f"tensor {spec.name!r} is not an FSDP2 shard (DTensor) on rank {rank}, but this store is recorded "
                "sharded: shard every parameter with fully_shard, as when the store was created")
        mesh = tensor.device_mesh
        if mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),) or mesh.size() != world:
            raise InvalidArgumentError(
                f"tensor {spec.name!r} is placed {tuple(tensor.placements)} on a {mesh.ndim}-D mesh of {mesh.size()} "
                f"ranks; trajstore records FSDP2 shards on dim 0 of a 1-D mesh of all {world} ranks (fully_shard's "
                "default). For HSDP or other placements, record a replicated copy or import DCP checkpoints")
        if mesh.get_local_rank() != rank or tensor.to_local().numel() != length:
            raise LayoutMismatchError(
                f"rank {rank} holds {tensor.to_local().numel()} elements of {spec.name!r}, not the {length} an even "
                f"dim-0 split over {world} ranks gives (mesh rank {mesh.get_local_rank()}): uneven or reordered "
                "shards cannot be recorded")


def _tensors(layout: ParamLayout, source: object) -> list:
    named = dict(_named(source))
    out = []
    for spec in layout.specs:
        t = named.get(spec.name)
        if t is None:
            t = next((named[a] for a, target in layout.aliases.items() if target == spec.name and a in named), None)
        if t is None:
            raise LayoutMismatchError(f"source lacks tensor {spec.name!r} {spec.shape} of the store's layout")
        out.append(t)
    return out


def write_range(columns: ColumnMap, rank: int) -> tuple[int, int]:
    """Columns ``[lo, hi)`` rank ``rank`` writes: its pieces and the padding up to the next rank's."""
    lo = columns.rank_columns[rank][0]
    hi = columns.rank_columns[rank + 1][0] if rank + 1 < len(columns.rank_columns) else columns.n_columns
    return lo, max(lo, hi)


def flatten_local(layout: ParamLayout, source: object, out: "np.ndarray") -> None:
    """Copy this rank's local shard of each tensor of ``source`` into ``out`` (its column range), in
    layout order; the padding after them is set to zero. ``out`` holds the store's dtype (uint16:
    bfloat16 bits); into a half type only values it holds exactly (LayoutMismatchError, like an
    unsharded append: a model cast to float32 after recording into a bf16 store is never rounded)."""
    dst = torch_view(out)
    col = 0
    for spec, tensor in zip(layout.specs, _tensors(layout, source)):
        local = tensor.to_local().detach().reshape(-1)
        _copy_exact(dst[col:col + local.numel()], local, f"this rank's shard of tensor {spec.name!r}")
        col += local.numel()
    dst[col:].zero_()
