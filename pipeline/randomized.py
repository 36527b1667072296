"""A randomized range finder in snapshot space, for t in the thousands (Halko, Martinsson, Tropp 2011).

Our own implementation (not dask's ``svd_compressed``): every pass is one task per column block with
memory bounded by the block (pipeline/blocks.py), on threads or a dask.distributed cluster. With D the
(t', n) sampled snapshots (``transform`` Aᵀ applied per block, see pipeline/sampling.py) and C the
centring over rows:

1. sketch:  Y = C D Ω  (t', k') with Ω (n, k') Gaussian, generated per sub-block from a seed, and ‖C D‖_F²;
2. q power iterations:  Y ← C D (Dᵀ C Y) after an orthonormalisation, one pass each;
3. Q = orth(Y);  B Bᵀ = Qᵀ C D Dᵀ C Q  (k', k'), one pass; eigh gives U_B and S²;
4. the top-k eigenpairs of the centred Gram: λ = S², V = Q U_B; dldr.py then writes P = Dᵀ V Λ^{-1/2}.

Cost: (3 + q) passes of t'·n·k' flops instead of the Gram's t²·n. Every block product is checked to be
finite (damaged data raises NonFiniteError naming the snapshot). After each pass its result is saved in
``checkpoint`` (the unfinished subspace's group), so a killed extraction resumes at the pass it was in and
gives the identical result (the sums run in a fixed block order, Ω is seeded).

Only the top k eigenvalues are computed: the trace ‖C D‖_F² is exact, so their explained-variance ratios
are exact fractions of the whole, and the variance the others hold together is known, but not how it
splits among them (the subspace records NaN for them: see dldr.py).
"""
from __future__ import annotations

import functools

import numpy as np
import zarr

from trajstore import TrajectoryStore

from .blocks import check_finite, plan, read_rows, wide_blocks
from .compute import Progress, StopFlag, run_tasks
from .sampling import Sampling

CHECKPOINT = "_spectrum"  # node of the unfinished subspace's group holding the finished passes


def _sketch_task(reader, rows, transform, k, seed, y, c0, c1) -> tuple[np.ndarray, float]:
    """One block's share of C D Ω (or of C D Dᵀ Y when ``y`` is given), and of ‖C D‖_F²."""
    x = read_rows(reader, rows, c0, c1)  # (t_S, C) float32
    out = np.zeros((len(rows) if transform is None else transform.rows_out(len(rows)), k), np.float64)
    sq = 0.0
    for s0, d in wide_blocks(x, transform=transform, centre=True):  # (t', S) float64: C D
        sq += float(np.einsum("ij,ij->", d, d))
        if y is None:
            omega = np.random.default_rng([seed, c0 + s0]).standard_normal((d.shape[1], k))
            out += d @ omega
        else:
            out += d @ (d.T @ y)
    check_finite(out, x, reader.path, c0, c1, rows)
    return out, sq


def _bbt_task(reader, rows, transform, q, c0, c1) -> np.ndarray:
    """One block's share of Qᵀ C D Dᵀ C Q."""
    x = read_rows(reader, rows, c0, c1)
    out = np.zeros((q.shape[1], q.shape[1]), np.float64)
    for _, d in wide_blocks(x, transform=transform, centre=True):
        b = q.T @ d  # (k', S)
        out += b @ b.T
    check_finite(out, x, reader.path, c0, c1, rows)
    return out


def randomized_spectrum(store: TrajectoryStore, rows: list[int], k: int, *, transform: "Sampling | None" = None,
                        scheduler: object = None, block_size: int | None = None, n_power_iter: int = 2,
                        seed: int = 0, progress: Progress | None = None, stop: StopFlag | None = None,
                        checkpoint: zarr.Group | None = None, info: dict | None = None
                        ) -> tuple[np.ndarray, np.ndarray, float]:
    """Top-k eigenpairs of the centred Gram of the (sampled) rows without forming it.

    Returns (λ (k,) descending, V (t', k), the whole variance ‖C D‖_F²). ``transform`` is the
    :class:`~pipeline.sampling.Sampling` (A (t_S, t') applied per block, never formed) or None;
    ``checkpoint`` a writable group where finished passes are kept (``info``
    receives ``passes_resumed``: how many were found there).
    """
    t = len(rows) if transform is None else transform.rows_out(len(rows))
    k = min(k, t - 1)
    oversample = min(t - 1, k + 10)
    reader = store.reader()
    blocks = plan(store, block_size)
    passes = 2 + n_power_iter
    key = {"rows": list(rows), "transform": None if transform is None else transform.to_json(), "k": oversample,
           "seed": seed, "power_iterations": n_power_iter, "blocks": [list(b) for b in blocks]}
    saved = _Passes(checkpoint, key)
    if info is not None:
        info["passes_resumed"] = saved.done

    def run(index, make):
        if index < saved.done:
            return None
        base = index * len(blocks)
        tasks = [functools.partial(make, c0, c1) for c0, c1 in blocks]
        return run_tasks(tasks, scheduler,
                         (lambda j, total: progress(base + j, passes * len(blocks))) if progress else None, stop)

    parts = run(0, functools.partial(_sketch_task, reader, rows, transform, oversample, seed, None))
    if parts is not None:
        total = float(sum(p[1] for p in parts))
        saved.save(0, sum(p[0] for p in parts), total)
    y, total = saved.load(0)
    for i in range(1, 1 + n_power_iter):
        y, _ = np.linalg.qr(y)
        parts = run(i, functools.partial(_sketch_task, reader, rows, transform, oversample, seed, y))
        if parts is not None:
            saved.save(i, sum(p[0] for p in parts), total)
        y, _ = saved.load(i)
    q, _ = np.linalg.qr(y)  # (t', k')
    parts = run(passes - 1, functools.partial(_bbt_task, reader, rows, transform, q))
    if parts is not None:
        saved.save(passes - 1, sum(parts), total)
    bbt, _ = saved.load(passes - 1)
    lam, ub = np.linalg.eigh((bbt + bbt.T) / 2)
    order = np.argsort(lam)[::-1][:k]
    lam = np.clip(lam[order], 0.0, None)
    vec = q @ ub[:, order]  # (t', k) left singular vectors of C D
    return lam, vec, total


class _Passes:
    """The finished passes' results, kept in ``group/_spectrum`` (or in memory without a group) under ``key``:
    a checkpoint with another key (other rows, sampling, k, seed or blocks) is discarded, never reused."""

    def __init__(self, group: zarr.Group | None, key: dict) -> None:
        self.memory: dict[int, tuple[np.ndarray, float]] = {}
        self.node = None
        self.done = 0
        if group is None:
            return
        if CHECKPOINT in group and group[CHECKPOINT].attrs.get("key") != key:
            del group[CHECKPOINT]
        self.node = group.require_group(CHECKPOINT)
        if "key" not in self.node.attrs:
            self.node.attrs.update({"key": key, "done": 0})
        self.done = int(self.node.attrs["done"])

    def save(self, index: int, value: np.ndarray, total: float) -> None:
        self.memory[index] = (value, total)
        if self.node is None:
            return
        name = f"pass{index}"
        if name in self.node:
            del self.node[name]
        self.node.create_array(name, shape=value.shape, dtype="float64", fill_value=0.0)[...] = value
        self.node.attrs.update({"done": index + 1, "total": total})  # after the array: a kill keeps it consistent
        self.done = index + 1

    def load(self, index: int) -> tuple[np.ndarray, float]:
        if index in self.memory:
            return self.memory[index]
        return self.node[f"pass{index}"][...], float(self.node.attrs["total"])
