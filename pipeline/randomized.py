"""Randomized range finder in snapshot space, for t in the thousands (Halko, Martinsson, Tropp 2011).

Every pass is one task per column block with memory bounded by the block, as in gram.py:

1. sketch:  Y = C D Ω  (t, k') with Ω (n, k') Gaussian, generated per block from a seed;
2. q power iterations:  Y ← C D (Dᵀ Y), one pass each;
3. Q = orth(Y);  B Bᵀ = Qᵀ C D Dᵀ C Q  (k', k'), one pass; eigh gives U_B and S²;
4. left singular vectors u = Q U_B, and the basis pass of dldr.py writes P = Dᵀ u S^{-1}.

Cost: (3 + q) passes of t·n·k' flops instead of the Gram's t²·n.
"""
from __future__ import annotations

import functools

import numpy as np

from trajstore import TrajectoryStore

from .compute import Progress, StopFlag, run_tasks
from .gram import SUB_BLOCK, block_columns, column_blocks, read_rows


def _sketch_task(reader, rows, c0, c1, k, seed, y) -> tuple[np.ndarray, float]:
    """One block's share of C D Ω (or of C D Dᵀ Y when ``y`` is given), and of ‖C D‖_F²."""
    x = read_rows(reader, rows, c0, c1)
    out = np.zeros((len(rows), k), np.float64)
    sq = 0.0
    for s0 in range(0, c1 - c0, SUB_BLOCK):
        d = x[:, s0:s0 + SUB_BLOCK].astype(np.float64)
        d -= d.mean(axis=0)  # C D: centring in snapshot space, per column
        sq += float(np.einsum("ij,ij->", d, d))
        if y is None:
            omega = np.random.default_rng([seed, c0 + s0]).standard_normal((d.shape[1], k))
            out += d @ omega
        else:
            out += d @ (d.T @ y)
    return out, sq


def _bbt_task(reader, rows, c0, c1, q) -> np.ndarray:
    x = read_rows(reader, rows, c0, c1)
    out = np.zeros((q.shape[1], q.shape[1]), np.float64)
    for s0 in range(0, c1 - c0, SUB_BLOCK):
        d = x[:, s0:s0 + SUB_BLOCK].astype(np.float64)
        d -= d.mean(axis=0)
        b = q.T @ d  # (k', S)
        out += b @ b.T
    return out


def randomized_spectrum(store: TrajectoryStore, rows: list[int], k: int, *, scheduler: object = None,
                        block_size: int | None = None, n_power_iter: int = 2, seed: int = 0,
                        progress: Progress | None = None, stop: StopFlag | None = None
                        ) -> tuple[np.ndarray, np.ndarray, float]:
    """Top-k eigenpairs of the centred Gram without forming it: (λ (k,), V (t_S, k), trace)."""
    t = len(rows)
    k = min(k, t - 1)
    oversample = min(t - 1, k + 10)
    reader = store.reader()
    blocks = column_blocks(store.n_columns, block_columns(store, block_size))
    passes = 2 + n_power_iter
    done = {"passes": 0}

    def run(make):
        tasks = [functools.partial(make, c0, c1) for c0, c1 in blocks]
        base = done["passes"] * len(blocks)
        result = run_tasks(tasks, scheduler,
                           (lambda j, total: progress(base + j, passes * len(blocks))) if progress else None, stop)
        done["passes"] += 1
        return result

    parts = run(lambda c0, c1: _sketch_task(reader, rows, c0, c1, oversample, seed, None))
    y = sum(p[0] for p in parts)
    total = sum(p[1] for p in parts)
    for _ in range(n_power_iter):
        y, _ = np.linalg.qr(y)
        parts = run(lambda c0, c1, y=y: _sketch_task(reader, rows, c0, c1, oversample, seed, y))
        y = sum(p[0] for p in parts)
    q, _ = np.linalg.qr(y)  # (t, k')
    bbt = sum(run(lambda c0, c1: _bbt_task(reader, rows, c0, c1, q)))
    lam, ub = np.linalg.eigh((bbt + bbt.T) / 2)
    order = np.argsort(lam)[::-1][:k]
    lam = np.clip(lam[order], 0.0, None)
    vec = q @ ub[:, order]  # (t, k) left singular vectors of C D
    return lam, vec, total
