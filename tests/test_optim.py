"""P-SGD and P-BFGS: invariants that fail when the maths is wrong, on real models and real steps."""
import io

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.basis import Basis
from pipeline.optim import SubspaceBFGS, SubspaceSGD, random_subspace_basis
from trajstore.errors import LayoutMismatchError
from trajstore.layout import ParamLayout

from .helpers import MixedNet, batches, recorded_model


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params]).double()


def recorded_basis(tmp_path, d=6, **kwargs):
    """Train MixedNet with SGD, record it, extract a d-dim DLDR basis; return (model at snapshot 0, basis)."""
    model = recorded_model(tmp_path / "run.zarr", d=d)
    return model, Basis.from_store(tmp_path / "run.zarr", **kwargs)


def run_steps(model, opt, k, seed=2, bfgs=False):
    losses = []
    for x, y in batches(k, seed=seed):
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        if bfgs:
            losses.append(float(opt.step(closure).detach()))
        else:
            losses.append(float(closure().detach()))
            opt.step()
    return losses


@pytest.mark.parametrize("make", [
    lambda m, b: SubspaceSGD(m.parameters(), b, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda m, b: SubspaceSGD(m.parameters(), b, lr=0.1, momentum=0.9, nesterov=True),
    lambda m, b: SubspaceBFGS(m.parameters(), b, lr=1.0, buffers=m.buffers()),
])
def test_iterates_stay_in_w_start_plus_span_p(tmp_path, make):
    model, basis = recorded_basis(tmp_path)
    w0 = flat(model.parameters())
    opt = make(model, basis)
    run_steps(model, opt, 8, bfgs=isinstance(opt, SubspaceBFGS))
    delta = flat(model.parameters()) - w0
    p = torch.from_numpy(basis.to_numpy()).double()
    residual = delta - p @ (p.T @ delta)
    assert delta.norm() > 0
    assert residual.norm() <= 1e-6 * delta.norm()


def test_identity_basis_equals_torch_sgd_step_for_step():
    torch.manual_seed(0)
    a, b = MixedNet(), MixedNet()
    b.load_state_dict(a.state_dict())
    layout = ParamLayout.from_module(a)
    basis = Basis.from_array(torch.eye(layout.n), layout, mode="resident")
    ours = SubspaceSGD(a.parameters(), basis, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)
    ref = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)
    for x, y in batches(6):
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        torch.testing.assert_close(flat(a.parameters()), flat(b.parameters()), rtol=1e-6, atol=1e-7)


def test_matches_a_dense_numpy_reference_step_for_step(tmp_path):
    model, basis = recorded_basis(tmp_path, d=4)
    p = basis.to_numpy().astype(np.float64)
    data = batches(5, seed=3)
    sgd = SubspaceSGD(model.parameters(), basis, lr=0.2, momentum=0.5)
    w = flat(model.parameters()).numpy()
    m = None
    for x, y in data:
        sgd.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        g = np.concatenate([q.grad.reshape(-1).double().numpy() for q in model.parameters()])
        gt = p.T @ g
        m = gt if m is None else 0.5 * m + gt
        w = w - 0.2 * p @ m
        sgd.step()
        np.testing.assert_allclose(flat(model.parameters()).numpy(), w, rtol=0, atol=1e-6)


def test_bfgs_reaches_the_subspace_minimum_of_a_quadratic():
    torch.manual_seed(0)
    n, d = 200, 6
    a = torch.randn(n, n, dtype=torch.float64)
    h = (a @ a.T / n + torch.eye(n, dtype=torch.float64)).float()  # SPD Hessian
    c = torch.randn(n)
    w = nn.Parameter(torch.zeros(n))
    q, _ = torch.linalg.qr(torch.randn(n, d))
    basis = Basis.from_array(q, ParamLayout.of({"w": w.detach()}))
    opt = SubspaceBFGS([w], basis, lr=1.0)

    def closure():
        opt.zero_grad()
        loss = 0.5 * w @ h @ w - c @ w
        loss.backward()
        return loss

    q64, h64, c64 = q.double(), h.double(), c.double()
    z = torch.linalg.solve(q64.T @ h64 @ q64, q64.T @ c64)  # minimiser of f(q z)
    start_gap = (q64 @ z).norm()
    for steps in range(1, 9):
        opt.step(closure)
        if (w.detach().double() - q64 @ z).norm() <= 1e-3 * start_gap:  # float32 loss resolution
            break
    assert (w.detach().double() - q64 @ z).norm() <= 1e-3 * start_gap, steps
    assert opt.subspace_state["ls_failures"] == 0  # none on the way there (d = 6: within 8 steps)
    for _ in range(4):  # at the minimum no trial can satisfy Armijo in float32: defined, harmless failures
        opt.step(closure)
    assert (w.detach().double() - q64 @ z).norm() <= 1e-3 * start_gap


