"""Optimizer state per snapshot (opt-in, format 3): momentum buffers, Adam moments, step counts.

A store created with ``optimizer_state=True`` records, with every snapshot, the state a
``torch.optim.Optimizer`` keeps per parameter. For each state key K (``momentum_buffer``,
``exp_avg``, ``exp_avg_sq``, ``step``, ...) the group ``optimizer/K`` holds:

* ``values``  (t, n_columns): elementwise state (a tensor of its parameter's shape), in the
  same column layout, chunks and shards as ``params``, in a dtype fixed when the key first appears
  that holds every parameter's dtype and that state's (one half type for all kept natively,
  bfloat16 as its uint16 bits; a mixed model widened to float32, or float64); later state it would
  round is refused (LayoutMismatchError), never stored rounded;
* ``scalars`` (t, P) float64: per-tensor numbers (Adam's ``step``, a 0-d tensor), P = the
  layout's tensors;
* ``present`` (t, P) uint8: 0 no state K for that tensor, 1 in ``values``, 2 in ``scalars``.

Attributes of ``optimizer/K``: ``first_row`` (rows before it hold no state K: the key appeared
there), ``values_dtype``, ``scalar_type`` (``"tensor:float32"``, ``"int"`` or ``"float"``: the widest
kind seen, so a mixed model's 0-d bfloat16 and float32 tensors both read back exactly).
Every row from ``first_row`` on is written for every key (present all 0 when the optimizer had
none), before the snapshot's commit: a committed snapshot has all of its state, checksummed
(crc32c per chunk, like ``params``). Values of absent tensors are 0, never read.

Multi-process recordings refuse optimizer state (InvalidArgumentError): DDP would need rank 0's
copy only, FSDP2 / ZeRO shard it across ranks; record a single process, or save the trainer's
own checkpoints.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import zarr

from ._lazy import is_module, torch as _torch
from .codecs import get_preset
from .errors import CorruptMetadataError, CorruptSnapshotError, InvalidArgumentError, LayoutMismatchError
from .fastread import open_fast
from .format import OPTIMIZER, PARAMS, create_rows
from .layout import (BF16, ParamLayout, TensorSpec, _copy_exact, bf16_to_float32, finite_mask, first_inexact, raw_dtype,
                     strip_prefixes, torch_view)
from .reader import check_unchanged

if TYPE_CHECKING:
    import torch

    from .store import TrajectoryStore

ABSENT, ELEMENTWISE, SCALAR = 0, 1, 2
_SAFE_KEY = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,199}")  # one zarr node name, never '..' or hidden
KINDS = ("values", "scalars", "present")


@dataclass
class KeyRow:
    """One state key of one snapshot, ready to write."""

    present: np.ndarray  # (P,) uint8: ABSENT / ELEMENTWISE / SCALAR
    values: np.ndarray | None = None  # (n_columns,) raw dtype of values_dtype
    values_dtype: str | None = None
    scalars: np.ndarray | None = None  # (P,) float64
    scalar_type: str | None = None


@dataclass
class Captured:
    """An optimizer's per-parameter state at one snapshot, by key."""

    keys: dict[str, KeyRow] = field(default_factory=dict)
    nonfinite: str | None = None  # where a NaN/Inf is, if any


def refuse_multiprocess(what: str) -> InvalidArgumentError:
    """The error a multi-process recording gets for optimizer state."""
    return InvalidArgumentError(
        f"{what}: optimizer state cannot be recorded in a multi-process job (DDP keeps a copy per rank, FSDP2 "
        "and ZeRO shard it): record it from a single process, or keep it in the trainer's own checkpoints "
        "and create the store without optimizer_state")


def param_names(model: "torch.nn.Module", layout: ParamLayout) -> dict[int, str]:
    """id(parameter) -> its name in ``layout`` (tied names resolved to the stored one)."""
    names = {}
    for key, p in model.named_parameters(remove_duplicate=False):
        name = strip_prefixes(key)
        names.setdefault(id(p), layout.aliases.get(name, name))
    return names


def optimizer_params(optimizer: object) -> list:
    """The optimizer's parameters in ``state_dict`` order (group by group)."""
    groups = getattr(optimizer, "param_groups", None)
    if groups is None or not hasattr(optimizer, "state"):
        raise InvalidArgumentError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return [p for group in groups for p in group["params"]]


