"""Synthetic low-rank-plus-noise trajectories written into real stores."""
from __future__ import annotations

import numpy as np

from trajstore import TrajectoryStore
from trajstore.layout import ParamLayout, TensorSpec


def trajectory(t: int, n: int, rank: int = 5, seed: int = 0, noise: float = 1e-4) -> np.ndarray:
    """(t, n) float32: a base point plus ``rank`` directions with well-separated scales, plus noise."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(n)
    dirs = rng.standard_normal((rank, n))
    scales = 10.0 / (2.0 ** np.arange(rank))
    coeffs = rng.standard_normal((t, rank)) * scales
    return (base + 0.01 * coeffs @ dirs + noise * rng.standard_normal((t, n))).astype(np.float32)


def layout(n: int) -> ParamLayout:
    a = n // 3
    return ParamLayout([TensorSpec("layer.weight", (a // 4, 4), "float32"), TensorSpec("layer.bias", (n - a // 4 * 4,), "float32")])


def write_store(path, x: np.ndarray, codec: str = "lossless", chunk: int = 1 << 14, shard: int = 1 << 16,
                close: bool = True) -> TrajectoryStore:
    store = TrajectoryStore.create(path, layout(x.shape[1]), codec=codec, chunk_size=chunk, shard_size=shard,
                                   overwrite=True)
    for i, row in enumerate(x):
        store.append(row, step=10 * i, epoch=i)
    if close:
        store.close()
    else:
        store.flush()
    return store


def max_angle(p: np.ndarray, q: np.ndarray) -> float:
    """Largest principal angle (rad) between span(p) and span(q), sine-based (accurate for small angles)."""
    qo, _ = np.linalg.qr(q.astype(np.float64))
    po, _ = np.linalg.qr(p.astype(np.float64))
    residual = po - qo @ (qo.T @ po)
    return float(np.arcsin(min(1.0, np.linalg.norm(residual, 2))))


def dense_reference(x: np.ndarray, d: int):
    """np.linalg.svd of the centred float64 matrix: (singular values, basis (n, d), shifted Gram)."""
    x64 = x.astype(np.float64)
    w = x64 - x64.mean(axis=0)
    _, s, vt = np.linalg.svd(w, full_matrices=False)
    shifted = x64 - x64[0]
    return s, vt[:d].T, shifted @ shifted.T
