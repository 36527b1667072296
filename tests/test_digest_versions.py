"""The basis digest changed from blake2b-128 to sha256-128 (3x faster to check here): subspaces and optimizer
states written before still read and load, damage is still found in them, and an algorithm from a newer
version is refused with a typed error."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from pipeline import Basis, extract_subspace, open_subspace
from pipeline.optim import SubspaceSGD
from pipeline.subspace_write import digest_of
from trajstore import TrajectoryStore
from trajstore.errors import CorruptSnapshotError, FormatVersionError, LayoutMismatchError

from .test_review_basis import FrozenFirst, blake, record, sha, strip_digest, train


@pytest.fixture
def extracted(tmp_path):
    torch.manual_seed(0)
    model = FrozenFirst()
    path = record(tmp_path / "run.zarr", model)
    extract_subspace(path, dim=3, name="a")
    extract_subspace(path, dim=3, snapshots=slice(2, None), name="b")
    with TrajectoryStore.open(path) as s:
        s.load_into(model, 0)
    return path, model


def set_digest(path, name: str, digest: str) -> None:
    group = zarr.open_group(str(path), mode="r+")[f"subspaces/{name}"]
    group.attrs.update({"basis_digest": digest})


def damage(path, name: str) -> None:
    basis = zarr.open_group(str(path), mode="r+")[f"subspaces/{name}/basis"]
    row = basis[5, :]
    row[0] += 1e-3
    basis[5, :] = row


def test_new_extractions_record_sha256_128(extracted):
    path, _ = extracted
    sub = open_subspace(path, "a")
    truth = sub.basis[:, :]
    assert sub.digest == sha(truth) != blake(truth)
    assert digest_of(sub.basis, "a", TrajectoryStore.open(path)) == sub.digest


@pytest.mark.parametrize("host", ["pinned", "mmap"])
def test_a_subspace_recorded_with_blake2b_still_reads_and_its_damage_is_found(extracted, host, tmp_path):
    path, _ = extracted
    truth = open_subspace(path, "a").basis[:, :]
    set_digest(path, "a", blake(truth))  # as an extraction before 2026-11-28 left it
    sub = open_subspace(path, "a")
    assert np.array_equal(sub.to_numpy(), truth)
    basis = Basis.from_store(path, "a", host=host, cache_dir=tmp_path / "cache")
    assert np.array_equal(basis.to_numpy(), truth) and basis.digest == blake(truth)
    damage(path, "a")
    with pytest.raises(CorruptSnapshotError, match="does not match the digest"):
        open_subspace(path, "a").to_numpy()
    with pytest.raises(CorruptSnapshotError, match="does not match the digest"):
        Basis.from_store(path, "a", host=host, cache_dir=tmp_path / "cache2")


def test_a_digest_algorithm_from_a_newer_version_is_refused(extracted):
    path, _ = extracted
    set_digest(path, "a", "sha3-512:" + "0" * 32)
    with pytest.raises(FormatVersionError, match="newer version"):
        open_subspace(path, "a").to_numpy()


def test_an_optimizer_state_saved_with_a_blake2b_fingerprint_still_loads(extracted):
    """A P given as an array had its digest computed with blake2b before: that state's fingerprint is accepted
    for the same P, and still refused for another."""
    path, model = extracted
    a, b = (open_subspace(path, n).to_numpy() for n in ("a", "b"))
    opt = SubspaceSGD(model.parameters(), Basis.from_array(a, model), lr=0.1, momentum=0.9)
    train(model, opt, 2)
    state = opt.state_dict()
    basis = Basis.from_array(a, model)
    old = basis._fingerprint_of(blake(a))  # what the earlier version saved
    assert not torch.equal(old, state["state"][0]["basis_fingerprint"])
    state["state"][0]["basis_fingerprint"] = old
    fresh = SubspaceSGD(model.parameters(), basis, lr=0.1, momentum=0.9)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.state_dict()["state"][0]["basis_fingerprint"], basis.fingerprint())
    with pytest.raises(LayoutMismatchError, match="different basis"):
        SubspaceSGD(model.parameters(), Basis.from_array(b, model), lr=0.1, momentum=0.9).load_state_dict(state)
    recorded = Basis.from_store(path, "a")  # a recorded digest is the same in every version: no second chance
    assert recorded.earlier_fingerprint() is None


# -- review findings (helper-42) ------------------------------------------------------------------------
def saved_with_blake2b(model, basis_a: Basis, p: np.ndarray) -> dict:
    """An optimizer state as the version before 2026-11-28 saved it for P: its fingerprint from blake2b."""
    opt = SubspaceSGD(model.parameters(), basis_a, lr=0.1, momentum=0.9)
    train(model, opt, 2)
    state = opt.state_dict()
    state["state"][0]["basis_fingerprint"] = basis_a._fingerprint_of(blake(p))
    return state


@pytest.mark.parametrize("host", ["pinned", "mmap"])
def test_a_state_saved_for_a_subspace_without_a_digest_still_loads(extracted, host, tmp_path):
    """A subspace extracted before digests: its digest is computed at load, with blake2b by earlier versions."""
    path, model = extracted
    p = open_subspace(path, "a").to_numpy()
    strip_digest(path, "a")  # as a subspace extracted before digests were recorded
    basis = Basis.from_store(path, "a", host=host, cache_dir=tmp_path / "cache")
    state = saved_with_blake2b(model, basis, p)
    SubspaceSGD(model.parameters(), basis, lr=0.1, momentum=0.9).load_state_dict(state)
    other = Basis.from_array(open_subspace(path, "b").to_numpy(), model)
    with pytest.raises(LayoutMismatchError, match="different basis"):
        SubspaceSGD(model.parameters(), other, lr=0.1, momentum=0.9).load_state_dict(state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_state_saved_with_a_16_bit_basis_from_an_array_still_loads(extracted, dtype):
    """A 16-bit basis holds only P's rounding: the earlier digest of the float32 P is taken when it is made."""
    path, model = extracted
    p = open_subspace(path, "a").to_numpy()
    basis = Basis.from_array(p, model, dtype=dtype)
    state = saved_with_blake2b(model, basis, p)
    SubspaceSGD(model.parameters(), Basis.from_array(p, model, dtype=dtype), lr=0.1,
                momentum=0.9).load_state_dict(state)