def capture(optimizer: object, model: object, layout: ParamLayout, columns, dtypes: dict[str, str]) -> Captured:
    """Copy ``optimizer``'s per-parameter state now (the caller's thread: training goes on after).

    ``dtypes``: key -> values dtype of the keys the store already holds (a new key's is chosen
    here and added). Raises InvalidArgumentError for state trajstore cannot record (another
    shape than the parameter's, a list, a complex tensor), naming the key and the tensor."""
    if not is_module(model):
        raise InvalidArgumentError("recording optimizer state needs the model (an nn.Module) as the snapshot "
                                   "source, to name the optimizer's parameters")
    torch = _torch()
    index = {s.name: i for i, s in enumerate(layout.specs)}
    names = param_names(model, layout)
    found: dict[str, list[tuple[int, object]]] = {}
    for p in optimizer_params(optimizer):
        name = names.get(id(p))
        if name not in index:
            raise LayoutMismatchError(f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not one "
                                      "of the model's recorded parameters: pass the optimizer of this model")
        for key, value in optimizer.state.get(p, {}).items():
            if value is None:
                continue
            if not (isinstance(key, str) and _SAFE_KEY.fullmatch(key)) or key in ("c", "zarr.json"):
                raise InvalidArgumentError(f"optimizer state key {key!r} of tensor {name!r} cannot be stored: "
                                           "trajstore records keys of letters, digits, '_', '-' and '.'")
            found.setdefault(key, []).append((index[name], value))
    out = Captured()
    P = len(layout.specs)
    for key, entries in sorted(found.items()):
        row = KeyRow(np.zeros(P, np.uint8))
        tensors = []
        for i, value in entries:
            spec = layout.specs[i]
            if isinstance(value, (bool, np.bool_)) or not (
                    isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, torch.Tensor)):
                raise InvalidArgumentError(f"optimizer state {key!r} of tensor {spec.name!r} is a "
                                           f"{type(value).__name__}; trajstore records tensors of the parameter's "
                                           "shape and per-tensor numbers only")
            if isinstance(value, torch.Tensor) and (value.is_complex() or value.dtype == torch.bool):
                raise InvalidArgumentError(f"optimizer state {key!r} of tensor {spec.name!r} is {value.dtype}; "
                                           "trajstore records real-valued state only")
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                if tuple(value.shape) != spec.shape:
                    raise InvalidArgumentError(
                        f"optimizer state {key!r} of tensor {spec.name!r} has shape {tuple(value.shape)}, not the "
                        f"parameter's {spec.shape}: trajstore records elementwise state (momentum, Adam moments) "
                        "and per-tensor numbers only (a factored optimizer's statistics are not)")
                tensors.append((i, value))
            else:  # a number, or a 0-d tensor (Adam's step; a 0-d parameter's state too)
                if row.scalars is None:
                    row.scalars = np.zeros(P, np.float64)
                kind = (f"tensor:{str(value.dtype).removeprefix('torch.')}" if isinstance(value, torch.Tensor) else
                        "int" if isinstance(value, (int, np.integer)) else "float")
                row.scalar_type = widest_scalar_type(row.scalar_type, kind)  # a mixed model's 0-d tensors
                row.scalars[i] = float(value)  # float64 holds every half, float32 and float64 value exactly
                row.present[i] = SCALAR
        if tensors:
            # a new key's dtype holds every parameter's dtype (the whole layout, not just the tensors with
            # state now: a mixed model's float32 tensors may get state later) and this state's: the layout's
            # rule, one half type kept natively, anything else widened to float32 / float64
            kinds = [TensorSpec(f"{key} of {layout.specs[i].name}", layout.specs[i].shape,
                                str(v.dtype).removeprefix("torch.")) for i, v in tensors]
            row.values_dtype = dtypes.get(key) or ParamLayout(list(layout.specs) + kinds).value_dtype()
            flat = np.zeros(layout.n, raw_dtype(row.values_dtype))  # absent tensors: 0, never read
            dst = torch_view(flat)
            for i, value in tensors:
                lo, hi = layout.offsets[i], layout.offsets[i + 1]
                _copy_state_exact(dst[lo:hi], value.detach().reshape(-1), key, layout.specs[i].name)
                row.present[i] = ELEMENTWISE
            dtypes.setdefault(key, row.values_dtype)  # only once captured: a refused capture fixes nothing
            if out.nonfinite is None and not finite_mask(flat, row.values_dtype).all():
                out.nonfinite = f"optimizer state {key!r}"
            row.values = flat if columns.is_identity else columns.to_stored(flat)
        if row.scalars is not None and out.nonfinite is None and not np.isfinite(row.scalars).all():
            out.nonfinite = f"optimizer state {key!r}"
        out.keys[key] = row
    return out


