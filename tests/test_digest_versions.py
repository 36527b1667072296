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

from .test_review_basis import FrozenFirst, blake, record, sha, train


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
