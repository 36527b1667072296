"""Optional dependencies (the package's extras), imported on first use with a clear error when missing."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``; MissingDependencyError naming the pip command when it is not installed.

    ``extra`` is the ``trajstore`` extra that provides it (``safetensors``), ``purpose`` what it is
    needed for (``to write .safetensors files``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".", 1)[0]
        raise MissingDependencyError(
            f"{purpose} needs the optional package {top!r}, which is not installed ({exc}); install it with "
            f"`pip install {top}` (or `pip install 'trajstore[{extra}]'`)") from None
