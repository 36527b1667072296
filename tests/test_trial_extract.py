"""Found by a new user's trial (helper-43, 2026-11-28): each test fails on the code before its fix."""
from __future__ import annotations

import pytest

from pipeline import Basis, open_subspace
from pipeline.optim import SubspaceBFGS, SubspaceSGD
from trajstore.errors import CorruptSnapshotError, InvalidArgumentError

from .test_digest_versions import extracted  # noqa: F401 -- the fixture
from .test_review_basis import train

def test_a_state_of_one_subspace_optimizer_is_refused_by_the_other(extracted):  # noqa: F811
    """A SubspaceSGD state loaded into SubspaceBFGS (or back) went on silently with fresh state."""
    path, model = extracted
    basis = Basis.from_store(path, "a")
    sgd = SubspaceSGD(model.parameters(), basis, lr=0.1, momentum=0.9)
    train(model, sgd, 2)
    bfgs = SubspaceBFGS(model.parameters(), basis)
    with pytest.raises(InvalidArgumentError, match="saved by another optimizer.*momentum"):
        bfgs.load_state_dict(sgd.state_dict())
    with pytest.raises(InvalidArgumentError, match="saved by another optimizer"):
        SubspaceSGD(model.parameters(), basis, lr=0.1).load_state_dict(bfgs.state_dict())
    older = sgd.state_dict()
    del older["param_groups"][0]["dampening"]  # a state saved before that hyperparameter existed: still loads
    fresh = SubspaceSGD(model.parameters(), basis, lr=0.1, momentum=0.9)
    fresh.load_state_dict(older)
    assert fresh.param_groups[0]["dampening"] == 0.0


@pytest.mark.parametrize("load", ["open_subspace", "pinned", "resident", "mmap"])
def test_a_basis_chunk_cut_short_is_a_damaged_subspace_with_what_to_do(extracted, load, tmp_path):  # noqa: F811
    """A truncated chunk of P raised zarr's ValueError (reshape), or through host="mmap" a StoreWriteError
    saying to free space."""
    path, _ = extracted
    chunk = path / "subspaces" / "a" / "basis" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(CorruptSnapshotError, match=r"does not decode.*extract .* --overwrite"):
        if load == "open_subspace":
            open_subspace(path, "a").to_numpy()
        else:
            options = {"pinned": {"host": "pinned"}, "resident": {"mode": "resident"},
                       "mmap": {"host": "mmap", "mode": "streamed", "cache_dir": tmp_path / "cache"}}[load]
            Basis.from_store(path, "a", **options)