def test_bfgs_line_search_failure_reset_restores_weights_and_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    basis = random_subspace_basis(model, 3, seed=1)
    opt = SubspaceBFGS(model.parameters(), basis, lr=1.0, max_ls=3, ls_failure="reset", buffers=model.buffers())
    x = torch.randn(16, 4)
    calls = {"n": 0}

    def closure():  # the loss rises after the first evaluation: every trial is rejected
        calls["n"] += 1
        opt.zero_grad()
        loss = model(x).pow(2).mean() + (0 if calls["n"] == 1 else 1e3)
        loss.backward()
        return loss

    w_before = flat(model.parameters())
    opt.step(closure)
    assert calls["n"] == 1 + 3
    assert torch.equal(flat(model.parameters()), w_before)
    assert opt.subspace_state["ls_failures"] == 1
    assert torch.equal(opt.subspace_state["inverse_hessian"], torch.eye(3, dtype=torch.float64))
    assert model[1].num_batches_tracked.item() == 1  # the rejected trials' BN updates were undone


def test_bfgs_line_search_failure_paper_takes_the_last_shrunk_step_and_keeps_b():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    basis = random_subspace_basis(model, 3, seed=1)
    opt = SubspaceBFGS(model.parameters(), basis, lr=1.0, max_ls=3, shrink=0.5)  # ls_failure="paper"
    x = torch.randn(16, 4)
    calls = {"n": 0, "fail_after": None}

    def closure():  # from call fail_after on, every trial looks 1e3 worse than f₀
        calls["n"] += 1
        opt.zero_grad()
        worse = calls["fail_after"] is not None and calls["n"] > calls["fail_after"]
        loss = model(x).pow(2).mean() + (1e3 if worse else 0)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    b_kept = opt.subspace_state["inverse_hessian"].clone()
    assert not torch.equal(b_kept, torch.eye(3, dtype=torch.float64))  # B learnt something
    w_before = flat(model.parameters()).double()
    calls["fail_after"] = calls["n"] + 1
    opt.step(closure)
    state = opt.subspace_state
    assert calls["n"] == calls["fail_after"] + 3
    assert state["ls_failures"] == 1 and state["last_alpha"].item() == 0.5 ** 3
    moved = flat(model.parameters()).double() - w_before
    lifted = torch.cat([t.reshape(-1) for t in basis.lift(state["prev_step"].float())]).double()
    assert moved.norm() > 0 and torch.allclose(moved, lifted, atol=1e-6)  # the tiny step α p̃ was taken
    # B was updated with the previous pair (not reset to I) and p̃ = −B g̃ used it
    assert not torch.equal(state["inverse_hessian"], torch.eye(3, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["sgd", "bfgs"])
def test_state_dict_round_trips_through_weights_only_load_and_resumes_bit_for_bit(tmp_path, kind):
    model, basis = recorded_basis(tmp_path)
    make = (lambda m: SubspaceSGD(m.parameters(), basis, lr=0.1, momentum=0.9)) if kind == "sgd" else \
        (lambda m: SubspaceBFGS(m.parameters(), basis, lr=1.0, buffers=m.buffers()))
    opt = make(model)
    run_steps(model, opt, 4, seed=5, bfgs=kind == "bfgs")
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    state = ckpt["opt"]["state"][0]
    key = "momentum_buffer" if kind == "sgd" else "inverse_hessian"
    assert state[key].dtype == torch.float64
    resumed = MixedNet()
    resumed.load_state_dict(ckpt["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.subspace_state[key].dtype == torch.float64
    assert torch.equal(opt2.subspace_state[key], opt.subspace_state[key])
    run_steps(model, opt, 3, seed=6, bfgs=kind == "bfgs")
    run_steps(resumed, opt2, 3, seed=6, bfgs=kind == "bfgs")
    assert torch.equal(flat(model.parameters()), flat(resumed.parameters()))


def test_streamed_and_resident_agree(tmp_path):
    model, resident = recorded_basis(tmp_path, mode="resident")
    streamed = Basis.from_store(tmp_path / "run.zarr", mode="streamed", block_rows=97)
    mapped = Basis.from_store(tmp_path / "run.zarr", mode="streamed", block_rows=250, host="mmap")
    assert streamed.mode == "streamed" and resident.mode == "resident"
    grads = [torch.randn_like(p) for p in model.parameters()]
    torch.testing.assert_close(streamed.project(grads), resident.project(grads), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mapped.project(grads), resident.project(grads), rtol=1e-6, atol=1e-6)
    c = torch.randn(resident.d, dtype=torch.float64)
    for a, b in zip(streamed.lift(c), resident.lift(c)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    twin = MixedNet()
    twin.load_state_dict(model.state_dict())
    o1 = SubspaceSGD(model.parameters(), resident, lr=0.1, momentum=0.9)
    o2 = SubspaceSGD(twin.parameters(), streamed, lr=0.1, momentum=0.9)
    run_steps(model, o1, 5)
    run_steps(twin, o2, 5)
    torch.testing.assert_close(flat(model.parameters()), flat(twin.parameters()), rtol=1e-5, atol=1e-6)


def test_mismatched_model_and_bad_arguments_are_refused(tmp_path):
    model, basis = recorded_basis(tmp_path)
    with pytest.raises(LayoutMismatchError, match="conv.weight"):
        SubspaceSGD(MixedNet(width=4).parameters(), basis, lr=0.1)
    with pytest.raises(ValueError, match="nesterov"):
        SubspaceSGD(model.parameters(), basis, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="closure"):
        SubspaceBFGS(model.parameters(), basis).step(None)
    with pytest.raises(ValueError, match="one parameter group"):
        SubspaceSGD([{"params": [model.temperature]}, {"params": [model.emb]}], basis, lr=0.1)
    other = random_subspace_basis(model, basis.d, seed=9)
    opt = SubspaceSGD(model.parameters(), basis, lr=0.1, momentum=0.9)
    run_steps(model, opt, 1)
    with pytest.raises(LayoutMismatchError, match="different basis"):
        SubspaceSGD(model.parameters(), other, lr=0.1, momentum=0.9).load_state_dict(opt.state_dict())


def test_random_subspace_basis_is_orthonormal_and_seeded():
    model = MixedNet()
    a = random_subspace_basis(model, 10, seed=3)
    b = random_subspace_basis(model, 10, seed=3)
    p = torch.as_tensor(a.to_numpy()).double()
    torch.testing.assert_close(p.T @ p, torch.eye(10, dtype=torch.float64), rtol=0, atol=1e-6)
    assert np.array_equal(a.to_numpy(), b.to_numpy())


@pytest.mark.parametrize("kind", ["sgd", "bfgs"])
def test_usable_in_lightning_automatic_optimization(tmp_path, kind):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    model, basis = recorded_basis(tmp_path)
    w0 = flat(model.parameters())

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            if kind == "sgd":
                return SubspaceSGD(self.parameters(), basis, lr=0.1, momentum=0.9)
            return SubspaceBFGS(self.parameters(), basis, lr=1.0, buffers=self.buffers())

    x, y = torch.randn(64, 1, 8), torch.randint(0, 10, (64,))
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(Module(), DataLoader(TensorDataset(x, y), batch_size=16))
    delta = flat(model.parameters()) - w0
    p = torch.as_tensor(basis.to_numpy()).double()
    assert delta.norm() > 0
    assert (delta - p @ (p.T @ delta)).norm() <= 1e-6 * delta.norm()
