"""ParamLayout: how a model's named tensors map onto one flat vector of length n."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

import numpy as np

from ._lazy import is_module, is_tensor, torch as _torch
from .errors import LayoutMismatchError

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
    """Names, shapes, dtypes and offsets of the tensors that make up the flat vector."""

    def __init__(self, specs: Iterable[TensorSpec]):
        self.specs: tuple[TensorSpec, ...] = tuple(specs)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise LayoutMismatchError("duplicate tensor names in layout")
        sizes = [s.numel for s in self.specs]
        self.offsets: tuple[int, ...] = tuple(int(x) for x in np.concatenate([[0], np.cumsum(sizes)]))
        self._index = {s.name: i for i, s in enumerate(self.specs)}

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "ParamLayout":
        """Layout of ``module.named_parameters()`` in registration order (prefixes stripped)."""
        return cls(_spec(strip_prefixes(k), p) for k, p in module.named_parameters())

    @classmethod
    def buffers_of(cls, module: torch.nn.Module) -> "ParamLayout":
        """Layout of the module's buffers (BN running statistics and the like)."""
        return cls(_spec(strip_prefixes(k), b) for k, b in module.named_buffers())

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], param_names: Iterable[str] | None = None
    ) -> tuple["ParamLayout", "ParamLayout"]:
        """Split a state_dict into (parameter layout, buffer layout).

        With ``param_names`` the split is exact; without, BN statistics and integer tensors
        count as buffers.
        """
        wanted = {strip_prefixes(n) for n in param_names} if param_names is not None else None
        params, buffers = [], []
        for key, value in state_dict.items():
            if not is_tensor(value):
                continue
            name = strip_prefixes(key)
            is_param = (name in wanted) if wanted is not None else not is_buffer_name(name, value)
            (params if is_param else buffers).append(_spec(name, value))
        return cls(params), cls(buffers)

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
        return isinstance(other, ParamLayout) and self.specs == other.specs

    def __repr__(self) -> str:
        return f"ParamLayout({len(self.specs)} tensors, n={self.n})"

    def slice_of(self, name: str) -> slice:
        """The flat-vector slice holding tensor ``name``."""
        i = self._index[name]
        return slice(self.offsets[i], self.offsets[i + 1])

    def storage_dtype(self) -> np.dtype:
        """float64 when any tensor is float64, else float32 (half types widen exactly)."""
        return np.dtype("float64" if any(s.dtype == "float64" for s in self.specs) else "float32")

    # -- serialisation ------------------------------------------------------------------
    def to_json(self) -> list[dict]:
        return [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in self.specs]

    @classmethod
    def from_json(cls, items: list[dict]) -> "ParamLayout":
        return cls(TensorSpec(d["name"], tuple(d["shape"]), d["dtype"]) for d in items)

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
        """Copy ``source`` (module, state_dict, 1-D tensor/array of length n) into ``out`` (n,)."""
        if isinstance(source, np.ndarray) or is_tensor(source):
            if source.ndim != 1 or source.shape[0] != self.n:
                raise LayoutMismatchError(
                    f"snapshot has shape {tuple(source.shape)}, the store expects a flat vector of length {self.n}"
                )
            if isinstance(source, np.ndarray):
                np.copyto(out, source, casting="same_kind")
            else:
                _torch().from_numpy(out).copy_(source.detach().reshape(-1))
            return out
        dst = _torch().from_numpy(out)  # (n,) shares memory with out
        for spec, t, lo, hi in zip(self.specs, self.tensors_of(source), self.offsets, self.offsets[1:]):
            dst[lo:hi].copy_(t.detach().reshape(-1))
        return out

    def unflatten(self, flat: np.ndarray) -> dict[str, torch.Tensor]:
        """Split a flat vector (n,) into named tensors of the layout's shapes and dtypes."""
        torch = _torch()
        vec = torch.from_numpy(np.ascontiguousarray(flat))
        return {
            s.name: vec[lo:hi].reshape(s.shape).to(getattr(torch, s.dtype)).clone()
            for s, lo, hi in zip(self.specs, self.offsets, self.offsets[1:])
        }


def _spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, tuple(int(x) for x in tensor.shape), str(tensor.dtype).removeprefix("torch."))
