"""The reading half of TrajectoryStore: snapshots as arrays, dask arrays, state_dicts and models, and the
optimizer state recorded with them. A mixin: it reads through the store's :meth:`reader`, layouts and
checks (store.py), and writes nothing."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from . import distributed, optstate
from ._lazy import torch as _torch
from .errors import CorruptSnapshotError, InvalidArgumentError
from .fastread import open_fast
from .format import BUFFERS, PARAMS
from .layout import ParamLayout, strip_prefixes

if TYPE_CHECKING:
    import torch


class Reading:
    """Reads of committed snapshots (mixed into :class:`trajstore.store.TrajectoryStore`)."""

    def read(self, index: "int | slice | Sequence[int]") -> np.ndarray:
        """Snapshot ``index`` as (n,), or several as (k, n), decoded to :attr:`dtype` (float32 for a
        bfloat16 store: its values exactly)."""
        self._check_readable()
        t = len(self)
        if isinstance(index, slice):
            r0, r1, step = index.indices(t)
            if r1 <= r0:
                return np.empty((0, self.n_params), self.dtype)
            if step < 0:
                return self.read(list(range(r0, r1, step)))
            return self.columns.to_global(self.reader().read_block(r0, r1)[::step])
        if isinstance(index, (int, np.integer)):
            i = self._check_index(int(index))
            return self.columns.to_global(self.reader().read_block(i, i + 1)[0])
        rows = [self._check_index(int(i)) for i in index]
        reader = self.reader()
        if not rows:
            return np.empty((0, self.n_params), self.dtype)
        return self.columns.to_global(np.stack([reader.read_block(i, i + 1)[0] for i in rows]))

    def to_dask(self, row_block: int | None = None, col_block: int | None = None):
        """The committed snapshots as a dask array (t, n_columns), decoded lazily block by block, in
        stored column order (the parameter order unless the store was recorded sharded: :attr:`columns`)."""
        import dask.array as da

        t = len(self)
        params = self._group[PARAMS]
        col_block = col_block or int(params.shards[1] if params.shards else params.chunks[1])
        if row_block is None:
            row_block = max(1, min(t, (128 << 20) // (col_block * self.dtype.itemsize)))
        k = self.codec.keyframe_interval
        row_block = max(k, row_block - row_block % k)  # xor groups never straddle blocks
        return da.from_array(self.reader(), chunks=(row_block, col_block), asarray=False, lock=False,
                             fancy=False, meta=np.empty((0, 0), self.dtype), name=False)

    def read_buffers(self, index: int) -> dict[str, torch.Tensor]:
        """The buffers (BN running statistics) recorded with snapshot ``index``."""
        if self.buffer_layout is None:
            raise InvalidArgumentError(f"store {self.path} records no buffers (create it with buffers=True)")
        i = self._check_index(index)
        # zarr trusts the array's zarr.json: check it describes the layout trajstore writes first
        open_fast(f"{self.path.rstrip('/')}/{BUFFERS}", self.storage_options, layout_required=True)
        try:
            row = self.array(BUFFERS)[i, :]
        except (ValueError, RuntimeError, OSError, IndexError, ArithmeticError) as exc:  # checksum, decode
            raise CorruptSnapshotError(f"the buffers of snapshot {i} in store {self.path} are damaged "
                                       f"({type(exc).__name__}: {exc}); run `trajstore verify {self.path}`") from None
        return self.buffer_layout.unflatten(row)

    def state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """Snapshot ``index`` as a state_dict of tensors in their original shapes and dtypes.

        A tied tensor appears under each of its names (``wte.weight`` and ``lm_head.weight``), as
        one shared tensor, so a strict ``model.load_state_dict`` takes it.
        """
        sd = self.layout.with_aliases(self.layout.unflatten(self.read(index)))
        if self.buffer_layout is not None:
            sd.update(self.buffer_layout.with_aliases(self.read_buffers(index)))
        return sd

    def load_into(self, model: torch.nn.Module, index: int) -> torch.nn.Module:
        """Copy snapshot ``index`` (and its buffers, if recorded) into ``model`` in place.

        An FSDP2 model (``fully_shard``) gets this rank's rows of each tensor in its local shard (every rank
        reads the snapshot; no collective): call it on every rank."""
        distributed.reshard(model)  # an evaluation forward leaves FSDP2's root gathered: copies there are lost
        self.layout.check_same(ParamLayout.from_module(model), "model")
        sd = self.state_dict(index)
        with _torch().no_grad():
            named = dict(model.named_parameters())
            named.update(dict(model.named_buffers()))
            for key, tensor in named.items():
                value = sd.get(strip_prefixes(key))
                if value is not None:
                    distributed.copy_into(tensor, value)
        return model

    # -- optimizer state ------------------------------------------------------------------
    @property
    def optimizer_state_keys(self) -> list[str]:
        """The optimizer state keys recorded (``["exp_avg", "exp_avg_sq", "step"]``); [] when none."""
        return list(optstate.keys(self))

    def optimizer_state(self, index: int) -> dict[str, dict[str, object]]:
        """The optimizer state recorded with snapshot ``index``: tensor name -> {key: tensor or number}
        (the shape of ``torch.optim.Optimizer.state``, keyed by parameter name). Tensors without state at
        that snapshot (before the first step) are left out."""
        if not self._meta.get("optimizer_state"):
            raise InvalidArgumentError(f"store {self.path} records no optimizer state (create it with "
                                       "optimizer_state=True)")
        self._check_readable()
        return optstate.read_state(self, self._check_index(index))

    def load_optimizer_state(self, optimizer: "torch.optim.Optimizer", model: "torch.nn.Module",
                             index: int) -> "torch.optim.Optimizer":
        """Resume from snapshot ``index``: give ``optimizer`` (built over ``model``'s parameters) the state
        recorded with it, through ``optimizer.load_state_dict`` (moved to each parameter's device and
        dtype). Its param_groups (lr, momentum, betas, ...) stay as constructed. Pair it with
        :meth:`load_into` for the weights."""
        if not self._meta.get("optimizer_state"):
            raise InvalidArgumentError(f"store {self.path} records no optimizer state (create it with "
                                       "optimizer_state=True)")
        self._check_readable()
        optstate.load_into(self, optimizer, model, self._check_index(index))  # reads (checked) before it loads
        return optimizer