def widest_scalar_type(a: str | None, b: str) -> str:
    """The ``scalar_type`` that restores numbers of kinds ``a`` and ``b`` without rounding either:
    tensor dtypes promoted (``tensor:bfloat16`` and ``tensor:float32`` give ``tensor:float32``),
    ``int`` and ``float`` give ``float``."""
    if a is None or a == b:
        return b
    torch = _torch()
    tensor_a, tensor_b = a.startswith("tensor:"), b.startswith("tensor:")
    if not tensor_a and not tensor_b:
        return "float"
    as_dtype = (lambda k: getattr(torch, k.removeprefix("tensor:")) if k.startswith("tensor:") else
                torch.int64 if k == "int" else torch.float64)
    return "tensor:" + str(torch.promote_types(as_dtype(a), as_dtype(b))).removeprefix("torch.")


def _copy_state_exact(dst: "torch.Tensor", src: "torch.Tensor", key: str, name: str) -> None:
    """Copy state into the key's stored dtype; LayoutMismatchError for any value it would round."""
    what = f"optimizer state {key!r} of tensor {name!r}"
    torch = _torch()
    if dst.element_size() == 2 or torch.promote_types(src.dtype, dst.dtype) == dst.dtype:
        _copy_exact(dst, src, what)  # widening (exact), or a half type checked value by value
        return
    dst.copy_(src)  # a narrower float dtype than the state's (float64 state, key stored as float32)
    j, want, back = first_inexact(dst, src)
    if j is not None:
        raise LayoutMismatchError(
            f"{what} holds {src.dtype} values that {dst.dtype}, the dtype this store records {key!r} in, cannot "
            f"represent exactly (element {j}: {float(want[j])!r} would be stored as {float(back[j])!r}); record "
            "into a new store (a key's dtype is fixed when it first appears)")


# -- the writer's side ------------------------------------------------------------------------
def arrays(group: zarr.Group) -> list[zarr.Array]:
    """Every per-snapshot array under ``optimizer/`` (to grow with the others)."""
    if OPTIMIZER not in group:
        return []
    root = group[OPTIMIZER]
    return [root[key][kind] for key in sorted(root.group_keys()) for kind in KINDS if kind in root[key]]


def known_dtypes(group: zarr.Group) -> dict[str, str]:
    """key -> values dtype of the keys the store holds elementwise."""
    if OPTIMIZER not in group:
        return {}
    root = group[OPTIMIZER]
    return {key: root[key].attrs["values_dtype"] for key in root.group_keys() if root[key].attrs.get("values_dtype")}


