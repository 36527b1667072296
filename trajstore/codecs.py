"""Codec presets: how a snapshot row is transformed and compressed on its way to disk.

A preset has two halves:

* a *row transform* across snapshots, which zarr cannot express because each zarr chunk
  holds one row: ``plain`` (none), ``xor`` (bits XOR the previous row, a keyframe every K
  rows) or ``delta`` (difference from the reference snapshot, optionally rounded);
* the zarr chunk codecs of the stored rows: Blosc, then a crc32c checksum.

Presets by name (``"name"`` or ``"name:parameter"``):

=================  =========  ==========================================================
``lossless``       lossless   Blosc(lz4 level 1, bitshuffle) + crc32c. The default.
``lossless-zstd``  lossless   Blosc(zstd level 1, bitshuffle) + crc32c: the earlier default,
                              the same ratio (~1.14x) at a third of lz4's encode speed.
``lossless-fast``  lossless   Blosc(lz4 level 1, no shuffle) + crc32c: no compression to speak
                              of on float32 weights (1.00x), the fastest to write and read.
``xor-delta[:K]``  lossless   float bits XOR the previous snapshot; keyframe every K rows
                              (default 16), so any row decodes from at most K reads.
``bitround-delta`` lossy      w_i - w_0 with its mantissa rounded to ``keepbits`` bits
``[:keepbits]``               (default 8): |error| <= (2^-keepbits + 2^-22) |w_i - w_0|
                              + 2^-(keepbits+126).
``float16-delta``  lossy      w_i - w_0 stored as float16: |error| <= (2^-10 + 2^-22)
                              |w_i - w_0| + 2^-24.
=================  =========  ==========================================================

The lossy bounds hold elementwise for float32 stores (float64 ones do better) and are tight:
rounding the difference costs 2^-(keepbits+1) (float16: 2^-11, or 2^-25 absolute below
float16's normal range 6.1e-5), and the float32 rounding of the difference and of the decoded
sum w_0 + delta can at most double that (it does, where |w_0| >> |w_i - w_0|: a decoded value
is the float32 nearest w_0 + delta, and w_i is a float32 candidate too). Both presets refuse a
snapshot whose decoded value would leave float32 range (or whose difference leaves float16's),
and a snapshot 0 holding NaN or Inf, which every later snapshot is stored relative to. NaN and
Inf in later snapshots (``allow_nonfinite``) are stored as they are and decode as they were.
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
            k = self.keepbits
            return (f"|error| <= (2^-{k} + 2^-22) * |w_i - w_0| + 2^-{k + 126} elementwise (float32; rounding to "
                    f"{k} bits costs 2^-{k + 1}, float32 rounding of the difference and of w_0 + delta at most "
                    "doubles it)")
        return ("|error| <= (2^-10 + 2^-22) * |w_i - w_0| + 2^-24 elementwise (float32; float16 costs 2^-11, "
                "or 2^-25 absolute below 6.1e-5; float32 rounding of the difference and of w_0 + delta at most "
                "doubles it)")

    def to_json(self) -> dict:
        d = asdict(self)
        d["spec"] = self.spec
        d["error_bound"] = self.error_bound()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "CodecPreset":
        """The preset a store's attributes describe. A description that is not self-consistent (a
        damaged or hand-edited file: an unknown transform, a keyframe interval or keepbits that
        disagree with the recorded ``spec``) raises InvalidArgumentError rather than decoding wrongly."""
        if not isinstance(d, dict):
            raise InvalidArgumentError(f"codec description must be a mapping, got {d!r:.80}")
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        try:
            preset = cls(**fields)
        except TypeError as exc:  # a required field is missing
            raise InvalidArgumentError(f"codec description {d!r:.200} is incomplete ({exc})") from None
        problem = preset._inconsistency()
        if problem is None and "spec" in d and d["spec"] != preset.spec:
            problem = f"its fields describe {preset.spec!r} but it records spec {d['spec']!r}"
        if problem:
            raise InvalidArgumentError(f"codec description {d!r:.200} is inconsistent: {problem}")
        return preset

    def _inconsistency(self) -> str | None:
        """What makes this preset impossible to decode faithfully, or None."""
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.transform not in ("plain", "xor", "delta"):
            return f"unknown transform {self.transform!r}"
        if not isinstance(self.name, str) or not isinstance(self.lossless, bool):
            return "name must be a string and lossless a boolean"
        if self.lossless != (self.transform != "delta"):
            return f"transform {self.transform!r} with lossless={self.lossless}"
        if not is_int(self.keyframe_interval) or self.keyframe_interval < 1 or (
                self.transform != "xor" and self.keyframe_interval != 1):
            return f"keyframe_interval {self.keyframe_interval!r} with transform {self.transform!r}"
        if self.transform != "delta" and (self.keepbits is not None or self.delta_dtype is not None):
            return f"keepbits/delta_dtype set for transform {self.transform!r}"
        if self.transform == "delta":
            if (self.keepbits is None) == (self.delta_dtype is None):
                return "a delta transform needs exactly one of keepbits and delta_dtype"
            if self.keepbits is not None and not (is_int(self.keepbits) and 1 <= self.keepbits <= 52):
                return f"keepbits {self.keepbits!r}"
            if self.delta_dtype is not None and self.delta_dtype not in ("float16", "float32"):
                return f"delta_dtype {self.delta_dtype!r}"
        if not (isinstance(self.cname, str) and is_int(self.clevel) and isinstance(self.shuffle, str)):
            return "cname, clevel and shuffle must be a string, an integer and a string"
        return None

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

    def side_preset(self) -> "CodecPreset":
        """The lossless chain of the arrays stored beside the rows (the reference row of the delta
        presets, the buffers): this preset's compressor, Blosc level 1, its shuffle for the plain
        presets and bitshuffle otherwise (``lossless-zstd`` stores: zstd, ``lossless``: lz4)."""
        shuffle = self.shuffle if self.transform == "plain" else "bitshuffle"
        return CodecPreset(self.name if self.transform == "plain" else "lossless", "plain", True,
                           cname=self.cname, clevel=1, shuffle=shuffle)

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
        if index == 0 and not np.isfinite(reference).all():
            raise InvalidArgumentError(
                f"snapshot 0 holds NaN or Inf; with codec {self.spec!r} every later snapshot is stored as its "
                "difference from snapshot 0, which NaN/Inf there would wipe out: record a finite first snapshot, "
                "or use a lossless codec")
        with np.errstate(over="ignore", invalid="ignore"):  # checked below
            diff = row - reference  # (n,) in the row's float dtype
            out = diff.astype(self.delta_dtype) if self.delta_dtype else _bitround(diff, self.keepbits)
        _check_decodable(row, reference, out, index, self.delta_dtype or row.dtype.name,
                         "codec='bitround-delta'" if self.delta_dtype else "a lossless codec")
        return out

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


def _check_decodable(row: np.ndarray, reference: np.ndarray, stored: np.ndarray, index: int, what: str,
                     instead: str, block: int = 1 << 20) -> None:
    """Raise InvalidArgumentError where a finite element of ``row`` would not decode finite (its
    difference, or the rounded one added back to the reference, leaves the float range)."""
    for s in range(0, row.shape[0], block):
        part = slice(s, s + block)
        with np.errstate(over="ignore", invalid="ignore"):
            back = stored[part].astype(row.dtype) + reference[part]
        bad = np.isfinite(row[part]) & ~np.isfinite(back)
        if bad.any():
            j = s + int(np.argmax(bad))
            raise InvalidArgumentError(
                f"snapshot {index} differs from snapshot 0 by {float(row[j]) - float(reference[j]):.3g} at element "
                f"{j} (values {row[j]:.3g} and {reference[j]:.3g}): stored as {what}, beyond its range, it would "
                f"not decode to a finite value; use {instead} for this trajectory")


def _bitround(x: np.ndarray, keepbits: int) -> np.ndarray:
    """Round the mantissa of ``x`` to ``keepbits`` bits, ties to even (as numcodecs.BitRound).
    NaN and Inf are returned as they are (rounding their bits could turn a NaN into a number)."""
    mbits = _MANTISSA_BITS[x.dtype]
    if keepbits >= mbits:
        return x
    drop = mbits - keepbits
    bits = x.view(_UINT[x.dtype.itemsize])
    one = bits.dtype.type(1)
    half = bits.dtype.type((1 << (drop - 1)) - 1)
    mask = ~bits.dtype.type((1 << drop) - 1)
    rounded = (bits + half + ((bits >> bits.dtype.type(drop)) & one)) & mask
    return np.where(np.isfinite(x), rounded.view(x.dtype), x)


def get_preset(spec: "str | CodecPreset") -> CodecPreset:
    """Parse ``"lossless"`` (``"lossless-zstd"``, ``"lossless-fast"``), ``"xor-delta:16"``,
    ``"bitround-delta:8"``, ``"float16-delta"``."""
    if isinstance(spec, CodecPreset):
        return spec
    name, colon, arg = str(spec).partition(":")
    if name in LOSSLESS_CHAINS and colon:  # earlier versions ignored it: say so rather than guess
        raise InvalidArgumentError(
            f"codec {spec!r}: the lossless presets take no parameter (it used to be ignored). Use one of "
            f"{', '.join(repr(k) for k in LOSSLESS_CHAINS)} ({_CHAIN_HELP}); for a lossless preset with a "
            "parameter, 'xor-delta:K'")
    try:
        if name in LOSSLESS_CHAINS:
            cname, shuffle = LOSSLESS_CHAINS[name]
            return CodecPreset(name, "plain", True, cname=cname, shuffle=shuffle)
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
        f"unknown codec {spec!r}; choose one of: {', '.join(LOSSLESS_CHAINS)}, xor-delta[:K], "
        "bitround-delta[:keepbits], float16-delta"
    )


LOSSLESS_CHAINS = {  # plain rows, Blosc clevel 1: (cname, shuffle); benchmarks/bench_codecs.py measures each
    "lossless": ("lz4", "bitshuffle"),  # the default; earlier "lossless" stores hold zstd (their arrays say so)
    "lossless-zstd": ("zstd", "bitshuffle"),  # the default before: the same ratio, a third of the speed
    "lossless-fast": ("lz4", "noshuffle"),  # no compression on float32 weights (ratio 1.00): checksums only
}
PRESET_NAMES = (*LOSSLESS_CHAINS, "xor-delta", "bitround-delta", "float16-delta")
_CHAIN_HELP = "Blosc lz4 + bitshuffle, zstd + bitshuffle, lz4 without shuffle"


def describe_chain(meta: dict) -> str:
    """The chunk codecs an array's metadata (its ``zarr.json`` document) record, inside its shards,
    e.g. ``"blosc(lz4, level 1, bitshuffle) + crc32c"``: what the stored bytes really are, whatever
    preset name the store's attributes carry (a ``lossless`` store of an earlier version holds zstd)."""
    try:
        codecs = meta["codecs"]
        if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
            codecs = codecs[0]["configuration"]["codecs"]
        parts = []
        for codec in codecs:
            name, conf = codec["name"], codec.get("configuration") or {}
            if name == "blosc":
                parts.append(f"blosc({conf.get('cname')}, level {conf.get('clevel')}, {conf.get('shuffle')})")
            elif name in ("zstd", "gzip"):
                parts.append(f"{name}(level {conf.get('level')})")
            elif name != "bytes":
                parts.append(name)
        return " + ".join(parts) or "none"
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
