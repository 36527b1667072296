"""The subspace products on P's column tiles: accuracy against float64, and the same bits whatever
holds P (resident, streamed, memory-mapped) and however many threads share the tiles out."""
import numpy as np
import pytest
import torch

from pipeline.basis import Basis
from pipeline.tiles import padded_rows, rows_of, tile_in_place, tiles_of
from trajstore.layout import ParamLayout, TensorSpec


def _problem(n: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=gen) / n ** 0.5  # (n, d)
    g = torch.randn(n, generator=gen) * 1e-3 + 1e-3  # an offset: the terms do not cancel
    return q, g


def test_projection_of_a_large_tensor_is_accurate_to_float32_pieces():
    """One float32 gemv over a 1M-parameter tensor erred by 2e-5 (relative); pieces folded in float64: ~4e-6."""
    n, d = 1_000_000, 8
    q, g = _problem(n, d)
    basis = Basis(q, ParamLayout([TensorSpec("w", (n,), "float32")]), mode="resident")
    ref = q.double().T @ g.double()  # (d,)
    got = basis.project([g])
    assert got.dtype == torch.float64
    assert float((got - ref).norm() / ref.norm()) < 1e-5


def test_same_bits_resident_streamed_mapped_and_any_thread_count(tmp_path):
    n, d = 300_001, 5
    q, g = _problem(n, d, seed=1)
    layout = ParamLayout([TensorSpec("a", (1000, 200), "float32"), TensorSpec("b", (n - 200_000,), "float32")])
    grads = [g[:200_000].reshape(1000, 200), g[200_000:]]
    np.save(tmp_path / "p.npy", q.numpy())
    mapped = np.load(tmp_path / "p.npy", mmap_mode="r")  # read-only: tiles made as they are read
    bases = [Basis(q, layout, mode="resident", block_rows=65_536), Basis(q, layout, mode="streamed", block_rows=65_536),
             Basis(mapped, layout, mode="streamed", block_rows=65_536)]
    assert bases[0]._tiles is not None
    c = torch.randn(d, dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            for basis in bases:
                lifted = [torch.zeros(1000, 200), torch.zeros(n - 200_000)]
                basis.add_lifted_(lifted, c, alpha=-0.5)
                results.append((basis.project(grads), torch.cat([t.reshape(-1) for t in lifted])))
    finally:
        torch.set_num_threads(threads)
    for i, (g_tilde, w) in enumerate(results[1:]):
        assert torch.equal(g_tilde, results[0][0]) and torch.equal(w, results[0][1]), i + 1
    ref = q.double().T @ g.double()
    assert float((results[0][0] - ref).norm() / ref.norm()) < 1e-5
    want = -0.5 * (q.double() @ c)
    assert float((results[0][1].double() - want).norm() / want.norm()) < 1e-6


@pytest.mark.parametrize("n, cols", [(10, 4), (12, 4), (1, 1), (7, 100)])
def test_tiles_hold_p_transposed_and_give_its_rows_back(n, cols):
    d = 3
    p = np.arange(n * d, dtype=np.float32).reshape(n, d) + 0.5
    tiles = tiles_of(p, min(cols, n), torch.float32)
    assert tiles.shape == (-(-n // min(cols, n)), d, min(cols, n))
    np.testing.assert_array_equal(rows_of(tiles, n, 0, n), p)
    np.testing.assert_array_equal(rows_of(tiles, n, 1, n), p[1:])
    buf = padded_rows(n, d, min(cols, n))
    buf[:n] = p
    in_place = tile_in_place(buf, n, min(cols, n))
    assert torch.equal(in_place, tiles)
    assert in_place.data_ptr() == buf.ctypes.data  # P is held once


def test_grad_mode_is_off_in_every_product_thread():
    """Grad mode is per thread: a product thread that recorded a graph made the optimizer step fail."""
    n, d = 600_000, 4
    q, _ = _problem(n, d)
    w = torch.nn.Parameter(torch.zeros(n))
    basis = Basis(q, ParamLayout([TensorSpec("w", (n,), "float32")]), mode="resident")
    assert len(basis._blocks) > 1
    with torch.no_grad():
        basis.add_lifted_([w], torch.ones(d))
    assert w.grad_fn is None and not torch.equal(w.detach(), torch.zeros(n))
