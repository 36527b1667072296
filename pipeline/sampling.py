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

A trailing group shorter than K is left out (the extraction logs them and records them in the
``sampling_left_out`` attribute). Each policy is a linear map of the snapshots, X' = X A with X (n, t_S)
the snapshots as columns and A (t_S, t') whose columns sum to 1: the sampled trajectory is never written
anywhere. Its shifted Gram is Aᵀ G A from the cached Gram G, and its basis P = X (A V Λ^{-1/2}) is read in
one pass (dldr.py). A is never formed either (:meth:`Sampling.matrix` is the dense reference, for tests):
Aᵀ is applied to rows as the EMA's recurrence or a reshape-mean over windows (:meth:`~Sampling.apply_to_block`,
O(t·S) per block instead of the dense t²·S) and A to small weights by the reverse recurrence
(:meth:`~Sampling.to_snapshots`); tasks receive the Sampling (β, K), a few bytes, not a (t, t') matrix.
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
        """A (t, t') float64: sampled row j = Σ_i A[i, j] x_i. Every column sums to 1 (an average).

        The dense reference (tests, small t): the extraction uses :meth:`apply_to_block` / :meth:`to_snapshots`."""
        beta = float(self.smooth or 0.0)
        if self.window is None:
            if not beta:
                return np.eye(t)
            i = np.arange(t)
            lag = i[None, :] - i[:, None]  # (t, t): column j, row i -> j - i
            a = np.where(lag >= 0, (1 - beta) * beta ** np.maximum(lag, 0), 0.0)
            a[0, :] = beta ** i  # the EMA starts from x_0: y_j = β^j x_0 + Σ_{0<i<=j} (1-β) β^(j-i) x_i
            return a
        groups = self.groups(t)
        a = np.zeros((t, len(groups)))
        weights = self.window_weights()
        for j, (lo, hi) in enumerate(groups):
            a[lo:hi, j] = weights
        return a

    def window_weights(self) -> np.ndarray:
        """(K,) float64, summing to 1: each window's row is Σ_m w_m x_{lo+m} (mean, or the restarted EMA)."""
        k, beta = self.window or 1, float(self.smooth or 0.0)
        if self.smooth is None:
            return np.full(k, 1.0 / k)  # the window's mean
        m = np.arange(k)
        weights = (1 - beta) * beta ** (k - 1 - m)
        weights[0] = beta ** (k - 1)  # the EMA restarts at the window's first snapshot
        return weights

    def apply_to_block(self, block: np.ndarray) -> np.ndarray:
        """Aᵀ block without forming A: the t selected rows (t, S) become the t' sampled rows (t', S), float64.

        The EMA is its recurrence over the rows (O(t·S), row by row: rows are contiguous); windows are a
        reshape and a weighted sum over each window's K rows (the trailing rows that fill no window are left out). Equal to ``matrix(t).T @ block``
        to rounding (tests/test_sampling.py)."""
        t = block.shape[0]
        if self.window is None:
            beta = float(self.smooth or 0.0)
            if not beta:
                return block
            out = np.multiply(block, 1.0 - beta, dtype=np.float64)  # (t, S)
            out[0] = block[0]
            for i in range(1, t):  # y_0 = x_0, y_i = β y_{i-1} + (1 - β) x_i; rows are contiguous: one pass
                out[i] += beta * out[i - 1]
            return out
        k = self.window
        rows = self.rows_out(t)
        grouped = block[:rows * k].reshape(rows, k, *block.shape[1:])  # (t', K, S)
        return np.tensordot(self.window_weights(), grouped, axes=(0, 1))  # (t', S)

    def apply_to_gram(self, g: np.ndarray) -> np.ndarray:
        """Aᵀ G A (t', t') of a symmetric (t, t) Gram G of the selected rows: the sampled rows' Gram."""
        return self.apply_to_block(self.apply_to_block(g).T).T  # Aᵀ G (t', t), then Aᵀ (G A) = (Aᵀ G A)ᵀ

    def to_snapshots(self, w: np.ndarray, t: int) -> np.ndarray:
        """A w without forming A: weights of the t' sampled rows (t', ...) as weights of the t selected
        snapshots (t, ...), float64 (rows left out by the window get 0). The basis pass reads snapshots, so
        its coefficients A V Λ^{-1/2} and mean weights A 1/t' are computed this way."""
        w = np.asarray(w, np.float64)
        if self.window is None:
            beta = float(self.smooth or 0.0)
            if not beta:
                return w
            s = w.copy()  # s_i = w_i + β s_{i+1}, from the last row back; (A w)_0 = s_0, (A w)_i = (1 - β) s_i
            for i in range(len(s) - 2, -1, -1):
                s[i] += beta * s[i + 1]
            out = (1.0 - beta) * s
            out[0] = s[0]
            return out
        k = self.window
        out = np.zeros((t, *w.shape[1:]))
        spread = self.window_weights().reshape(1, k, *([1] * (w.ndim - 1))) * w[:, None]  # (t', K, ...)
        out[:w.shape[0] * k] = spread.reshape(w.shape[0] * k, *w.shape[1:])
        return out

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
