"""What an extraction is asked to do, in one object, and the one dim / variance validator.

:class:`ExtractionSettings` is shared by :func:`pipeline.extract_subspace`, ``extract --follow``, the CLI
(which builds it from its options and validates it before any work) and the experiment runner. Its
:meth:`~ExtractionSettings.requested` JSON is recorded with the subspace and is the key an interrupted
extraction is resumed under: a run with other settings (another sampling, say) never reuses its work.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

from trajstore.errors import InvalidArgumentError

from .checks import check_choice, check_fraction, check_int, check_node_name
from .sampling import Sampling

METHODS = ("gram", "randomized")
BASIS_PRECISIONS = ("float64", "float32")  # the basis product P = Dᵀ W; the Gram is always float64
STAGING = "__next__"  # prefix of the name a refresh (extract --follow) writes before it replaces the subspace


def check_dim_variance(dim: object, variance: object) -> None:
    """Exactly one of ``dim`` (an integer >= 1) and ``variance`` (a fraction in (0, 1]); InvalidArgumentError."""
    if (dim is None) == (variance is None):
        raise InvalidArgumentError("give exactly one of dim (--dim) and variance (--variance)")
    if dim is not None:
        check_int("dim", dim, 1)
    if variance is not None:
        check_fraction("variance", variance)


def check_dim_fits(dim: int | None, t: int) -> None:
    """``dim`` (when given) leaves a direction to centring: 1 <= dim <= t − 1 for t sampled rows."""
    if dim is not None and not 1 <= dim <= t - 1:
        raise InvalidArgumentError(
            f"dim must be between 1 and t - 1 = {t - 1} (t = {t} snapshots: centring removes one direction), "
            f"got {dim}")


@dataclass(frozen=True)
class ExtractionSettings:
    """The settings of one extraction (the run-time ones, scheduler, progress, stop, are not part of it)."""

    dim: int | None = None
    variance: float | None = None
    snapshots: "slice | Sequence[int] | None" = None  # a slice or committed indices; None: all
    name: str = "default"
    method: str = "gram"
    block_size: int | None = None
    smooth: float | None = None  # see pipeline/sampling.py
    window: int | None = None
    basis_precision: str = "float64"  # "float32": the basis product in float32 (faster; see pipeline/dldr.py)
    staging: bool = field(default=False, repr=False)  # ``extract --follow`` writes under a reserved name

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.smooth, self.window)

    def validate(self) -> "ExtractionSettings":
        """Every store-independent check, before any work (InvalidArgumentError); returns self."""
        check_choice("method", self.method, METHODS)
        check_node_name("name", self.name[len(STAGING):] if self.staging else self.name)
        check_dim_variance(self.dim, self.variance)
        check_choice("basis_precision", self.basis_precision, BASIS_PRECISIONS)
        if self.block_size is not None:
            check_int("block_size", self.block_size, 1)
        self.sampling.validate()
        chosen = self.snapshots
        if self.sampling.active and chosen is not None and not isinstance(chosen, slice) \
                and any(b <= a for a, b in zip(list(chosen), list(chosen)[1:])):
            raise InvalidArgumentError(
                f"snapshots {list(chosen)} are not in increasing order: --window and --smooth group and average the "
                "snapshots in the order given, which must be the order they were recorded in; sort them")
        if isinstance(self.snapshots, slice) and self.snapshots.step is not None and self.snapshots.step < 1:
            raise InvalidArgumentError(f"the step of snapshots {self.snapshots.start}:{self.snapshots.stop}:"
                                       f"{self.snapshots.step} must be >= 1")
        return self

    def replace(self, **changes) -> "ExtractionSettings":
        return replace(self, **changes)

    def requested(self) -> dict:
        """JSON of what was asked (recorded with the subspace; an interrupted extraction resumes only under
        the same request)."""
        return {"snapshots_requested": selection_json(self.snapshots), "method": self.method,
                "dim_requested": self.dim, "variance_requested": self.variance,
                "sampling": self.sampling.to_json()}


def selection_json(snapshots: "slice | Sequence[int] | None") -> object:
    """The user's snapshot selection as JSON (to recognise the same request on a resume)."""
    if snapshots is None:
        return None
    if isinstance(snapshots, slice):
        return {"slice": [snapshots.start, snapshots.stop, snapshots.step]}
    return [int(i) for i in snapshots]