def write_row(group: zarr.Group, i: int, captured: Captured, n_columns: int, n_tensors: int) -> None:
    """Write row ``i`` of every key (the captured ones, and absent rows for every other the store
    holds); runs on the writer thread before the commit."""
    root = group[OPTIMIZER]
    params = group[PARAMS]
    chunk, shard = int(params.chunks[1]), int((params.shards or params.chunks)[1])
    capacity = params.shape[0]
    lossless = get_preset("lossless")
    for key in sorted(set(captured.keys) | set(root.group_keys())):
        row = captured.keys.get(key) or KeyRow(np.zeros(n_tensors, np.uint8))
        node = root[key] if key in root else root.create_group(key, attributes={"first_row": i})
        attrs = node.attrs.asdict()
        if int(attrs.get("first_row", i)) > i:  # truncated back before the key first appeared
            node.attrs["first_row"] = i
        if row.values is not None and "values" not in node:
            create_rows(node, "values", n_columns, raw_dtype(row.values_dtype), chunk, shard, lossless, capacity)
            node.attrs["values_dtype"] = row.values_dtype
        if row.scalars is not None and "scalars" not in node:
            create_rows(node, "scalars", n_tensors, np.dtype(np.float64), n_tensors, n_tensors, lossless, capacity)
            node.attrs["scalar_type"] = row.scalar_type
        elif row.scalars is not None and attrs.get("scalar_type") != row.scalar_type:  # widen (rows in float64: exact)
            wide = widest_scalar_type(attrs.get("scalar_type"), row.scalar_type)
            if wide != attrs.get("scalar_type"):
                node.attrs["scalar_type"] = wide
        if "present" not in node:
            create_rows(node, "present", n_tensors, np.dtype(np.uint8), n_tensors, n_tensors, lossless, capacity)
        if "values" in node:
            values = row.values if row.values is not None else np.zeros(n_columns, node["values"].dtype)
            _writable(node["values"])[i, :] = values
        if "scalars" in node:
            _writable(node["scalars"])[i, :] = row.scalars if row.scalars is not None else np.zeros(n_tensors)
        _writable(node["present"])[i, :] = row.present


def _writable(arr: zarr.Array) -> zarr.Array:
    return arr.with_config({"write_empty_chunks": True})


def row_files(root: Path, i: int) -> list[Path]:
    """The files and folders writing row ``i`` of the optimizer state created or replaced (durable mode)."""
    folder = root / OPTIMIZER
    paths: list[Path] = []
    if not folder.is_dir():
        return paths
    for key in sorted(p for p in folder.iterdir() if p.is_dir()):
        for kind in KINDS:
            row_dir = key / kind / "c" / str(i)
            if row_dir.is_dir():
                paths += sorted(row_dir.iterdir()) + [row_dir, row_dir.parent, key / kind / "zarr.json", key / kind]
        paths += [key / "zarr.json", key]
    return paths + [folder / "zarr.json", folder]


# -- the reader's side ------------------------------------------------------------------------
def keys(store: "TrajectoryStore") -> dict[str, dict]:
    """key -> attributes (first_row, values_dtype, scalar_type) of each recorded state key."""
    if not store.attrs.get("optimizer_state"):
        return {}
    try:
        root = store.group[OPTIMIZER]
        return {key: root[key].attrs.asdict() for key in sorted(root.group_keys())}
    except (KeyError, ValueError, TypeError, AttributeError, ArithmeticError) as exc:
        raise CorruptMetadataError(f"the optimizer state of store {store.path} ({OPTIMIZER}/) is damaged or missing "
                                   f"({type(exc).__name__}: {exc}); run `trajstore verify {store.path}`") from None


def read_row(store: "TrajectoryStore", key: str, kind: str, attrs: dict, i: int, c0: int = 0,
             c1: int | None = None) -> np.ndarray:
    """Columns [c0, c1) of row ``i`` of ``optimizer/key/kind``, checked (crc32c, missing files, the
    layout and dtype the attributes promise); bfloat16 values widened to float32."""
    width = store.n_columns if kind == "values" else len(store.layout.specs)
    raw = raw_dtype(attrs["values_dtype"]) if kind == "values" else np.dtype(
        np.uint8 if kind == "present" else np.float64)
    where = f"{store.path.rstrip('/')}/{OPTIMIZER}/{key}/{kind}"
    reader = open_fast(where, store.storage_options, strict=True, layout_required=True)
    if reader is None:
        raise CorruptMetadataError(f"the optimizer state array {where} is missing or unreadable; run "
                                   f"`trajstore verify {store.path}`")
    if reader.dtype != raw or len(reader.shape) != 2 or reader.shape[1] != width or reader.shape[0] <= i:
        raise CorruptMetadataError(f"the optimizer state array {where}/zarr.json describes shape {reader.shape} of "
                                   f"{reader.dtype}, not rows of {width} {raw} (metadata damaged); restore it from "
                                   "a copy of the store")
    block = reader.read(i, i + 1, c0, width if c1 is None else c1)[0]
    if kind == "values" and attrs["values_dtype"] == BF16:
        return bf16_to_float32(block)
    return block


