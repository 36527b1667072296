"""Issue 12: the basis cache, frozen and non-contiguous parameters, and the read-only-array warning.

Real models, real training steps, real stores on disk; no mocks.
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import extract_subspace
from pipeline.basis import Basis
from pipeline.optim import SubspaceBFGS, SubspaceSGD
from pipeline.subspace import open_subspace
from trajstore import TrajectoryStore
from trajstore.errors import InvalidArgumentError, LayoutMismatchError

from .helpers import MixedNet, batches, record_sgd


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params]).double()


record = record_sgd


def mixed_store(tmp_path, name="run.zarr", seed=0):
    """A recorded MixedNet store with subspaces ``default`` (d = 4) and ``d2`` (d = 2)."""
    torch.manual_seed(seed)
    path = record(tmp_path / name, MixedNet())
    extract_subspace(path, dim=4)
    extract_subspace(path, dim=2, name="d2")
    return path


def start_model(path, model=None):
    model = model or MixedNet()
    with TrajectoryStore.open(path) as s:
        s.load_into(model, 0)
    return model


def train(model, opt, k, seed=2, bfgs=False, shape=(1, 8), classes=10):
    for x, y in batches(k, seed=seed, shape=shape, classes=classes):
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        if bfgs:
            opt.step(closure)
        else:
            closure()
            opt.step()


def host_array(basis: Basis) -> np.ndarray:
    return basis.to_numpy()


# -- 3: the memory-map cache is keyed by store and subspace and validated ------------------------------
def test_mmap_cache_is_keyed_by_subspace_and_by_store(tmp_path):
    a = mixed_store(tmp_path, "a.zarr", seed=0)
    b = mixed_store(tmp_path, "b.zarr", seed=1)
    cache = tmp_path / "cache"
    for path in (a, b):
        for name, d in (("default", 4), ("d2", 2), ("default", 4)):
            basis = Basis.from_store(path, name, host="mmap", cache_dir=cache)
            assert basis.d == d
            np.testing.assert_array_equal(host_array(basis), open_subspace(path, name).to_numpy())
    assert not list(cache.rglob("*.partial"))


@pytest.mark.parametrize("shared", [True, False])
def test_stale_or_foreign_cache_file_is_rebuilt_never_used(tmp_path, shared):
    path = mixed_store(tmp_path)
    cache = tmp_path / "cache" if shared else None
    Basis.from_store(path, host="mmap", cache_dir=cache)
    # the same name, the same shape, other values: a re-extraction over fewer snapshots
    extract_subspace(path, dim=4, snapshots=slice(0, 10), overwrite=True)
    fresh = open_subspace(path).to_numpy()
    basis = Basis.from_store(path, host="mmap", cache_dir=cache)
    np.testing.assert_array_equal(host_array(basis), fresh)
    # a foreign file of the right shape planted where the cache is
    folder = cache if shared else path / "subspaces" / "default"
    planted = list(folder.rglob("*.npy"))
    assert planted
    for f in planted:  # a new file (not rewritten in place: the earlier Basis still maps the old one)
        np.save(f.with_suffix(".tmp.npy"), np.random.default_rng(0).standard_normal(fresh.shape).astype(np.float32))
        os.replace(f.with_suffix(".tmp.npy"), f)
    np.testing.assert_array_equal(host_array(Basis.from_store(path, host="mmap", cache_dir=cache)), fresh)


CONCURRENT = """
import sys, threading
import numpy as np
from pipeline.basis import Basis
from pipeline.subspace import open_subspace

path, cache = sys.argv[1], sys.argv[2]
expected, results, errors = open_subspace(path).to_numpy(), [], []
start = threading.Barrier(6)

def load():
    start.wait()
    try:
        results.append(Basis.from_store(path, host="mmap", cache_dir=cache).to_numpy())
    except Exception as exc:
        errors.append(repr(exc))

