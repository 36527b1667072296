"""Uncompressed chunks written and read directly (trajstore/rawchunk.py, the basis pass): the files are
zarr's own, anything but one whole chunk of a raw array is declined, and a short or missing chunk
file is never read as data. Real zarr arrays on disk."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from trajstore.rawchunk import RawChunks


@pytest.mark.parametrize("shape,chunks", [((1000, 7), (256, 7)), ((1000,), (256,)), ((256, 3), (256, 3))])
def test_chunk_files_are_the_ones_zarr_writes_and_read_back(tmp_path, shape, chunks):
    rng = np.random.default_rng(0)
    values = rng.standard_normal(shape).astype(np.float32)
    values.flat[5] = np.nan
    arrays = [zarr.open_group(tmp_path / g, mode="w").create_array("a", shape=shape, chunks=chunks, dtype="float32",
                                                                     fill_value=np.nan, compressors=None)
              for g in ("theirs", "ours")]
    raw = RawChunks.for_array(tmp_path / "ours" / "a")
    assert raw is not None
    for lo in range(0, shape[0], chunks[0]):
        hi = min(lo + chunks[0], shape[0])
        arrays[0][lo:hi] = values[lo:hi]
        assert raw.write((lo,) + (0,) * (len(shape) - 1), values[lo:hi])
        stop = (hi,) + shape[1:]
        np.testing.assert_array_equal(raw.read((lo,) + (0,) * (len(shape) - 1), stop), values[lo:hi])
    theirs = sorted(p.relative_to(tmp_path / "theirs") for p in (tmp_path / "theirs" / "a" / "c").rglob("*") if p.is_file())
    ours = sorted(p.relative_to(tmp_path / "ours") for p in (tmp_path / "ours" / "a" / "c").rglob("*") if p.is_file())
    assert theirs == ours and theirs
    for rel in theirs:
        assert (tmp_path / "ours" / rel).read_bytes() == (tmp_path / "theirs" / rel).read_bytes(), rel
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "ours" / "a", mode="r")[:], values)


def test_what_it_does_not_write_exactly_is_declined(tmp_path):
    group = zarr.open_group(tmp_path / "g", mode="w")
    group.create_array("raw", shape=(1000, 4), chunks=(256, 4), dtype="float32", fill_value=np.nan, compressors=None)
    group.create_array("packed", shape=(1000, 4), chunks=(256, 4), dtype="float32", fill_value=np.nan)
    assert RawChunks.for_array(tmp_path / "g" / "packed") is None  # compressed: zarr writes it
    assert RawChunks.for_array(None) is None  # a remote store
    raw = RawChunks.for_array(tmp_path / "g" / "raw")
    block = np.ones((256, 4), np.float32)
    assert not raw.write((100, 0), block)  # not on a chunk boundary
    assert not raw.write((0, 0), block[:100])  # part of a chunk
    assert not raw.write((0, 0), block.astype(np.float64))  # another dtype: never cast
    assert not raw.write((0, 1), block[:, :3])
    assert raw.read((0, 0), (100, 4)) is None
    assert not list((tmp_path / "g" / "raw").rglob("c/*"))  # nothing was written
    meta = json.loads((tmp_path / "g" / "raw" / "zarr.json").read_text())
    for change in [lambda m: m["codecs"][0].update(configuration={"endian": "big"}),
                   lambda m: m["chunk_key_encoding"].update(name="v2"), lambda m: m.update(data_type="int32")]:
        changed = json.loads(json.dumps(meta))
        change(changed)
        (tmp_path / "g" / "raw" / "zarr.json").write_text(json.dumps(changed))
        assert RawChunks.for_array(tmp_path / "g" / "raw") is None, changed


def test_a_short_or_missing_chunk_file_is_not_read_as_data(tmp_path):
    arr = zarr.open_group(tmp_path / "g", mode="w").create_array("a", shape=(512, 2), chunks=(256, 2), dtype="float32",
                                                                fill_value=np.nan, compressors=None)
    raw = RawChunks.for_array(tmp_path / "g" / "a")
    assert raw.write((0, 0), np.ones((256, 2), np.float32))
    assert raw.read((256, 0), (512, 2)) is None  # never written
    path = tmp_path / "g" / "a" / "c" / "0" / "0"
    path.write_bytes(path.read_bytes()[:-4])  # a torn file
    assert raw.read((0, 0), (256, 2)) is None
    path.write_bytes(path.read_bytes() + b"\0" * 12)  # a longer one
    assert raw.read((0, 0), (256, 2)) is None
    assert arr.shape == (512, 2)
