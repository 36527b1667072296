"""The CLI's choice options as Enums: typer checks them, lists them in ``--help`` and completes them."""
from __future__ import annotations

from enum import Enum


class Method(str, Enum):
    """``extract --method``."""

    gram = "gram"
    randomized = "randomized"


class BasisPrecision(str, Enum):
    """``extract --basis-precision``."""

    float64 = "float64"
    float32 = "float32"


class Optimizer(str, Enum):
    """``train --optimizer``."""

    psgd = "psgd"
    pbfgs = "pbfgs"


class Baseline(str, Enum):
    """``train --baseline`` (repeatable): methods run beside ``--optimizer`` on the same run."""

    sgd = "sgd"
    random_subspace = "random-subspace"
    psgd = "psgd"
    pbfgs = "pbfgs"
    none = "none"


def values(chosen: "list[Enum] | Enum | None") -> "list[str] | str | None":
    """The plain strings of one chosen Enum member or of a list of them (what the API takes)."""
    if chosen is None:
        return None
    if isinstance(chosen, list):
        return [c.value for c in chosen]
    return chosen.value
