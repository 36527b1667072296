"""How :class:`pipeline.basis.Basis` walks its tiles: the products' work is handed one tile at a time (with
the tile's segments, the parts of parameter tensors it holds) to threads on the CPU, or through two device
buffers on CUDA; each thread has its own scratch buffers. A mixin: the basis provides ``_tiles``,
``_blocks`` (segments per tile), ``d``, ``n``, ``dtype``, ``compute_dtype``, ``device``, ``block_rows``,
``layout``, ``_piece_cols``, ``_upcast``, ``_round_tiles``, ``_stream``, ``_buffers`` and ``_scratch``."""
from __future__ import annotations

import threading
from typing import Callable, Iterator, TypeVar

import torch

from .placement import _pool, product_threads

R = TypeVar("R")
Segment = tuple[int, int, int, int, int]  # (tensor index, start in tensor, end, start in tile, end)


class TileWalk:
    """The tile iteration and per-thread scratch buffers behind Basis's two products."""

    def _over_tiles(self, work: "Callable[[torch.Tensor, list[Segment], dict], R]") -> "list[R]":
        """``work(tile (d, cols) on the device, its segments, scratch)`` for every tile, results in the tiles'
        order. On the CPU the tiles are shared out, in contiguous runs, over up to ``torch.get_num_threads()``
        threads (a product call runs on one core: this is how both cores read P); CUDA: one after the other."""
        k = len(self._blocks)
        if k == 0:  # no rows here (an FSDP2 rank whose shards are all empty)
            return []
        workers = min(product_threads(), k) if self.device.type == "cpu" else 1
        inference = torch.is_inference_mode_enabled()  # the caller's: its tensors may be inference tensors

        def run(w: int) -> list:
            scratch = self._scratch_of()
            # grad mode, inference mode and autocast are per thread: the products never record a graph, write
            # the caller's tensors as the caller could, and compute in compute_dtype even inside the caller's
            # autocast (CUDA autocast would run mv in float16)
            with torch.inference_mode(inference), torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                if self._stream is not None:
                    return [work(tile, segs, scratch) for tile, segs in self._iter_cuda()]
                return [work(self._tile(j, scratch), self._blocks[j], scratch)
                        for j in range(w * k // workers, (w + 1) * k // workers)]

        if workers <= 1:
            return run(0)
        futures = [_pool().submit(run, w) for w in range(1, workers)]
        try:
            out = run(0)  # the calling thread takes the first run
        finally:
            done = [f.exception() for f in futures]  # every worker has stopped before anything is raised
        for f, exc in zip(futures, done):
            if exc is not None:
                raise exc
            out.extend(f.result())
        return out

    def _scratch_of(self) -> dict:
        """This thread's buffers: a basis may run products from several threads at once (and the pool's
        threads serve every basis), so buffers are never shared between threads; a new thread's entry
        drops those of threads that have ended."""
        me = threading.get_ident()
        scratch = self._scratch.get(me)
        if scratch is None:
            alive = {t.ident for t in threading.enumerate()}
            for gone in [key for key in self._scratch if key not in alive]:
                self._scratch.pop(gone, None)
            scratch = self._scratch[me] = {}
        return scratch

    @staticmethod
    def _buffer(scratch: dict, key: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """scratch[key], made once: outside inference mode (a buffer made in it could not be written outside)."""
        buf = scratch.get(key)
        if buf is None:
            with torch.inference_mode(False):
                buf = scratch[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def _tile(self, j: int, scratch: dict) -> torch.Tensor:
        """Tile j (d, cols) in :attr:`dtype` where the products run: held, or (a 16-bit basis streamed from
        the float32 memory map) rounded into this worker's buffer, as a held tile was."""
        if not self._round_tiles:
            return self._tiles[j]
        tile = self._buffer(scratch, "tile", (self.d, self.block_rows), self.dtype, torch.device("cpu"))
        return tile.copy_(self._tiles[j])

    def _pieces(self, tile: torch.Tensor, b0: int, b1: int, scratch: dict) -> Iterator[tuple[int, torch.Tensor]]:
        """Columns b0:b1 of a tile as (offset from b0, columns (d, k) in compute_dtype), at most
        :func:`piece_cols` at a time: views of the tile, or a 16-bit tile's pieces upcast to float32
        into this worker's buffer (reused: a fresh allocation per piece costs page faults on the CPU)."""
        step = self._piece_cols
        for a in range(b0, b1, step):
            k = min(b1, a + step) - a
            cols = tile[:, a:a + k]
            if self._upcast:
                up = self._buffer(scratch, "up", (self.d, min(step, self.block_rows)), self.compute_dtype, self.device)
                cols = up[:, :k].copy_(cols)
            yield a - b0, cols

    def _segments_of(self, r0: int, r1: int) -> list[Segment]:
        segs = []
        for i, (lo, hi) in enumerate(zip(self.layout.offsets, self.layout.offsets[1:])):
            a, b = max(lo, r0), min(hi, r1)
            if a < b:
                segs.append((i, a - lo, b - lo, a - r0, b - r0))
        return segs

    def _host_tile(self, j: int) -> torch.Tensor:
        """Tile j (d, cols) in host memory, to copy to the device: held (pinned), or made from the memory map."""
        return self._tiles[j].to(self.dtype) if self._round_tiles else self._tiles[j]

    def _iter_cuda(self) -> Iterator[tuple[torch.Tensor, list[Segment]]]:
        """Double-buffered: copy tile k+1 on a side stream while tile k is used."""
        if self._buffers is None:
            with torch.inference_mode(False):
                self._buffers = [torch.empty((self.d, self.block_rows), dtype=self.dtype, device=self.device)
                                 for _ in range(2)]
        main = torch.cuda.current_stream(self.device)
        ready = [torch.cuda.Event(), torch.cuda.Event()]
        free = [torch.cuda.Event(), torch.cuda.Event()]
        held = [None, None]  # the host tile each copy reads: kept alive until the copy has run

        def prefetch(k: int) -> None:
            slot = k % 2
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(free[slot])
                held[slot] = self._host_tile(k)
                self._buffers[slot].copy_(held[slot], non_blocking=True)
                ready[slot].record(self._stream)

        for slot in (0, 1):
            free[slot].record(main)
        prefetch(0)
        for k in range(len(self._blocks)):
            if k + 1 < len(self._blocks):
                prefetch(k + 1)
            slot = k % 2
            main.wait_event(ready[slot])
            yield self._buffers[slot], self._blocks[k]
            free[slot].record(main)