threads = [threading.Thread(target=load) for _ in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not errors, errors
assert len(results) == 6 and all(np.array_equal(r, expected) for r in results)
"""


def test_concurrent_loads_of_a_cold_cache_all_see_the_basis(tmp_path):
    """Six loaders at once on an empty cache (in a child process: a torn memory map is a SIGBUS)."""
    path = mixed_store(tmp_path)
    cache = tmp_path / "cache"
    done = subprocess.run([sys.executable, "-c", CONCURRENT, str(path), str(cache)], check=False,
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(cache.rglob("*.npy"))) == 1 and not list(cache.rglob("*.partial"))


# -- 6: frozen parameters stay fixed ----------------------------------------------------------------------
def frozen_setup(tmp_path, frozen=("conv",)):
    path = mixed_store(tmp_path)
    model = start_model(path)
    for name in frozen:
        getattr(model, name).requires_grad_(False)
    return path, model


MAKERS = {
    "sgd": lambda params, basis, m: SubspaceSGD(params, basis, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "bfgs": lambda params, basis, m: SubspaceBFGS(params, basis, lr=1.0, buffers=m.buffers()),
}


@pytest.mark.parametrize("kind", ["sgd", "bfgs"])
def test_frozen_parameters_are_bit_identical_and_the_rest_moves_along_p(tmp_path, kind):
    path, model = frozen_setup(tmp_path, frozen=("conv", "bn"))
    basis = Basis.from_store(path)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    w0 = flat(model.parameters())
    opt = MAKERS[kind](model.parameters(), basis, model)
    train(model, opt, 8, bfgs=kind == "bfgs")
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n
    # trainable rows moved within span(P_T), P_T = P with the frozen rows dropped
    mask = torch.cat([torch.full((p.numel(),), p.requires_grad) for p in model.parameters()])
    delta = (flat(model.parameters()) - w0)[mask]
    p_t = torch.from_numpy(host_array(basis)).double()[mask]
    coeffs = torch.linalg.lstsq(p_t, delta).solution
    assert delta.norm() > 0
    assert (delta - p_t @ coeffs).norm() <= 1e-5 * delta.norm()


def test_frozen_sgd_matches_a_dense_masked_reference(tmp_path):
    """P-SGD with frozen rows is SGD on s ↦ f(w0_T + P_T s): g̃ = P_Tᵀ g_T, w_T −= lr P_T m̃."""
    path, model = frozen_setup(tmp_path)
    basis = Basis.from_store(path)
    p = host_array(basis).astype(np.float64)
    mask = torch.cat([torch.full((q.numel(),), q.requires_grad) for q in model.parameters()]).numpy()
    opt = SubspaceSGD(model.parameters(), basis, lr=0.2, momentum=0.5)
    w, m = flat(model.parameters()).numpy(), None
    for x, y in batches(5, seed=3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        g = np.concatenate([q.grad.reshape(-1).double().numpy() if q.grad is not None else np.zeros(q.numel())
                            for q in model.parameters()])
        gt = p[mask].T @ g[mask]
        m = gt if m is None else 0.5 * m + gt
        w[mask] -= 0.2 * p[mask] @ m
        opt.step()
        np.testing.assert_allclose(flat(model.parameters()).numpy(), w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["sgd", "bfgs"])
def test_only_the_trainable_parameters_may_be_passed(tmp_path, kind):
    path, model = frozen_setup(tmp_path, frozen=("fc",))
    twin = start_model(path)
    twin.fc.requires_grad_(False)
    basis = Basis.from_store(path)
    trainable = [p for p in model.parameters() if p.requires_grad]  # unambiguous by shape for MixedNet minus fc
    opt = MAKERS[kind](trainable, basis, model)
    ref = MAKERS[kind](twin.parameters(), basis, twin)
    train(model, opt, 5, bfgs=kind == "bfgs")
    train(twin, ref, 5, bfgs=kind == "bfgs")
    assert torch.equal(flat(model.parameters()), flat(twin.parameters()))
    assert not torch.equal(flat(model.parameters()), flat(start_model(path).parameters()))


def test_an_ambiguous_subset_is_refused_and_named_parameters_resolve_it(tmp_path):
    path, model = frozen_setup(tmp_path, frozen=("conv",))  # bn.weight, bn.bias (8,) could be conv.bias too
    twin = start_model(path)
    twin.conv.requires_grad_(False)
    basis = Basis.from_store(path)
    with pytest.raises(InvalidArgumentError, match="named_parameters"):
        SubspaceSGD([p for p in model.parameters() if p.requires_grad], basis, lr=0.1)
    opt = SubspaceSGD([(n, p) for n, p in model.named_parameters() if p.requires_grad], basis, lr=0.1, momentum=0.9)
    ref = SubspaceSGD(twin.parameters(), basis, lr=0.1, momentum=0.9)
    wrapped = nn.ModuleDict({"net": model}).named_parameters()  # "net.conv.weight", as a LightningModule names it
    assert SubspaceSGD(wrapped, basis, lr=0.1).trainable() == opt.trainable()
    train(model, opt, 4)
    train(twin, ref, 4)
    assert torch.equal(flat(model.parameters()), flat(twin.parameters()))
    with pytest.raises(LayoutMismatchError, match="different model"):
        SubspaceSGD([MixedNet(width=4).fc.weight], basis, lr=0.1)
    with pytest.raises(LayoutMismatchError, match="nope"):
        SubspaceSGD([("nope", model.emb)], basis, lr=0.1)


# -- 11: non-contiguous parameters --------------------------------------------------------------------------
class ConvNet(nn.Module):
    """A small 2-D CNN (4-D conv weights, so channels_last makes them non-contiguous)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):  # x: (B, 2, 6, 6)
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


