"""Codec presets: how a snapshot row is transformed and compressed on its way to disk.

A preset has two halves:

* a *row transform* across snapshots, which zarr cannot express because each zarr chunk
  holds one row: ``plain`` (none), ``xor`` (bits XOR the previous row, a keyframe every K
  rows) or ``delta`` (difference from the reference snapshot, optionally rounded);
* the zarr chunk codecs of the stored rows: Blosc, then a crc32c checksum.

Presets by name (``"name"`` or ``"name:parameter"``):

=================  =========  ==========================================================
``lossless``       lossless   Blosc(zstd level 1, bitshuffle) + crc32c. The default.
``xor-delta[:K]``  lossless   float bits XOR the previous snapshot; keyframe every K rows
                              (default 16), so any row decodes from at most K reads.
``bitround-delta`` lossy      w_i - w_0 with its mantissa rounded to ``keepbits`` bits
``[:keepbits]``               (default 8): relative error <= 2^-(keepbits+1) of the delta.
``float16-delta``  lossy      w_i - w_0 stored as float16: relative error <= 2^-11 of the
                              delta (absolute 2^-25 below float16's normal range).
=================  =========  ==========================================================
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

from .errors import InvalidArgumentError

_UINT = {4: np.uint32, 8: np.uint64, 2: np.uint16}
_MANTISSA_BITS = {np.dtype("float32"): 23, np.dtype("float64"): 52}


@dataclass(frozen=True)
class CodecPreset:
    """A named, parameterised codec preset. Recorded in the store's attributes."""

    name: str
    transform: str  # "plain" | "xor" | "delta"
    lossless: bool
    keyframe_interval: int = 1
    keepbits: int | None = None  # bitround-delta only
    delta_dtype: str | None = None  # float16-delta only
    cname: str = "zstd"
    clevel: int = 1
    shuffle: str = "bitshuffle"

    # -- description --------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """The string that reproduces this preset, e.g. ``"xor-delta:16"``."""
        if self.transform == "xor":
            return f"{self.name}:{self.keyframe_interval}"
        if self.keepbits is not None:
            return f"{self.name}:{self.keepbits}"
        return self.name

    def error_bound(self) -> str:
        """Human-readable bound on the reconstruction error (``"exact"`` when lossless)."""
        if self.lossless:
            return "exact (bit for bit)"
        if self.keepbits is not None:
            return f"|error| <= 2^-{self.keepbits + 1} * |w_i - w_0| elementwise (plus float32 rounding of the sum)"
        return "|error| <= 2^-11 * |w_i - w_0| elementwise, or 2^-25 absolute where |w_i - w_0| < 6.1e-5"

    def to_json(self) -> dict:
        d = asdict(self)
        d["spec"] = self.spec
        d["error_bound"] = self.error_bound()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "CodecPreset":
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**fields)

    # -- zarr side ----------------------------------------------------------------------
    def stored_dtype(self, dtype: np.dtype) -> np.dtype:
        """dtype of the zarr array that holds the transformed rows."""
        dtype = np.dtype(dtype)
        if self.transform == "xor":
            return np.dtype(_UINT[dtype.itemsize])
        if self.delta_dtype:
            return np.dtype(self.delta_dtype)
        return dtype

    def zarr_compressors(self, chunk_bytes: int = 0) -> list:
        """Bytes-to-bytes codecs for each chunk: compressor, then a crc32c checksum.

        Chunks of 1 MiB or more compress in 256 KiB blosc blocks: two to four times as fast as
        blosc's automatic choice at the same ratio (measured, benchmarks/bench_record.py).
        """
        blocksize = 1 << 18 if chunk_bytes >= 1 << 20 else 0
        return [BloscCodec(cname=self.cname, clevel=self.clevel, shuffle=self.shuffle, blocksize=blocksize),
                Crc32cCodec()]

    # -- row transform ------------------------------------------------------------------
    def is_keyframe(self, index: int) -> bool:
        return self.transform != "xor" or index % self.keyframe_interval == 0

    def decode_start(self, index: int) -> int:
        """First row that must be read to decode row ``index``."""
        return index - index % self.keyframe_interval if self.transform == "xor" else index

    def encode(self, row: np.ndarray, index: int, prev: np.ndarray | None, reference: np.ndarray | None) -> np.ndarray:
        """Transform one float row (n,) for storage.

        ``prev`` is the decoded row ``index - 1`` (xor), ``reference`` the decoded row 0 (delta).
        """
        if self.transform == "plain":
            return row
        if self.transform == "xor":
            bits = row.view(_UINT[row.dtype.itemsize])
            if self.is_keyframe(index):
                return bits
            return np.bitwise_xor(bits, prev.view(bits.dtype))
        diff = row - reference  # (n,) in the row's float dtype
        if self.delta_dtype:
            out = diff.astype(self.delta_dtype)
            bad = ~np.isfinite(out)
            if bad.any():
                raise InvalidArgumentError(
                    f"snapshot {index} differs from snapshot 0 by up to {np.abs(diff).max():.3g}, beyond "
                    f"{self.delta_dtype}'s range; use codec='bitround-delta' for this trajectory"
                )
            return out
        return _bitround(diff, self.keepbits)

    def decode(self, stored: np.ndarray, first_index: int, reference: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
        """Undo the transform on a block of stored rows (k, m) starting at row ``first_index``.

        For xor, ``first_index`` must be a keyframe (see :meth:`decode_start`); for delta,
        ``reference`` is the matching column block of the reference snapshot (m,).
        """
        dtype = np.dtype(dtype)
        if self.transform == "plain":
            return stored
        if self.transform == "xor":
            if not self.is_keyframe(first_index):
                raise ValueError(f"xor decode must start at a keyframe, got row {first_index}")
            out = np.empty_like(stored)
            k = self.keyframe_interval
            for lo in range(0, stored.shape[0], k):  # each group starts with a keyframe
                np.bitwise_xor.accumulate(stored[lo:lo + k], axis=0, out=out[lo:lo + k])
            return out.view(dtype)
        return (stored.astype(dtype, copy=False) + reference[None, :]).astype(dtype, copy=False)


def _bitround(x: np.ndarray, keepbits: int) -> np.ndarray:
    """Round the mantissa of ``x`` to ``keepbits`` bits, ties to even (as numcodecs.BitRound)."""
    mbits = _MANTISSA_BITS[x.dtype]
    if keepbits >= mbits:
        return x
    drop = mbits - keepbits
    bits = x.view(_UINT[x.dtype.itemsize])
    one = bits.dtype.type(1)
    half = bits.dtype.type((1 << (drop - 1)) - 1)
    mask = ~bits.dtype.type((1 << drop) - 1)
    rounded = (bits + half + ((bits >> bits.dtype.type(drop)) & one)) & mask
    return rounded.view(x.dtype)


def get_preset(spec: "str | CodecPreset") -> CodecPreset:
    """Parse ``"lossless"``, ``"xor-delta:16"``, ``"bitround-delta:8"``, ``"float16-delta"``."""
    if isinstance(spec, CodecPreset):
        return spec
    name, _, arg = str(spec).partition(":")
    try:
        if name == "lossless":
            return CodecPreset("lossless", "plain", True)
        if name == "xor-delta":
            k = int(arg or 16)
            if k < 1:
                raise ValueError
            return CodecPreset("xor-delta", "xor", True, keyframe_interval=k, clevel=3)
        if name == "bitround-delta":
            bits = int(arg or 8)
            if not 1 <= bits <= 23:
                raise ValueError
            return CodecPreset("bitround-delta", "delta", False, keepbits=bits, clevel=3)
        if name == "float16-delta":
            return CodecPreset("float16-delta", "delta", False, delta_dtype="float16", clevel=3, shuffle="shuffle")
    except ValueError:
        raise InvalidArgumentError(f"bad codec parameter in {spec!r}") from None
    raise InvalidArgumentError(
        f"unknown codec {spec!r}; choose one of: lossless, xor-delta[:K], bitround-delta[:keepbits], float16-delta"
    )


PRESET_NAMES = ("lossless", "xor-delta", "bitround-delta", "float16-delta")
