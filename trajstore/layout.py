"""ParamLayout: how a model's named tensors map onto one flat vector of length n."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

import numpy as np

from ._lazy import is_module, is_tensor, torch as _torch
from .errors import InexactValuesError, LayoutMismatchError

if TYPE_CHECKING:
    import torch

_PREFIXES = ("module.", "_orig_mod.")
# state_dict entries that are running statistics, not trainable parameters
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def strip_prefixes(name: str) -> str:
    """Drop DataParallel / DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name.replace("._orig_mod.", ".").replace(".module.", ".")


def is_buffer_name(name: str, tensor: torch.Tensor | None = None) -> bool:
    """Heuristic for state_dicts without a model: BN statistics and integer tensors are buffers."""
    if tensor is not None and not tensor.is_floating_point():
        return True
    return name.rsplit(".", 1)[-1] in _BUFFER_SUFFIXES


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of the layout."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


class ParamLayout:
    """Names, shapes, dtypes and offsets of the tensors that make up the flat vector.

    ``aliases`` maps the other names of tied tensors (GPT-2's ``lm_head.weight``) to the one name
    the layout stores them under (``wte.weight``): a tied tensor counts once, as in
    ``nn.Module.named_parameters()``.
    """

    def __init__(self, specs: Iterable[TensorSpec], aliases: Mapping[str, str] | None = None):
        self.specs: tuple[TensorSpec, ...] = tuple(specs)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise LayoutMismatchError("duplicate tensor names in layout")
        sizes = [s.numel for s in self.specs]
        self.offsets: tuple[int, ...] = tuple(int(x) for x in np.concatenate([[0], np.cumsum(sizes)]))
        self._index = {s.name: i for i, s in enumerate(self.specs)}
        self.aliases: dict[str, str] = dict(aliases or {})  # alias name -> name of the stored tensor
        for alias, target in self.aliases.items():
            if not isinstance(alias, str) or target not in self._index or alias in self._index:
                raise LayoutMismatchError(f"alias {alias!r} -> {target!r} does not name another tensor of the layout")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "ParamLayout":
        """Layout of ``module.named_parameters()`` in registration order (prefixes stripped); the
        later names of a tied parameter become aliases."""
        return cls._deduped(module.named_parameters(remove_duplicate=False), id)

    @classmethod
    def buffers_of(cls, module: torch.nn.Module) -> "ParamLayout":
        """Layout of the module's buffers (BN running statistics and the like)."""
        return cls._deduped(module.named_buffers(remove_duplicate=False), id)

    @classmethod
    def _deduped(cls, named: Iterable[tuple[str, torch.Tensor]], identity: Callable[[torch.Tensor], object]
                 ) -> "ParamLayout":
        """A layout of the first name of each tensor; later names of a tensor with the same
        ``identity`` become aliases of it."""
        specs: list[TensorSpec] = []
        first_name: dict[object, str] = {}
        aliases: dict[str, str] = {}
        for key, tensor in named:
            name, ident = strip_prefixes(key), identity(tensor)
            if ident in first_name:
                if name != first_name[ident]:
                    aliases.setdefault(name, first_name[ident])
            else:
                first_name[ident] = name
                specs.append(_spec(name, tensor))
        return cls(specs, aliases)

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], param_names: Iterable[str] | None = None
    ) -> tuple["ParamLayout", "ParamLayout"]:
        """Split a state_dict into (parameter layout, buffer layout).

        Keys that hold one tensor (same storage, offset, shape and strides: tied weights in a
        ``torch.save``-d state_dict) count once, under the first key; the later keys become aliases.
        With ``param_names`` exactly those keys are parameters (LayoutMismatchError names any the
        state_dict lacks); without, BN statistics and integer tensors count as buffers. A float
        buffer (a positional encoding) cannot be told from a parameter this way: build the layout
        from the model instead.
        """
        tensors = {strip_prefixes(k): v for k, v in state_dict.items() if is_tensor(v)}
        wanted = {strip_prefixes(n) for n in param_names} if param_names is not None else None
        if wanted is not None and wanted - tensors.keys():
            missing = sorted(wanted - tensors.keys())
            raise LayoutMismatchError(
                f"param_names name {len(missing)} tensor(s) the state_dict lacks: {', '.join(missing[:10])}; "
                "pass the names of the model's parameters (e.g. [n for n, _ in model.named_parameters()])")
        every = cls._deduped(tensors.items(), _storage_identity)
        names_of = {s.name: [s.name] for s in every.specs}
        for alias, target in every.aliases.items():
            names_of[target].append(alias)
        if wanted is None:
            params = {s.name for s in every.specs if not is_buffer_name(s.name, tensors[s.name])}
        else:  # a tied tensor is a parameter when param_names names it under any of its names
            params = {s.name for s in every.specs if wanted.intersection(names_of[s.name])}
        return every.subset(params), every.subset(set(names_of) - params)

    def subset(self, names: set[str]) -> "ParamLayout":
        """The layout of the tensors ``names`` (in layout order) and their aliases."""
        return ParamLayout([s for s in self.specs if s.name in names],
                           {a: t for a, t in self.aliases.items() if t in names})

    @classmethod
    def of(cls, source: object) -> "ParamLayout":
        """Layout of a module, a state_dict or a ParamLayout."""
        if isinstance(source, ParamLayout):
            return source
        if is_module(source):
            return cls.from_module(source)
        if isinstance(source, Mapping):
            return cls.from_state_dict(source)[0]
        raise TypeError(f"expected nn.Module, state_dict or ParamLayout, got {type(source).__name__}")

    # -- properties ---------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Length of the flat vector."""
        return self.offsets[-1]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def __len__(self) -> int:
        return len(self.specs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParamLayout) and self.specs == other.specs and self.aliases == other.aliases

    def __repr__(self) -> str:
        return f"ParamLayout({len(self.specs)} tensors, n={self.n})"

    def slice_of(self, name: str) -> slice:
        """The flat-vector slice holding tensor ``name``."""
        i = self._index[name]
        return slice(self.offsets[i], self.offsets[i + 1])

    def storage_dtype(self) -> np.dtype:
        """The widened dtype: float64 when any tensor is float64, else float32 (half types widen exactly).
        Every store of format < 3 holds its rows in it; newer ones hold a model of one half type natively
        (:meth:`value_dtype`)."""
        return np.dtype("float64" if any(s.dtype == "float64" for s in self.specs) else "float32")

    def value_dtype(self) -> str:
        """The dtype a store records these tensors in: ``"float16"`` or ``"bfloat16"`` when every tensor
        has that one half type (stored natively, 2 bytes a value), else :meth:`storage_dtype` (a mixed
        model is widened to float32, which holds every half and float32 value exactly)."""
        kinds = {s.dtype for s in self.specs}
        if len(kinds) == 1 and next(iter(kinds)) in HALF_DTYPES:
            return next(iter(kinds))
        return self.storage_dtype().name

    def dtype_counts(self) -> dict[str, int]:
        """Elements per tensor dtype, e.g. ``{"bfloat16": 1200, "float32": 64}``."""
        counts: dict[str, int] = {}
        for spec in self.specs:
            counts[spec.dtype] = counts.get(spec.dtype, 0) + spec.numel
        return counts

    # -- serialisation ------------------------------------------------------------------
    def to_json(self) -> list[dict]:
        """One entry per tensor; a tied tensor's other names under ``"aliases"`` (absent when none)."""
        items = [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in self.specs]
        for alias, target in self.aliases.items():
            items[self._index[target]].setdefault("aliases", []).append(alias)
        return items

    @classmethod
    def from_json(cls, items: list[dict]) -> "ParamLayout":
        """Inverse of :meth:`to_json`; stores written before aliases existed read as having none."""
        aliases = {}
        for d in items:
            names = d.get("aliases", [])
            if not isinstance(names, list):
                raise ValueError(f"aliases of {d['name']!r} are not a list")
            aliases.update((alias, d["name"]) for alias in names)
        return cls((TensorSpec(d["name"], tuple(d["shape"]), d["dtype"]) for d in items), aliases)

    def with_aliases(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``named`` (a state_dict of this layout) plus each alias key, holding the same tensor object."""
        return {**named, **{alias: named[target] for alias, target in self.aliases.items() if target in named}}

    # -- checks -------------------------------------------------------------------------
    def check_same(self, other: "ParamLayout", what: str = "source") -> None:
        """Raise LayoutMismatchError naming the first tensor where ``other`` differs."""
        for i, mine in enumerate(self.specs):
            if i >= len(other.specs):
                raise LayoutMismatchError(f"{what} lacks tensor {mine.name!r} {mine.shape} of the store's layout")
            theirs = other.specs[i]
            if theirs.name != mine.name or theirs.shape != mine.shape:
                raise LayoutMismatchError(
                    f"{what} tensor #{i} is {theirs.name!r} {theirs.shape}, the store's layout has "
                    f"{mine.name!r} {mine.shape}; record into a new store for a different model"
                )
        if len(other.specs) > len(self.specs):
            extra = other.specs[len(self.specs)]
            raise LayoutMismatchError(f"{what} has tensor {extra.name!r} that the store's layout lacks")

    # -- flatten / unflatten ------------------------------------------------------------
    def tensors_of(self, source: object) -> list[torch.Tensor]:
        """The tensors of ``source`` (module or state_dict) in layout order, checked by name and shape."""
        if is_module(source):
            named = {strip_prefixes(k): v for k, v in source.named_parameters()}
            named.update({strip_prefixes(k): v for k, v in source.named_buffers()})
        elif isinstance(source, Mapping):
            named = {strip_prefixes(k): v for k, v in source.items() if is_tensor(v)}
        else:
            raise TypeError(f"expected nn.Module or state_dict, got {type(source).__name__}")
        out = []
        for spec in self.specs:
            t = named.get(spec.name)
            if t is None:  # a file may keep a tied tensor under another of its names
                t = next((named[a] for a, target in self.aliases.items() if target == spec.name and a in named), None)
            if t is None:
                raise LayoutMismatchError(
                    f"source lacks tensor {spec.name!r} {spec.shape} of the store's layout"
                )
            if tuple(t.shape) != spec.shape:
                raise LayoutMismatchError(
                    f"tensor {spec.name!r} has shape {tuple(t.shape)}, the store's layout has {spec.shape}"
                )
            out.append(t)
        return out

    def flatten_into(self, source: object, out: np.ndarray) -> np.ndarray:
        """Copy ``source`` (module, state_dict, 1-D tensor/array of length n) into ``out`` (n,).

        ``out`` is a float array, or uint16 holding bfloat16 bits (a bfloat16 store's rows). Into a
        narrower ``out`` (float32 from float64, a half type from anything wider) a value is copied only
        when ``out``'s type holds it exactly; otherwise LayoutMismatchError (a store records the model's
        dtype and never rounds silently).
        """
        if isinstance(source, np.ndarray) or is_tensor(source):
            if source.ndim != 1 or source.shape[0] != self.n:
                raise LayoutMismatchError(
                    f"snapshot has shape {tuple(source.shape)}, the store expects a flat vector of length {self.n}"
                )
            if isinstance(source, np.ndarray) and source.dtype == out.dtype and out.dtype.kind == "f":
                np.copyto(out, source)
            else:  # another dtype: torch copies it, and refuses values the store's dtype does not hold
                if isinstance(source, np.ndarray):
                    source = _torch().from_numpy(_torch_compatible(source))
                _copy_exact(torch_view(out), source.detach().reshape(-1), "the flat snapshot")
            return out
        dst = torch_view(out)  # (n,) shares memory with out
        for spec, t, lo, hi in zip(self.specs, self.tensors_of(source), self.offsets, self.offsets[1:]):
            _copy_exact(dst[lo:hi], t.detach().reshape(-1), f"tensor {spec.name!r}")
        return out

    def unflatten(self, flat: np.ndarray) -> dict[str, torch.Tensor]:
        """Split a flat vector (n,) into named tensors of the layout's shapes and dtypes."""
        torch = _torch()
        vec = torch.from_numpy(np.ascontiguousarray(flat))
        return {
            s.name: vec[lo:hi].reshape(s.shape).to(getattr(torch, s.dtype)).clone()
            for s, lo, hi in zip(self.specs, self.offsets, self.offsets[1:])
        }


HALF_DTYPES = ("float16", "bfloat16")  # stored natively when a whole model has one of them
BF16 = "bfloat16"  # no numpy (or zarr v3) type: stored as its uint16 bits, widened to float32 on read


def raw_dtype(values: str) -> np.dtype:
    """The numpy dtype of stored rows of ``values`` (a store's ``dtype``): uint16 bits for bfloat16."""
    return np.dtype(np.uint16) if values == BF16 else np.dtype(values)


def read_dtype(values: str) -> np.dtype:
    """The numpy dtype rows of ``values`` decode to: float32 for bfloat16 (exact), else ``values``."""
    return np.dtype(np.float32) if values == BF16 else np.dtype(values)


def bf16_to_float32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bits (uint16, any shape) widened exactly to float32: the bits are float32's upper half."""
    if out is None:
        out = np.empty(bits.shape, np.float32)
    np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def float32_to_bf16_bits(wide: np.ndarray) -> np.ndarray:
    """Inverse of :func:`bf16_to_float32` (for float32 values widened from bfloat16: the low half is zero)."""
    return (np.ascontiguousarray(wide, np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def finite_mask(raw: np.ndarray, values: str) -> np.ndarray:
    """Which stored values are finite; bfloat16 bits by their exponent (all ones: Inf or NaN)."""
    if values == BF16:
        return (raw & np.uint16(0x7F80)) != np.uint16(0x7F80)
    return np.isfinite(raw)


def _torch_compatible(values: np.ndarray) -> np.ndarray:
    """``values`` (1-D) as an array torch takes, value for value: native byte order, unsigned and bool as
    int64 (exact; a uint64 past int64's range refused); types torch lacks (longdouble, complex, objects)
    refused with LayoutMismatchError rather than rounded."""
    kind, size = values.dtype.kind, values.dtype.itemsize
    if kind == "f" and size in (2, 4, 8) or kind == "i" or kind == "b":
        return np.ascontiguousarray(values, values.dtype.newbyteorder("="))
    if kind == "u":
        if size == 8 and values.size and int(values.max()) > np.iinfo(np.int64).max:
            raise InexactValuesError(f"the flat snapshot holds uint64 values above {np.iinfo(np.int64).max}: the "
                                     "store cannot represent them exactly")
        return np.ascontiguousarray(values, np.int64)
    raise LayoutMismatchError(f"the flat snapshot is of {values.dtype}, which a store cannot record exactly: "
                              "convert it to the store's dtype (float32, float64, float16) first")


def torch_view(out: np.ndarray) -> torch.Tensor:
    """``out`` as a tensor sharing its memory; uint16 is read as bfloat16 bits."""
    torch = _torch()
    if out.dtype == np.uint16:
        return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(out)


def first_inexact(dst: "torch.Tensor", src: "torch.Tensor") -> tuple:
    """(index of the first element ``dst`` (already copied from ``src``) does not hold exactly, or None;
    src and dst as (n,) views to report). Floats compare in float64 (both widen to it exactly; NaN matches
    NaN); integers compare in their own type, since float64 would round both sides of an int64 above 2^53
    alike (a value that overflowed to Inf converts back to garbage, which differs too)."""
    torch = _torch()
    src = src.reshape(-1).to("cpu")
    if not src.is_floating_point() and src.dtype != torch.bool:
        back = dst.reshape(-1).to("cpu").to(torch.float64)
        info = torch.iinfo(src.dtype)
        # only a float inside the integer type's range converts back defined: INT64_MAX rounds to 2^63, which
        # x86 converts to INT64_MIN but aarch64 clamps back to INT64_MAX (equal: accepted, silently inexact)
        fits = back.isfinite() & (back >= float(info.min)) & (back < float(info.max) + 1.0)
        back_int = torch.where(fits, back, torch.zeros_like(back)).to(src.dtype)
        same = fits & (back_int == src)
        return (None if bool(same.all()) else int((~same).nonzero()[0, 0])), src, back
    back, want = dst.reshape(-1).to(torch.float64), src.to(torch.float64)
    same = (back == want) | (back.isnan() & want.isnan())
    return (None if bool(same.all()) else int((~same).nonzero()[0, 0])), want, back


NUMPY_COPY_BYTES = 64 << 20  # CPU tensors up to this size are copied into a snapshot by numpy (see _copy_exact)


def _copy_exact(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    """``dst.copy_(src)``; from another dtype than ``dst``'s (unless a float widening, always exact), only
    values ``dst`` holds exactly: a store records the model's dtype and never rounds silently.

    A CPU tensor of ``dst``'s dtype up to :data:`NUMPY_COPY_BYTES` is copied by numpy: one memcpy on this
    thread. torch's copy_ splits such a copy over its OpenMP threads, which then spin for milliseconds
    after it and take a core from the threads encoding the previous snapshot (bench_record.py's 10M model
    on 2 cores: process CPU 92 -> 77 ms a snapshot). A larger tensor is worth torch's threads."""
    if (src.device.type == "cpu" and src.dtype == dst.dtype and src.dtype != _torch().bfloat16  # numpy: no bfloat16
            and src.numel() * src.element_size() <= NUMPY_COPY_BYTES):
        try:
            np.copyto(dst.numpy(), src.numpy())
            return
        except (RuntimeError, TypeError):  # not viewable by numpy (a sparse or grad-requiring tensor ...)
            pass
    dst.copy_(src)
    widening = src.is_floating_point() and dst.is_floating_point() and src.element_size() < dst.element_size()
    if src.dtype != dst.dtype and not widening:  # float64 -> float32, float16 <-> bfloat16, int -> float ...
        j, want, back = first_inexact(dst, src)
        if j is not None:
            raise InexactValuesError(
                f"{what} holds {src.dtype} values that {dst.dtype} cannot represent exactly (element {j}: "
                f"{float(want[j])!r} would be stored as {float(back[j])!r}): the store records the model's dtype "
                f"{str(dst.dtype).removeprefix('torch.')}. Cast the model back, or record it into a new store")


def _storage_identity(t: torch.Tensor) -> object:
    """Equal for the entries of a state_dict that are one tied tensor: same memory, shape, strides and
    dtype. Meta and empty tensors have no memory of their own: only the same object is the same tensor."""
    if t.device.type == "meta" or t.numel() == 0:
        return id(t)
    return (str(t.device), t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


def _spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, tuple(int(x) for x in tensor.shape), str(tensor.dtype).removeprefix("torch."))
