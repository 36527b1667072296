"""P held in column tiles: the layout in which both subspace products read P once, at bandwidth.

The store keeps P (n, d) row-major. The products g̃ = Pᵀg and w += P c read it faster transposed:
a row of Pᵀ is one long contiguous run per subspace direction, so Pᵀg is d dot products and P c is d
axpys over contiguous memory, where the row-major form strides d floats per parameter (measured by
benchmarks/bench_products.py: 2.0-2.6x a read of P row-major against 1.0-1.3x transposed and tiled).

Tiles cut Pᵀ along the parameters: ``tiles[j]`` (d, cols) holds P[j·cols:(j+1)·cols]ᵀ, the last tile
zero-padded. A tile is contiguous, so it is the unit that moves to a device (one copy), that one CPU
thread works on, and after which g̃'s float32 partial sum is folded into float64.
"""
from __future__ import annotations

import numpy as np
import torch


MOVE_BYTES = 64 << 20  # float32 rows of P moved (and transposed) at a time by tiles_of


def tile_count(n: int, cols: int) -> int:
    """Tiles of ``cols`` parameters that cover n."""
    return max(1, -(-n // cols))


def tiles_of(rows: "np.ndarray | torch.Tensor", cols: int, dtype: torch.dtype, *,
             device: "str | torch.device" = "cpu", pin: bool = False) -> torch.Tensor:
    """A new (k, d, cols) tensor holding ``rows`` (n, d) transposed in tiles, in ``dtype`` on ``device``
    (``pin``: page-locked host memory). Read tile by tile: a memory map is never read whole at once."""
    n, d = rows.shape
    k = tile_count(n, cols)
    out = torch.empty((k, d, cols), dtype=dtype, device=device, pin_memory=pin)  # (k, d, cols)
    step = max(1, min(cols, MOVE_BYTES // (d * 4)))  # rows moved at a time: host memory stays bounded
    for j in range(k):
        c0, c1 = j * cols, min(n, (j + 1) * cols)
        for r0 in range(c0, c1, step):
            r1 = min(c1, r0 + step)
            block, dst = rows[r0:r1], out[j, :, r0 - c0:r1 - c0]  # (m, d) -> (d, m)
            if isinstance(block, np.ndarray) and out.device.type == "cpu" and out.dtype == torch.float32:
                np.copyto(dst.numpy(), block.T)  # straight from a (read-only) memory map
                continue
            if isinstance(block, np.ndarray):  # a read-only memory map is copied: torch cannot share it
                block = torch.from_numpy(np.array(block) if not block.flags.writeable else np.ascontiguousarray(block))
            dst.copy_(block.to(out.device).T)  # rows cross as they are, and are transposed where out lives
        if c1 - c0 < cols:
            out[j, :, c1 - c0:].zero_()
    return out


def padded_rows(n: int, d: int, cols: int) -> np.ndarray:
    """An (k·cols, d) float32 buffer whose first n rows can be filled with P, then tiled in place
    by :func:`tile_in_place` (P is then held once, not twice)."""
    return torch.empty((tile_count(n, cols) * cols, d), dtype=torch.float32).numpy()  # aligned as torch aligns


def tile_in_place(buf: np.ndarray, n: int, cols: int) -> torch.Tensor:
    """Turn a :func:`padded_rows` buffer whose first n rows hold P into tiles (k, d, cols), sharing its
    memory: each tile's rows are transposed through a copy of one tile, and the padding is zeroed."""
    rows, d = buf.shape
    k = rows // cols
    flat = torch.from_numpy(buf).view(-1)  # (k·cols·d,)
    tiles = flat.view(k, d, cols)
    buf[n:] = 0
    for j in range(k):
        part = flat[j * cols * d:(j + 1) * cols * d]
        part.copy_(part.view(cols, d).T.contiguous().view(-1))  # (cols, d) -> (d, cols)
    return tiles


def rows_of(tiles: torch.Tensor, n: int, r0: int, r1: int) -> np.ndarray:
    """Rows r0:r1 of P (r1 - r0, d) as float32 numpy, from tiles (k, d, cols) on any device."""
    _, d, cols = tiles.shape
    r1 = min(n, r1)
    out = np.empty((max(0, r1 - r0), d), np.float32)
    at = r0
    while at < r1:
        j, c = divmod(at, cols)
        stop = min(r1, (j + 1) * cols)
        out[at - r0:stop - r0] = tiles[j, :, c:c + stop - at].T.to(device="cpu", dtype=torch.float32).numpy()
        at = stop
    return out


def put_rows(tiles: np.ndarray, r0: int, rows: np.ndarray) -> None:
    """Write rows (k, d) of P, from row r0 on, into their places in tiles (t, d, cols) (numpy, in place)."""
    cols = tiles.shape[2]
    at, end = r0, r0 + rows.shape[0]
    while at < end:
        j, c = divmod(at, cols)
        stop = min(end, (j + 1) * cols)
        tiles[j, :, c:c + stop - at] = rows[at - r0:stop - r0].T
        at = stop