@pytest.mark.parametrize("value", ["attrs-blake2b:" + "0" * 31, "", "deadbeef", "BLAKE2B-128:" + "a" * 32,
                                   "sha256-128:" + "A" * 32, "sha256-128:" + "0" * 31])
def test_a_malformed_recorded_digest_is_a_damaged_attribute_not_a_newer_version(extracted, value):
    path, _ = extracted
    set_digest(path, "a", value)
    with pytest.raises(CorruptSnapshotError, match="malformed"):
        open_subspace(path, "a").to_numpy()


def test_a_cache_file_of_the_same_digest_that_no_longer_hashes_is_removed(extracted, tmp_path):
    """A tiled copy whose file hash does not match (damaged, or hashed with blake2b by an earlier version) is
    rebuilt and removed, not hashed again at every later load."""
    path, _ = extracted
    cache = tmp_path / "cache"
    Basis.from_store(path, "a", host="mmap", cache_dir=cache)
    (good,) = cache.rglob("basis-*.f32.npy")
    stale = good.with_name(good.name.rsplit("-", 1)[0] + "-" + "0" * 32 + ".f32.npy")
    good.rename(stale)  # the same digest in its name, a file hash that does not match its bytes
    basis = Basis.from_store(path, "a", host="mmap", cache_dir=cache)
    assert np.array_equal(basis.to_numpy(), open_subspace(path, "a").to_numpy())
    assert not stale.exists() and len(list(cache.rglob("basis-*.f32.npy"))) == 1

