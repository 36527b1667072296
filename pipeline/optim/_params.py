"""Which optimizer parameter holds which tensor of the basis layout (all of them, or a subset)."""
from __future__ import annotations

from typing import Sequence

import torch

from trajstore.errors import InvalidArgumentError, LayoutMismatchError
from trajstore.layout import ParamLayout, strip_prefixes

from ..basis import Basis

HOW = ("pass model.parameters() (parameters with requires_grad=False stay fixed) or model.named_parameters(), "
       "filtered as you like")


def match_params(basis: Basis, params: Sequence[torch.Tensor], names: Sequence[str] | None = None) -> list[int | None]:
    """For each tensor of ``basis.layout``, the index in ``params`` of the parameter holding it (None: not given).

    * names (``model.named_parameters()``): matched by name (``module.`` / ``_orig_mod.`` stripped; a
      wrapper's leading components, as Lightning's ``net.``, are dropped when the rest names a tensor);
    * as many tensors as the layout: matched in order, as recorded;
    * fewer (e.g. only the trainable ones): matched in order by shape when exactly one placement fits,
      else :class:`InvalidArgumentError` saying how to disambiguate.
    """
    layout = basis.layout
    if names is not None:
        return _by_name(layout, params, names)
    if len(params) >= len(layout.specs):
        basis.check_params(params)  # the recorded order; raises naming the first mismatch
        return list(range(len(layout.specs)))
    return _by_shape(layout, params)


def _by_name(layout: ParamLayout, params: Sequence[torch.Tensor], names: Sequence[str]) -> list[int | None]:
    slots: list[int | None] = [None] * len(layout.specs)
    index = {name: i for i, name in enumerate(layout.names)}
    for j, (name, p) in enumerate(zip(names, params)):
        parts = strip_prefixes(name).split(".")
        found = next((index[".".join(parts[k:])] for k in range(len(parts)) if ".".join(parts[k:]) in index), None)
        if found is None:
            raise LayoutMismatchError(
                f"parameter {name!r} is not a tensor of the basis's layout ({len(index)} tensors, e.g. "
                f"{layout.names[:3]}): the basis was extracted for a different model")
        spec = layout.specs[found]
        if tuple(p.shape) != spec.shape:
            raise LayoutMismatchError(f"parameter {name!r} has shape {tuple(p.shape)}, the basis's {spec.name!r} has "
                                      f"{spec.shape}: the basis was extracted for a different model")
        if slots[found] is not None:
            raise InvalidArgumentError(f"parameters {names[slots[found]]!r} and {name!r} both name the basis's "
                                       f"{spec.name!r}; pass each parameter once")
        slots[found] = j
    return slots


def _by_shape(layout: ParamLayout, params: Sequence[torch.Tensor]) -> list[int | None]:
    """Place params in layout order by shape: the leftmost and rightmost greedy placements agree iff unique."""
    shapes, wanted = [s.shape for s in layout.specs], [tuple(p.shape) for p in params]
    left, i = [], 0
    for j, shape in enumerate(wanted):
        while i < len(shapes) and shapes[i] != shape:
            i += 1
        if i == len(shapes):
            raise LayoutMismatchError(
                f"the optimizer's {len(params)} tensors are not a subset of the basis's {len(shapes)} in order: "
                f"parameter #{j} {shape} fits none after {layout.names[left[-1]] if left else 'the start'!r}; "
                "the basis was extracted for a different model")
        left.append(i)
        i += 1
    right, i = [], len(shapes) - 1
    for shape in reversed(wanted):
        while shapes[i] != shape:
            i -= 1
        right.append(i)
        i -= 1
    right.reverse()
    if left != right:
        j = next(k for k in range(len(left)) if left[k] != right[k])
        could = [layout.names[i] for i in range(left[j], right[j] + 1) if shapes[i] == wanted[j]]
        raise InvalidArgumentError(
            f"the optimizer's {len(params)} parameters fit the basis's {len(shapes)} tensors in more than one way "
            f"(parameter #{j} {wanted[j]} could be any of {could}); {HOW}")
    slots: list[int | None] = [None] * len(shapes)
    for j, i in enumerate(left):
        slots[i] = j
    return slots
