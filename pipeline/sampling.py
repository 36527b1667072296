"""Sampling policies of an extraction: window means and EMA smoothing of the selected snapshots.

The paper's code builds its matrix W in one of four modes (``utils/pca.py``): *epoch* (one snapshot per
epoch), *step* (every snapshot), *mean* (one row per epoch, the mean of that epoch's snapshots) and
*smooth* (one row per epoch, an EMA w ← β·w + (1−β)·w_i over that epoch's snapshots, β = 0.8). Here:

- epoch / step, burn-in and stride are a selection of rows: ``snapshots=slice(A, B, S)`` (``--snapshots``);
- ``window=K``: consecutive groups of K selected snapshots, each replaced by its mean (with
  ``every_n_steps`` = steps per epoch / K, one row per epoch: the paper's *mean*);
- ``smooth=β``: the EMA y_0 = x_0, y_i = β·y_{i−1} + (1−β)·x_i over the selected snapshots, one row per
  snapshot; with ``window=K`` too, the EMA restarts at each group's first snapshot and the group's row
  is its last value (the paper's *smooth*, its snapshots taken in chronological order).

A trailing group shorter than K is left out (the extraction says so and records the rows it used).
Each policy is a linear map of the snapshots, X' = X A with X (n, t_S) the snapshots as columns and A
(t_S, t') whose columns sum to 1: the sampled trajectory is never written anywhere. Its shifted Gram is
Aᵀ G A from the cached Gram G, and its basis P = X (A V Λ^{-1/2}) is read in one pass (dldr.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trajstore.errors import InvalidArgumentError


@dataclass(frozen=True)
class Sampling:
    """How the selected snapshots become the rows DLDR sees. ``Sampling()`` leaves them as they are."""

    smooth: float | None = None  # EMA factor β in [0, 1): the weight kept from the previous rows
    window: int | None = None  # K >= 1 consecutive snapshots per row

    def validate(self) -> "Sampling":
        """Check β and K (InvalidArgumentError naming the option); returns self."""
        beta, k = self.smooth, self.window
        if beta is not None and (not isinstance(beta, (int, float)) or isinstance(beta, bool)
                                 or not math.isfinite(beta) or not 0 <= beta < 1):
            raise InvalidArgumentError(
                f"smooth (--smooth) must be an EMA factor β in [0, 1) (0.8 in the paper's code; 1 would never "
                f"take in a new snapshot), got {beta!r}")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise InvalidArgumentError(f"window (--window) must be a positive integer (snapshots per row), got {k!r}")
        return self

    @property
    def active(self) -> bool:
        """Whether this changes the rows at all (``smooth=0`` alone, or ``window=1`` alone, does not)."""
        return bool(self.smooth) or (self.window or 1) > 1

    def groups(self, t: int) -> list[tuple[int, int]]:
        """The ``[lo, hi)`` positions (among the t selected snapshots) behind each sampled row."""
        if self.window is None:
            return [(i, i + 1) if not self.smooth else (0, i + 1) for i in range(t)]
        k = self.window
        return [(lo, lo + k) for lo in range(0, t - k + 1, k)]

    def rows_out(self, t: int) -> int:
        """t': the number of sampled rows from t selected snapshots."""
        return t if self.window is None else t // self.window

    def matrix(self, t: int) -> np.ndarray:
        """A (t, t') float64: sampled row j = Σ_i A[i, j] x_i. Every column sums to 1 (an average)."""
        beta = float(self.smooth or 0.0)
        if self.window is None:
            if not beta:
                return np.eye(t)
            i = np.arange(t)
            lag = i[None, :] - i[:, None]  # (t, t): column j, row i -> j - i
            a = np.where(lag >= 0, (1 - beta) * beta ** np.maximum(lag, 0), 0.0)
            a[0, :] = beta ** i  # the EMA starts from x_0: y_j = β^j x_0 + Σ_{0<i<=j} (1-β) β^(j-i) x_i
            return a
        k, groups = self.window, self.groups(t)
        a = np.zeros((t, len(groups)))
        if self.smooth is None:
            weights = np.full(k, 1.0 / k)  # the window's mean
        else:
            m = np.arange(k)
            weights = (1 - beta) * beta ** (k - 1 - m)
            weights[0] = beta ** (k - 1)  # the EMA restarts at the window's first snapshot
        for j, (lo, hi) in enumerate(groups):
            a[lo:hi, j] = weights
        return a

    def to_json(self) -> dict | None:
        """The attribute recorded with a subspace (None: no sampling)."""
        if self.smooth is None and self.window is None:
            return None
        return {"smooth": self.smooth, "window": self.window}

    @classmethod
    def from_json(cls, value: dict | None) -> "Sampling":
        return cls() if not value else cls(value.get("smooth"), value.get("window"))

    def describe(self) -> str:
        """One line for people: ``"each snapshot"``, ``"means of 5 snapshots"``, ``"EMA β = 0.8 ..."``."""
        if self.window is None and self.smooth is None:
            return "each snapshot"
        if self.window is None:
            return f"EMA of the snapshots, β = {self.smooth:g}"
        if self.smooth is None:
            return f"means of {self.window} consecutive snapshots"
        return f"EMA (β = {self.smooth:g}) over each {self.window} consecutive snapshots"