@pytest.mark.parametrize("kind", ["sgd", "bfgs"])
def test_channels_last_conv_net_is_recorded_and_trained(tmp_path, kind):
    torch.manual_seed(0)
    model = ConvNet().to(memory_format=torch.channels_last)
    assert not model.c1.weight.is_contiguous()
    path = record(tmp_path / "cnn.zarr", model, shape=(2, 6, 6), classes=5)
    extract_subspace(path, dim=4)
    basis = Basis.from_store(path, mode="streamed", block_rows=37)  # blocks split tensors mid-way
    twin = start_model(path, ConvNet())  # the same weights, contiguous
    model = start_model(path, ConvNet().to(memory_format=torch.channels_last))
    w0 = flat(model.parameters())
    make = (lambda m: SubspaceSGD(m.parameters(), basis, lr=0.1, momentum=0.9)) if kind == "sgd" else \
        (lambda m: SubspaceBFGS(m.parameters(), basis, lr=1.0))
    o1, o2 = make(model), make(twin)
    train(model, o1, 5, bfgs=kind == "bfgs", shape=(2, 6, 6), classes=5)
    train(twin, o2, 5, bfgs=kind == "bfgs", shape=(2, 6, 6), classes=5)
    assert model.c1.weight.is_contiguous(memory_format=torch.channels_last)
    delta = flat(model.parameters()) - w0
    assert delta.norm() > 0
    torch.testing.assert_close(flat(model.parameters()), flat(twin.parameters()), rtol=1e-5, atol=1e-6)
    p = torch.from_numpy(host_array(basis)).double()
    assert (delta - p @ (p.T @ delta)).norm() <= 1e-5 * delta.norm()


def test_lift_into_transposed_and_channels_last_tensors_uses_the_logical_order(tmp_path):
    torch.manual_seed(0)
    model = ConvNet()
    path = record(tmp_path / "cnn.zarr", model, shape=(2, 6, 6), classes=5)
    extract_subspace(path, dim=3)
    for mode in ("resident", "streamed"):
        basis = Basis.from_store(path, mode=mode, block_rows=50)
        c = torch.randn(3, dtype=torch.float64)
        like = [torch.empty_like(p, memory_format=torch.channels_last) if p.dim() == 4 else  # conv weights
                torch.empty(tuple(reversed(p.shape))).T if p.dim() == 2 else  # transposed fc weight
                torch.empty(2 * p.numel())[::2] for p in model.parameters()]  # strided biases
        assert not any(t.is_contiguous() for t in like)
        for got, want in zip(basis.lift(c, like=like), basis.lift(c)):
            assert torch.equal(got, want)
        grads = [torch.randn_like(t) for t in like]  # same strides as like
        torch.testing.assert_close(basis.project(grads), basis.project([g.contiguous() for g in grads]),
                                   rtol=0, atol=0)


# -- 17: no read-only array warning ---------------------------------------------------------------------------
def test_memory_mapped_basis_becomes_resident_without_a_warning(tmp_path):
    path = mixed_store(tmp_path)
    always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch warns about read-only arrays once per process; here every time
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            basis = Basis.from_store(path, host="mmap", mode="resident", cache_dir=tmp_path / "cache")
            readonly = np.array(host_array(basis))
            readonly.setflags(write=False)
            again = Basis.from_array(readonly, basis.layout, mode="resident")
    finally:
        torch.set_warn_always(always)
    assert basis.mode == "resident"
    model = start_model(path)
    grads = [torch.randn_like(p) for p in model.parameters()]
    torch.testing.assert_close(basis.project(grads), again.project(grads), rtol=0, atol=0)
    np.testing.assert_array_equal(basis.to_numpy(), open_subspace(path).to_numpy())