def read_state(store: "TrajectoryStore", index: int) -> dict[str, dict[str, object]]:
    """Snapshot ``index``'s optimizer state: tensor name -> {key: tensor or number} (tensors absent
    from the optimizer, or without state yet, are left out)."""
    torch = _torch()
    layout = store.layout
    out: dict[str, dict[str, object]] = {}
    for key, attrs in keys(store).items():
        if index < int(attrs.get("first_row", 0)):
            continue
        try:
            present = read_row(store, key, "present", attrs, index)
            if (present > SCALAR).any():
                raise CorruptSnapshotError(f"its 'present' row holds codes {sorted(set(present.tolist()))}", index)
            values = (store.columns.to_global(read_row(store, key, "values", attrs, index))
                      if (present == ELEMENTWISE).any() else None)
            scalars = read_row(store, key, "scalars", attrs, index) if (present == SCALAR).any() else None
        except CorruptSnapshotError as exc:
            raise CorruptSnapshotError(f"the optimizer state {key!r} of snapshot {index} in store {store.path} is "
                                       f"damaged ({exc}); run `trajstore verify {store.path}`", index=index) from None
        dtype = getattr(torch, attrs["values_dtype"]) if attrs.get("values_dtype") else None
        for i, spec in enumerate(layout.specs):
            if present[i] == ELEMENTWISE:
                lo, hi = layout.offsets[i], layout.offsets[i + 1]
                value = torch.from_numpy(np.array(values[lo:hi])).reshape(spec.shape).to(dtype)
            elif present[i] == SCALAR:
                value = _scalar(float(scalars[i]), attrs.get("scalar_type") or "float")
            else:
                continue
            out.setdefault(spec.name, {})[key] = value
    if store.mode == "r":  # a writer may have truncated and rewritten rows since this reader opened
        check_unchanged(store.path, store.storage_options, str(len(store.attrs.get("truncations", []))),
                        str(store.attrs.get("created")))
    return out


def _scalar(value: float, kind: str) -> object:
    if kind.startswith("tensor:"):
        torch = _torch()
        return torch.tensor(value, dtype=getattr(torch, kind.removeprefix("tensor:")))
    return int(value) if kind == "int" else value


def load_into(store: "TrajectoryStore", optimizer: object, model: "torch.nn.Module", index: int) -> None:
    """Give ``optimizer`` (of ``model``'s parameters) the state recorded with snapshot ``index``,
    through its own ``load_state_dict`` (which moves it to each parameter's device and dtype). Its
    param_groups (lr, betas, ...) stay the optimizer's own."""
    state = read_state(store, index)
    names = param_names(model, store.layout)
    params = optimizer_params(optimizer)
    layout_names = set(store.layout.names)
    new = {}
    for i, p in enumerate(params):
        name = names.get(id(p))
        if name not in layout_names:
            raise LayoutMismatchError(f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not one "
                                      f"of the model's parameters recorded in {store.path}")
        if name in state:
            new[i] = state[name]
    expected = _state_keys(optimizer)
    for i, p in enumerate(params):
        want = expected.get(id(p))
        if i in new and want is not None and set(new[i]) != want:
            raise InvalidArgumentError(
                f"snapshot {index} of {store.path} holds optimizer state {sorted(new[i])} for tensor {names[id(p)]!r}; "
                f"this {type(optimizer).__name__} keeps {sorted(want)}: load it into an optimizer of the kind and "
                "settings it was recorded with (nothing was loaded)")
    sd = optimizer.state_dict()
    sd["state"] = new
    optimizer.load_state_dict(sd)


def _state_keys(optimizer: object) -> dict[int, set[str]]:
    """id(parameter) -> the state keys ``optimizer`` keeps for it after a step: its live state where it has
    some, else what one step of a fresh optimizer of its class and group settings creates on a probe
    tensor. Parameters of groups that cannot be probed (an optimizer trajstore cannot rebuild) are left out."""
    torch = _torch()
    out: dict[int, set[str]] = {}
    for group in optimizer.param_groups:
        held = lambda state: {k for k, v in state.items() if v is not None}  # noqa: E731 - as capture skips None
        live = [held(optimizer.state[p]) for p in group["params"] if optimizer.state.get(p)]
        keys = live[0] if live and all(k == live[0] for k in live) else None
        if keys is None and not live:
            try:
                probe = torch.zeros(2, requires_grad=True)
                probe.grad = torch.ones(2)
                settings = {k: v for k, v in group.items() if k != "params"}
                fresh = type(optimizer)([{**settings, "params": [probe]}], **getattr(optimizer, "defaults", {}))
                fresh.step()
                keys = held(fresh.state[probe])
            except Exception:  # noqa: BLE001 - a custom optimizer with other arguments: no check
                keys = None
        for p in group["params"]:
            if optimizer.state.get(p):
                out[id(p)] = held(optimizer.state[p])
            elif keys is not None:
                out[id(p)] = keys
    return out


