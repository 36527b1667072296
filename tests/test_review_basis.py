"""Review findings 4, 5 and 11: reading a subspace that is being replaced, the basis digest behind the
optimizer-state fingerprint and the memory-map cache, and parameters that got no gradient.

Real stores, real extractions, real processes for the races; no mocks.
"""
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from pipeline import extract_subspace, open_subspace
from pipeline.basis import Basis
from pipeline.optim import SubspaceBFGS, SubspaceSGD
from trajstore import TrajectoryStore
from trajstore.errors import LayoutMismatchError, SubspaceNotFoundError
from trajstore.recorder import Recorder

from .helpers import batches
from .synthetic import trajectory, write_store

ROOT = Path(__file__).resolve().parents[1]


def blake(p: np.ndarray) -> str:
    """The digest extractions recorded before 2026-11-28."""
    return "blake2b-128:" + hashlib.blake2b(np.ascontiguousarray(p, np.float32).tobytes(), digest_size=16).hexdigest()


def sha(p: np.ndarray) -> str:
    """The digest extractions record: the first 16 bytes of sha256 of P's float32 bytes, row-major."""
    return "sha256-128:" + hashlib.sha256(np.ascontiguousarray(p, np.float32).tobytes()).hexdigest()[:32]


def host_array(basis: Basis) -> np.ndarray:
    return basis.to_numpy()


def strip_digest(path, name):
    """Make a subspace look as one written before extraction recorded digests (an old store)."""
    group = zarr.open_group(str(path), mode="r+")[f"subspaces/{name}"]
    attrs = group.attrs.asdict()
    for key in ("basis_digest", "extraction_id"):
        attrs.pop(key, None)
    group.attrs.put(attrs)


# -- 4: a basis read while `extract --overwrite` / `--follow` replaces it ----------------------------------
OVERWRITER = """
import sys, time
from pipeline import extract_subspace
path, seconds = sys.argv[1], float(sys.argv[2])
selections = [slice(0, 16), slice(0, 12)]
end, k = time.time() + seconds, 0
while time.time() < end:
    extract_subspace(path, dim=4, snapshots=selections[k % 2], overwrite=True)
    k += 1
print(k)
"""


