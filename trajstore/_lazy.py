"""torch, imported only when a torch object is really involved.

Readers (``info``, ``verify``, dask workers computing a Gram) never need torch; keeping it
out of their import saves ~180 MiB of resident memory per process.
"""
from __future__ import annotations

import sys


def torch():
    """The torch module (imported on first use)."""
    import torch as _torch

    return _torch


def is_module(obj: object) -> bool:
    mod = sys.modules.get("torch")
    return mod is not None and isinstance(obj, mod.nn.Module)


def is_tensor(obj: object) -> bool:
    mod = sys.modules.get("torch")
    return mod is not None and isinstance(obj, mod.Tensor)