def _canonical_selection(selection: object) -> object:
    """A recorded selection (:func:`selection_json`) by what it selects: ``2:`` is ``2::1``, ``0:`` is all."""
    if isinstance(selection, dict) and isinstance(selection.get("slice"), list) and len(selection["slice"]) == 3:
        start, stop, step = selection["slice"]
        start, step = 0 if start is None else start, 1 if step is None else step
        return None if (start, stop, step) == (0, None, 1) else ("slice", start, stop, step)
    return selection


def request_differences(found: dict, settings: "ExtractionSettings") -> dict[str, tuple[object, object]]:
    """Where the attributes ``found`` of a recorded subspace differ from the request ``settings``: name ->
    (recorded, requested). Snapshot selections compare by what they select; a subspace recorded before
    ``basis_precision`` existed holds a float64 product."""
    wanted = {**settings.requested(), "basis_precision": settings.basis_precision}
    differ = {}
    for key, value in wanted.items():
        old = found.get(key, "float64" if key == "basis_precision" else None)
        same = (_canonical_selection(old) == _canonical_selection(value) if key == "snapshots_requested"
                else old == value)
        if not same:
            differ[key] = (old, value)
    return differ


def describe_differences(differ: dict[str, tuple[object, object]]) -> str:
    """``"dim_requested 5 (now 8), ..."`` for :func:`request_differences`."""
    return ", ".join(f"{key} {old!r} (now {new!r})" for key, (old, new) in differ.items())


def resolve_snapshots(snapshots: "slice | Sequence[int] | None", t: int) -> list[int]:
    """Committed snapshot indices for a slice / list; refuses anything beyond ``committed``."""
    if snapshots is None:
        rows = list(range(t))
    elif isinstance(snapshots, slice):
        start, stop = snapshots.start, snapshots.stop
        if snapshots.step is not None and snapshots.step < 1:
            raise InvalidArgumentError(f"the step of snapshots {start}:{stop}:{snapshots.step} must be >= 1")
        if (start is not None and start >= t) or (stop is not None and stop > t):
            raise InvalidArgumentError(
                f"snapshots {start}:{stop} reach beyond the {t} committed snapshots")
        rows = list(range(*snapshots.indices(t)))
    else:
        rows = [int(i) for i in snapshots]
        bad = [i for i in rows if not 0 <= i < t]
        if bad:
            raise InvalidArgumentError(f"snapshots {bad} are beyond the {t} committed snapshots (0..{t - 1})")
        if len(set(rows)) != len(rows):
            raise InvalidArgumentError("snapshot indices must be unique")
    if len(rows) < 2:
        raise InvalidArgumentError(f"DLDR needs at least two snapshots, got {len(rows)}")
    return rows


def parse_snapshots(text: str | None) -> "slice | list[int] | None":
    """``"A:B"``, ``"A:B:S"`` (S > 0), ``"1,5,9"`` (indices >= 0) or None; InvalidArgumentError otherwise."""
    if not text:
        return None
    try:
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            if len(parts) > 3 or (len(parts) == 3 and parts[2] is not None and parts[2] < 1):
                raise ValueError
            return slice(*parts)
        rows = [int(p) for p in text.split(",")]
        if min(rows) < 0:
            raise ValueError
        return rows
    except ValueError:
        raise InvalidArgumentError(
            f"--snapshots {text!r} is not a selection: give START:STOP, START:STOP:STEP (STEP >= 1) or a list "
            "i,j,k of snapshot indices >= 0 (e.g. 0:20, 0:40:2 or 0,5,9)") from None
