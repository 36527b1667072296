"""A stand-in module that shows ``TrajectoryStore.create`` an exact parameter / buffer split.

``create(path, source, buffers=True)`` takes the split from a module (named_parameters /
named_buffers) or guesses it from a state_dict by name. Where the split is known but no model
is at hand (an import told by ``like=`` or ``param_names``, a repair rebuilding a store), this
module carries it: meta tensors, no memory, tied names yielded with the same tensor object.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .layout import ParamLayout


class LayoutTemplate(torch.nn.Module):
    """An ``nn.Module`` whose named_parameters / named_buffers are ``layout`` / ``buffers`` (with aliases)."""

    def __init__(self, layout: ParamLayout, buffers: ParamLayout | None = None):
        super().__init__()
        self._named_params = _meta(layout)
        self._named_buffers = _meta(buffers or ParamLayout([]))

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        return _named(self._named_params, remove_duplicate)

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        return _named(self._named_buffers, remove_duplicate)


def _meta(layout: ParamLayout) -> list[tuple[str, torch.Tensor]]:
    """(name, meta tensor) per tensor of ``layout``, then (alias, the same tensor object) per alias."""
    named = {s.name: torch.empty(s.shape, dtype=getattr(torch, s.dtype), device="meta") for s in layout.specs}
    return [*named.items(), *((alias, named[target]) for alias, target in layout.aliases.items())]


def _named(items: list[tuple[str, torch.Tensor]], remove_duplicate: bool) -> Iterator[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    for name, tensor in items:
        if not (remove_duplicate and id(tensor) in seen):
            seen.add(id(tensor))
            yield name, tensor
