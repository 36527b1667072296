"""Checks of what ``append`` is given: steps, epochs, metrics and the snapshot source."""
from __future__ import annotations

import operator
import re
from typing import Mapping

import numpy as np

from ._lazy import is_module, is_tensor, torch as _torch
from .errors import InvalidArgumentError


def check_source(source: object) -> None:
    """``append`` takes a module, a state_dict, or a flat real-valued (n,) tensor/array."""
    if is_module(source) or isinstance(source, Mapping):
        return  # checked tensor by tensor against the layout
    if isinstance(source, np.ndarray):
        kind = source.dtype.kind
    elif is_tensor(source):
        kind = "c" if source.is_complex() else "b" if source.dtype == _torch().bool else "f"
    else:
        raise InvalidArgumentError(f"append takes an nn.Module, a state_dict or a flat (n,) tensor/array, "
                                   f"not {type(source).__name__}; nothing was recorded")
    if kind not in "fiu":
        raise InvalidArgumentError(f"a snapshot of dtype {source.dtype} holds no real-valued weights; append "
                                   "the model's float parameters (nothing was recorded)")


def metric_key(name: object) -> str:
    """The array name a metric is stored under: every character but letters, digits, ``_``, ``-``
    and ``.`` becomes ``_`` (``train/loss`` -> ``train_loss``): a name is one file-system- and
    zarr-safe path component, whatever the trainer logs (``/``, ``\\``, spaces, NUL)."""
    key = _UNSAFE.sub("_", str(name))
    if not key.strip("._") or key.startswith("__") or key in ("c", "zarr.json") or len(key.encode()) > 200:
        raise InvalidArgumentError(f"metric name {name!r} cannot be stored: use 1 to 200 letters, digits, '_', "
                                   "'-', '.' (not 'c' or 'zarr.json')")
    return key


_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def check_step(value: object, what: str) -> int:
    try:
        if isinstance(value, bool) or value is None:
            raise TypeError
        number = operator.index(value.item() if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 else value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what} must be an integer, got {value!r}") from None
    if not 0 <= number < 1 << 62:
        raise InvalidArgumentError(f"{what} must be a count from 0, got {number}")
    return number


def check_epoch(value: object) -> int:
    return -1 if value is None or (type(value) is int and value == -1) else check_step(value, "epoch")  # -1: none


def check_metrics(metrics: Mapping | None) -> dict[str, float]:
    """Metric values as floats under their stored names; a list, a multi-element tensor or a
    non-number raises InvalidArgumentError naming the metric."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise InvalidArgumentError(f"metrics must be a mapping of names to numbers, got {type(metrics).__name__}")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        key = metric_key(name)
        if key in out:
            raise InvalidArgumentError(f"metric names {sorted(k for k in metrics if metric_key(k) == key)} "
                                       f"would both be stored as {key!r}")
        try:
            if is_tensor(value):  # a 0-d or one-element torch tensor (what a training loop logs)
                if value.numel() != 1 or value.dtype.is_complex or value.dtype == _torch().bool:
                    raise TypeError
                value = value.detach().reshape(-1)[0].item()
            if hasattr(value, "numel") and value.numel() != 1 or np.ndim(value) != 0 and np.size(value) != 1:
                raise TypeError
            if isinstance(value, (str, bytes, bool, np.bool_)) or getattr(value, "dtype", np.dtype("f")).kind not in "iuf":
                raise TypeError
            out[key] = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a meta or sparse tensor
            raise InvalidArgumentError(
                f"metric {name!r} must be one number, got {type(value).__name__} {value!r:.60}") from None
    return out