def test_loads_racing_overwrite_return_a_whole_basis_or_a_typed_error(tmp_path):
    """A real `--overwrite` loop in another process; every load returns one of the two exact bases or a
    typed SubspaceNotFoundError (a NaN hole, a mix of two extractions or a raw KeyError is the bug)."""
    path = tmp_path / "run.zarr"
    write_store(path, trajectory(16, 60_000), chunk=4096, shard=16384)
    expected = [extract_subspace(path, dim=4, snapshots=s, name=f"e{i}").to_numpy()
                for i, s in enumerate([slice(0, 16), slice(0, 12)])]
    extract_subspace(path, dim=4)
    writer = subprocess.Popen([sys.executable, "-c", OVERWRITER, str(path), "8"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outcomes, bad = {"ok": 0, "typed": 0}, []
    try:
        time.sleep(0.3)
        hosts = [dict(host="pinned"), dict(host="mmap"), dict(host="mmap", cache_dir=tmp_path / "cache")]
        k = 0
        while writer.poll() is None:
            kwargs = hosts[k % len(hosts)]
            k += 1
            try:
                basis = Basis.from_store(path, **kwargs)
            except SubspaceNotFoundError:
                outcomes["typed"] += 1
                continue
            except Exception as exc:  # noqa: BLE001 - anything untyped is the bug
                bad.append(f"{kwargs}: {type(exc).__name__}: {exc}")
                continue
            got = host_array(basis)
            match = [i for i, e in enumerate(expected) if np.array_equal(got, e)]
            if not match:
                bad.append(f"{kwargs}: a basis that is neither extraction (NaN: {int(np.isnan(got).sum())})")
                continue
            assert torch.equal(basis.fingerprint(), Basis.from_array(expected[match[0]], basis.layout).fingerprint())
            outcomes["ok"] += 1
    finally:
        out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, f"the overwriting extraction failed:\n{err[-3000:]}"
    assert not bad, (outcomes, bad[:10])
    assert outcomes["ok"] >= 1, outcomes


def test_a_subspace_opened_before_an_overwrite_refuses_to_read_the_replacement(tmp_path):
    path = tmp_path / "run.zarr"
    write_store(path, trajectory(16, 5000), chunk=1024, shard=4096)
    sub = extract_subspace(path, dim=3)
    old = sub.to_numpy()
    extract_subspace(path, dim=3, snapshots=slice(0, 10), overwrite=True)
    with pytest.raises(SubspaceNotFoundError, match="replaced"):
        sub.to_numpy()  # its spectrum and attributes are the old extraction's: its basis must be too
    fresh = open_subspace(path)
    assert not np.array_equal(fresh.to_numpy(), old)


@pytest.mark.parametrize("legacy", [False, True])
def test_an_mmap_cache_with_a_hole_in_the_middle_is_rebuilt(tmp_path, legacy):
    path = tmp_path / "run.zarr"
    write_store(path, trajectory(16, 20_000), chunk=1024, shard=4096)
    extract_subspace(path, dim=4)
    if legacy:
        strip_digest(path, "default")
    truth = open_subspace(path).to_numpy()
    np.testing.assert_array_equal(host_array(Basis.from_store(path, host="mmap")), truth)
    files = list((path / "subspaces" / "default").glob("basis-*.f32.npy"))
    assert len(files) == 1
    cached = np.load(files[0], mmap_mode="r+")  # (tiles, d, cols)
    flat = cached.reshape(-1)
    flat[flat.size // 2:flat.size // 2 + 400] = np.nan  # a hole in the middle: the first and last 64 rows are intact
    cached.flush()
    del cached
    again = host_array(Basis.from_store(path, host="mmap"))
    assert np.isfinite(again).all()
    np.testing.assert_array_equal(again, truth)


def test_a_basis_damaged_in_the_store_is_refused_not_loaded(tmp_path):
    from trajstore.errors import CorruptSnapshotError

    path = tmp_path / "run.zarr"
    write_store(path, trajectory(16, 5000), chunk=1024, shard=4096)
    extract_subspace(path, dim=3)
    basis = zarr.open_group(str(path), mode="r+")["subspaces/default/basis"]
    basis[2500, 1] = basis[2500, 1] * 1.5  # finite, plausible, wrong: only the digest can tell
    for load in (lambda: open_subspace(path).to_numpy(), lambda: Basis.from_store(path, host="pinned"),
                 lambda: Basis.from_store(path, host="mmap", cache_dir=tmp_path / "cache")):
        with pytest.raises(CorruptSnapshotError, match="--overwrite"):
            load()


# -- 5: the fingerprint and the cache use a digest of the whole basis ----------------------------------------
class FrozenFirst(nn.Module):
    """An embedding table (128 parameters, registered first) frozen while recording: its rows of P are zero."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 4)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):  # x (B, 1, 8)
        flat = x.flatten(1)
        idx = (flat[:, 0].abs() * 10).long().clamp(max=31)
        return self.fc(torch.cat([flat, self.emb(idx)], 1))


def record(path, model, steps=30, every=2, forward=None):
    store = TrajectoryStore.create(path, model)
    rec = Recorder(store, model, every_n_steps=every)
    rec.start()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    for k, (x, y) in enumerate(batches(steps, seed=1)):
        opt.zero_grad()
        out = model(x) if forward is None else forward(model, x, k)
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
        rec.step()
    store.close()
    return path


@pytest.fixture
def frozen_first(tmp_path):
    torch.manual_seed(0)
    model = FrozenFirst()
    model.emb.weight.requires_grad_(False)
    path = record(tmp_path / "run.zarr", model)
    extract_subspace(path, dim=3, snapshots=slice(0, 10), name="a")
    extract_subspace(path, dim=3, snapshots=slice(4, 15), name="b")
    with TrajectoryStore.open(path) as s:
        s.load_into(model, 0)
    return path, model


def train(model, opt, k, seed=2):
    for x, y in batches(k, seed=seed):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_subspaces_that_agree_on_their_first_rows_get_different_fingerprints(frozen_first):
    path, model = frozen_first
    a, b = Basis.from_store(path, "a"), Basis.from_store(path, "b")
    assert not host_array(a)[:128].any() and not host_array(b)[:128].any()  # the collision's precondition
    assert not np.array_equal(host_array(a), host_array(b))
    assert not torch.equal(a.fingerprint(), b.fingerprint())
    opt = SubspaceSGD(model.parameters(), a, lr=0.1, momentum=0.9)
    train(model, opt, 3)
    with pytest.raises(LayoutMismatchError, match="different basis"):
        SubspaceSGD(model.parameters(), b, lr=0.1, momentum=0.9).load_state_dict(opt.state_dict())


def test_extraction_records_a_digest_of_the_whole_basis(frozen_first):
    path, _ = frozen_first
    for name in ("a", "b"):
        sub = open_subspace(path, name)
        assert sub.attrs["basis_digest"] == sha(sub.basis[:, :])


def test_the_fingerprint_does_not_depend_on_how_the_basis_is_loaded(frozen_first, tmp_path):
    path, model = frozen_first
    loads = [Basis.from_store(path, "a", host="pinned", mode="resident"),
             Basis.from_store(path, "a", host="pinned", mode="streamed", block_rows=17),
             Basis.from_store(path, "a", host="mmap", mode="streamed", block_rows=50),
             Basis.from_store(path, "a", host="mmap", cache_dir=tmp_path / "cache"),
             Basis.from_array(open_subspace(path, "a").to_numpy(), model)]
    first = loads[0].fingerprint()
    assert all(torch.equal(b.fingerprint(), first) for b in loads)
    opt = SubspaceSGD(model.parameters(), loads[0], lr=0.1, momentum=0.9)
    train(model, opt, 2)
    SubspaceSGD(model.parameters(), loads[2], lr=0.1, momentum=0.9).load_state_dict(opt.state_dict())


def test_subspaces_without_a_digest_still_load_and_are_told_apart(frozen_first, tmp_path):
    path, model = frozen_first
    digests = {n: open_subspace(path, n).attrs["basis_digest"] for n in ("a", "b")}
    fingerprints = {n: Basis.from_store(path, n).fingerprint() for n in ("a", "b")}
    for name in ("a", "b"):
        strip_digest(path, name)
    for name in ("a", "b"):
        truth = open_subspace(path, name).to_numpy()
        assert sha(truth) == digests[name]
        for kwargs in (dict(host="pinned"), dict(host="mmap"), dict(host="mmap"),
                       dict(host="mmap", cache_dir=tmp_path / "cache")):
            basis = Basis.from_store(path, name, **kwargs)
            np.testing.assert_array_equal(host_array(basis), truth)
            assert torch.equal(basis.fingerprint(), fingerprints[name])  # the same as with the digest
    opt = SubspaceSGD(model.parameters(), Basis.from_store(path, "a"), lr=0.1, momentum=0.9)
    train(model, opt, 2)
    with pytest.raises(LayoutMismatchError, match="different basis"):
        SubspaceSGD(model.parameters(), Basis.from_store(path, "b"), lr=0.1, momentum=0.9).load_state_dict(
            opt.state_dict())


def test_an_optimizer_state_saved_with_the_first_rows_check_loads_with_a_warning(frozen_first):
    path, model = frozen_first
    basis = Basis.from_store(path, "a")
    opt = SubspaceSGD(model.parameters(), basis, lr=0.1, momentum=0.9)
    train(model, opt, 2)
    state = opt.state_dict()
    head = basis.to_numpy()[:64].tobytes()  # what earlier versions saved
    old = torch.tensor([basis.n, basis.d, float(int(hashlib.sha1(head).hexdigest()[:12], 16))], dtype=torch.float64)
    state["state"][0]["basis_fingerprint"] = old
    opt2 = SubspaceSGD(model.parameters(), basis, lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match="first 64 rows"):
        opt2.load_state_dict(state)
    assert torch.equal(opt2.subspace_state["momentum_buffer"], opt.subspace_state["momentum_buffer"])
    assert torch.equal(opt2.state_dict()["state"][0]["basis_fingerprint"], basis.fingerprint())  # re-saved: full
    bad = dict(state, state={0: dict(state["state"][0], basis_fingerprint=old + torch.tensor([0.0, 0.0, 1.0]))})
    with pytest.raises(LayoutMismatchError, match="different basis"):
        SubspaceSGD(model.parameters(), basis, lr=0.1, momentum=0.9).load_state_dict(bad)


# -- 11: a parameter with requires_grad=True but no gradient this step is left alone ---------------------------
class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(8, 16)
        self.head_a = nn.Linear(16, 10)
        self.head_b = nn.Linear(16, 10)

    def forward(self, x, head="a"):
        h = torch.tanh(self.trunk(x.flatten(1)))
        return (self.head_a if head == "a" else self.head_b)(h)


@pytest.fixture
def two_heads(tmp_path):
    """Recorded with both heads in use (so head_b's rows of P are not zero); trained below with head a only."""
    torch.manual_seed(0)
    model = TwoHeads()
    path = record(tmp_path / "run.zarr", model, forward=lambda m, x, k: m(x, "ab"[k % 2]))
    extract_subspace(path, dim=4)
    with TrajectoryStore.open(path) as s:
        s.load_into(model, 0)
    basis = Basis.from_store(path)
    rows = slice(basis.layout.offsets[4], basis.layout.offsets[6])  # head_b.weight, head_b.bias
    assert np.abs(host_array(basis)[rows]).max() > 1e-3
    return model, basis


def twin(model, freeze_b=False):
    other = TwoHeads()
    other.load_state_dict(model.state_dict())
    if freeze_b:
        other.head_b.requires_grad_(False)
    return other


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def sgd_run(model, opt, k=4, set_to_none=True):
    for x, y in batches(k, seed=3):
        opt.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(model(x, "a"), y).backward()
        opt.step()


def bfgs_run(model, opt, k=4, backward_arg=True):
    for x, y in batches(k, seed=3):
        def closure(backward=True):
            loss = nn.functional.cross_entropy(model(x, "a"), y)
            if backward:
                opt.zero_grad()
                loss.backward()
            return loss

        opt.step(closure if backward_arg else (lambda: closure(True)))


@pytest.mark.parametrize("options", [dict(momentum=0.9), dict(momentum=0.9, weight_decay=1e-2, nesterov=True)])
def test_sgd_leaves_a_parameter_without_a_gradient_alone(two_heads, options):
    model, basis = two_heads
    frozen = twin(model, freeze_b=True)
    w0 = flat(model).clone()
    before = [p.detach().clone() for p in model.head_b.parameters()]
    sgd_run(model, SubspaceSGD(model.parameters(), basis, lr=0.1, **options))
    assert all(torch.equal(p, q) for p, q in zip(model.head_b.parameters(), before))
    assert not torch.equal(flat(model), w0)
    sgd_run(frozen, SubspaceSGD(frozen.parameters(), basis, lr=0.1, **options))
    assert torch.equal(flat(model), flat(frozen))  # exactly as if it were frozen


@pytest.mark.parametrize("options", [dict(), dict(curvature_pairs="same_batch"), dict(residual_weight=0.05)])
@pytest.mark.parametrize("backward_arg", [True, False])
def test_bfgs_leaves_a_parameter_without_a_gradient_alone(two_heads, options, backward_arg):
    model, basis = two_heads
    frozen = twin(model, freeze_b=True)
    w0 = flat(model).clone()
    before = [p.detach().clone() for p in model.head_b.parameters()]
    bfgs_run(model, SubspaceBFGS(model.parameters(), basis, **options), backward_arg=backward_arg)
    assert all(torch.equal(p, q) for p, q in zip(model.head_b.parameters(), before))
    assert not torch.equal(flat(model), w0)
    bfgs_run(frozen, SubspaceBFGS(frozen.parameters(), basis, **options), backward_arg=backward_arg)
    assert torch.equal(flat(model), flat(frozen))


def test_a_zero_gradient_is_still_a_gradient(two_heads):
    """zero_grad(set_to_none=False) leaves zeros: the parameter is updated, as torch.optim does."""
    model, basis = two_heads
    before = model.head_b.weight.detach().clone()
    sgd_run(model, SubspaceSGD(model.parameters(), basis, lr=0.1, momentum=0.9), set_to_none=False)
    assert not torch.equal(model.head_b.weight, before)