def check_source(store_has_state: bool, optimizer: object, path: str) -> None:
    """``append``'s check: a store with optimizer state needs ``optimizer=``; one without refuses it."""
    if store_has_state and optimizer is None:
        raise InvalidArgumentError(f"{path} records optimizer state with every snapshot: pass optimizer= to append "
                                   "(Recorder(..., optimizer=opt, record_optimizer_state=True)); nothing was recorded")
    if not store_has_state and optimizer is not None:
        raise InvalidArgumentError(f"{path} was created without optimizer state: create the store with "
                                   "optimizer_state=True to record it, or leave optimizer= out; nothing was recorded")


def check_row(store: "TrajectoryStore", key: str, attrs: dict, i: int, width_bytes: int) -> int:
    """Read row ``i`` of every array of ``key`` checked (CorruptSnapshotError on damage), a column range at
    a time (memory bounded by ``width_bytes``); returns the non-finite values among its present state."""
    present = read_row(store, key, "present", attrs, i)
    if (present > SCALAR).any():
        raise CorruptSnapshotError(f"its 'present' row holds codes {sorted(set(present.tolist()))}", i)
    if (present == ELEMENTWISE).any() and not attrs.get("values_dtype"):
        raise CorruptSnapshotError("its 'present' row names elementwise state, but the key has no values array", i)
    bad = 0
    # values / scalars are created lazily (the first row a tensor's state of that kind appears), so rows
    # between first_row and then have no chunks: read each kind only where 'present' says it is held
    if attrs.get("values_dtype") and (present == ELEMENTWISE).any():
        n = store.n_columns
        width = max(1, width_bytes // 4)
        mask = store.columns.to_stored(np.repeat(present == ELEMENTWISE, np.diff(store.layout.offsets)))  # (n_columns,)
        for c0 in range(0, n, width):
            block = read_row(store, key, "values", attrs, i, c0, min(n, c0 + width))
            bad += int((~np.isfinite(block) & mask[c0:c0 + width]).sum())
    if (present == SCALAR).any():
        scalars = read_row(store, key, "scalars", attrs, i)
        bad += int((~np.isfinite(scalars) & (present == SCALAR)).sum())
    return bad


def problems(store: "TrajectoryStore", rows: int, allowed: np.ndarray, block_bytes: int,
             read_errors: tuple) -> "Iterator[tuple[int | None, str, bool]]":
    """verify's and repair's checks of the optimizer state: every committed row (< ``rows``) of every key
    from its ``first_row`` through :func:`check_row` (checksums, missing files, layout, finiteness). Yields
    (None, a problem of the store, False) for damaged metadata, or (row, its problem, whether the problem is
    non-finite values that ``allowed`` (rows recorded with allow_nonfinite) does not excuse)."""
    if not store.attrs.get("optimizer_state"):
        return
    try:
        found = keys(store)
    except CorruptMetadataError as exc:
        yield None, str(exc), False
        return
    for key, attrs in found.items():
        try:
            first = max(0, int(attrs.get("first_row", 0)))
        except (TypeError, ValueError):
            yield None, (f"the attributes of {store.path}/{OPTIMIZER}/{key}/zarr.json are damaged "
                         f"(first_row {attrs.get('first_row')!r})"), False
            continue
        for i in range(first, rows):
            try:
                bad = check_row(store, key, attrs, i, block_bytes)
            except CorruptMetadataError as exc:
                yield None, str(exc), False
                break
            except read_errors as exc:
                yield i, f"optimizer state {key!r} unreadable: {exc}", False
                continue
            if bad and not allowed[i]:
                yield i, f"optimizer state {key!r}: {bad} non-finite values", True
