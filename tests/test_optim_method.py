"""Issue 11, the paper's method complete and faster: loss-only line search, trials that see f₀'s function
(dropout replayed, BN statistics as after one forward), the P(+)-BFGS residual term, same-batch and
scale-free curvature pairs, and a state_dict that carries all of it.

Real models, real training steps, real stores on disk; no mocks.
"""
import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.basis import Basis
from pipeline.optim import SubspaceBFGS
from trajstore.errors import InvalidArgumentError
from trajstore.layout import ParamLayout

from .helpers import MixedNet, batches, recorded_model


class DropNet(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear: both RNG use and running statistics."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 8)
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x.flatten(1))))))


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params]).double()


def recorded(tmp_path, make=MixedNet, d=6):
    """Train ``make()`` with momentum SGD, record it, extract a d-dim basis: (model at snapshot 0, basis)."""
    model = recorded_model(tmp_path / "run.zarr", make, d)
    return model, Basis.from_store(tmp_path / "run.zarr")


def twin(model):
    return copy.deepcopy(model)


def basis_matrix(basis) -> torch.Tensor:
    return torch.as_tensor(basis.to_numpy().astype(np.float64))  # (n, d)


class Counting:
    """Closures over one batch that count forward passes and backward passes."""

    def __init__(self, model, opt, x, y):
        self.model, self.opt, self.x, self.y = model, opt, x, y
        self.forwards = self.backwards = 0
        self.losses: list[float] = []

    def loss(self):
        self.forwards += 1
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        self.losses.append(float(loss.detach()))
        return loss

    def plain(self):
        self.opt.zero_grad()
        loss = self.loss()
        loss.backward()
        self.backwards += 1
        return loss

    def loss_only(self, backward=True):
        loss = self.loss()
        if backward:
            self.opt.zero_grad()
            loss.backward()
            self.backwards += 1
        return loss


# -- loss-only line search ---------------------------------------------------------------------------------
def test_loss_only_trials_run_no_backward_and_match_a_plain_closure_bit_for_bit(tmp_path):
    model, basis = recorded(tmp_path)
    other = twin(model)
    o1, o2 = SubspaceBFGS(model.parameters(), basis), SubspaceBFGS(other.parameters(), basis)
    trials = backwards = 0
    for x, y in batches(6, seed=2):
        c1, c2 = Counting(model, o1, x, y), Counting(other, o2, x, y)
        l1, l2 = o1.step(c1.plain), o2.step(c2.loss_only)
        assert torch.equal(l1, l2)
        assert c2.backwards == 1  # the gradient once per step; trials evaluate the loss only
        assert c2.forwards == c1.forwards == c1.backwards  # the same trials, each of them backpropagated before
        assert c2.losses == c1.losses
        trials += c2.forwards - 1
        backwards += c2.backwards
    assert trials >= 6 and backwards == 6
    assert torch.equal(flat(model.parameters()), flat(other.parameters()))
    assert torch.equal(o1.subspace_state["inverse_hessian"], o2.subspace_state["inverse_hessian"])


def test_closures_that_only_take_star_args_are_plain_closures(tmp_path):
    """A Lightning-style ``closure(*args, **kwargs)`` is never handed ``backward=False``."""
    model, basis = recorded(tmp_path)
    opt = SubspaceBFGS(model.parameters(), basis)
    x, y = batches(1, seed=2)[0]
    seen = []

    def closure(*args, **kwargs):
        seen.append((args, kwargs))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert len(seen) >= 2 and all(call == ((), {}) for call in seen)


# -- trials see f₀'s function: dropout replayed, BN statistics of one forward --------------------------------
@pytest.mark.parametrize("kind", ["plain", "loss_only"])
def test_a_trial_at_step_zero_gives_exactly_f0_with_dropout_and_batchnorm(tmp_path, kind):
    model, basis = recorded(tmp_path, DropNet)
    # lr 1e-50 underflows to 0 in float32: the trial point is w itself, bit for bit
    opt = SubspaceBFGS(model.parameters(), basis, lr=1e-50, max_ls=1)
    x, y = batches(1, seed=3)[0]
    c = Counting(model, opt, x, y)
    w = flat(model.parameters())
    opt.step(getattr(c, kind))
    assert torch.equal(flat(model.parameters()), w)
    assert len(c.losses) == 2 and c.losses[1] == c.losses[0]
    # without the replay the trial draws other dropout masks, so this test means something
    off = SubspaceBFGS(model.parameters(), basis, lr=1e-50, max_ls=1, replay_rng=False)
    c = Counting(model, off, x, y)
    off.step(getattr(c, kind))
    assert c.losses[1] != c.losses[0]


@pytest.mark.parametrize("how", ["found", "module", "buffers"])
def test_bn_statistics_and_rng_after_a_step_equal_one_training_forward(tmp_path, how):
    model, basis = recorded(tmp_path, DropNet)
    kwargs = {"found": {}, "module": {"module": model}, "buffers": {"buffers": model.buffers()}}[how]
    opt = SubspaceBFGS(model.parameters(), basis, **kwargs)
    tracked = model.bn.num_batches_tracked.item()  # the recorded training's forwards
    for i, (x, y) in enumerate(batches(5, seed=4)):
        ref = twin(model)  # the same weights and statistics; one training forward with the same RNG
        rng = torch.get_rng_state()
        ref(x)
        rng_after_one_forward = torch.get_rng_state()
        torch.set_rng_state(rng)
        c = Counting(model, opt, x, y)
        opt.step(c.loss_only if i % 2 else c.plain)
        assert c.forwards >= 2  # the trials did run forward passes in train mode
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(model.bn, name), getattr(ref.bn, name)), name
        assert torch.equal(torch.get_rng_state(), rng_after_one_forward)
    assert model.bn.num_batches_tracked.item() == tracked + 5
    assert opt.subspace_state["ls_failures"] == 0


# -- P(+)-BFGS: the residual gradient's momentum ---------------------------------------------------------------
def test_residual_term_follows_the_papers_update_step_for_step(tmp_path):
    """w ← w + P s − α m, m ← γ m + (g − P Pᵀ g), with g the full gradient at w on the step's batch."""
    model, basis = recorded(tmp_path)
    p = basis_matrix(basis)
    alpha, gamma = 0.05, 0.9
    opt = SubspaceBFGS(model.parameters(), basis, residual_weight=alpha, residual_momentum=gamma)
    w0, m = flat(model.parameters()), torch.zeros(p.shape[0], dtype=torch.float64)
    for x, y in batches(5, seed=5):
        ref = twin(model)
        nn.functional.cross_entropy(ref(x), y).backward()
        g = torch.cat([q.grad.reshape(-1) for q in ref.parameters()]).double()
        m = gamma * m + (g - p @ (p.T @ g))
        w = flat(model.parameters())
        c = Counting(model, opt, x, y)
        opt.step(c.loss_only)
        s = opt.subspace_state["prev_step"]
        expected = w + p @ s - alpha * m
        torch.testing.assert_close(flat(model.parameters()), expected, rtol=0, atol=2e-6)
        buffers = torch.cat([opt.state[q]["residual_momentum_buffer"].reshape(-1) for q in model.parameters()])
        torch.testing.assert_close(buffers.double(), m, rtol=1e-5, atol=1e-6)
    delta = flat(model.parameters()) - w0  # the residual term leaves w0 + span(P), as in the paper
    assert (delta - p @ (p.T @ delta)).norm() > 1e-3 * delta.norm()


def test_residual_weight_zero_is_the_paper_default_bit_for_bit(tmp_path):
    model, basis = recorded(tmp_path)
    other = twin(model)
    o1 = SubspaceBFGS(model.parameters(), basis)
    o2 = SubspaceBFGS(other.parameters(), basis, residual_weight=0.0, residual_momentum=0.5)
    assert o1.defaults["residual_weight"] == 0.0 and o1.defaults["residual_momentum"] == 0.9
    for x, y in batches(5, seed=6):
        o1.step(Counting(model, o1, x, y).plain)
        o2.step(Counting(other, o2, x, y).plain)
    assert torch.equal(flat(model.parameters()), flat(other.parameters()))
    assert all("residual_momentum_buffer" not in o2.state[q] for q in other.parameters())


# -- curvature pairs ------------------------------------------------------------------------------------------
def test_same_batch_pairs_use_the_gradient_at_the_accepted_point(tmp_path):
    model, basis = recorded(tmp_path)
    p = basis_matrix(basis)
    opt = SubspaceBFGS(model.parameters(), basis, curvature_pairs="same_batch")
    paper = SubspaceBFGS(twin(model).parameters(), basis)
    assert paper.defaults["curvature_pairs"] == "consecutive"
    b = torch.eye(basis.d, dtype=torch.float64)
    for x, y in batches(3, seed=7):
        before = twin(model)
        c = Counting(model, opt, x, y)
        opt.step(c.loss_only)
        assert c.backwards == 2  # f₀'s gradient and the accepted point's
        after = twin(model)
        grads = []
        for net in (before, after):  # the same batch at w and at w + P s (train mode; no dropout here)
            nn.functional.cross_entropy(net(x), y).backward()
            grads.append(p.T @ torch.cat([q.grad.reshape(-1) for q in net.parameters()]).double())
        s, yk = opt.subspace_state["prev_step"], grads[1] - grads[0]
        assert float(yk @ s) > 0
        rho = 1.0 / float(yk @ s)
        v = torch.eye(basis.d, dtype=torch.float64) - rho * torch.outer(yk, s)
        b = v.T @ b @ v + rho * torch.outer(s, s)
        torch.testing.assert_close(opt.subspace_state["inverse_hessian"], b, rtol=1e-4, atol=1e-6)


def quadratic(scale: float, test: str, steps: int = 12):
    """f(w) = ½ scale (w − c)ᵀ H (w − c) in float64 on a 5-dim subspace; (distance to the subspace minimum
    relative to the start, optimizer)."""
    torch.manual_seed(0)
    n, d = 60, 5
    h = torch.diag(torch.linspace(1.0, 3.0, n, dtype=torch.float64)) * scale
    c = 10 * torch.randn(n, dtype=torch.float64)
    w = nn.Parameter(torch.zeros(n, dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(n, d, dtype=torch.float64))
    basis = Basis.from_array(q, ParamLayout.of({"w": w.detach()}), dtype=torch.float64)
    opt = SubspaceBFGS([w], basis, curvature_test=test)

    def closure(backward=True):
        loss = 0.5 * (w - c) @ h @ (w - c)
        if backward:
            opt.zero_grad()
            loss.backward()
        return loss

    z = torch.linalg.solve(q.T @ h @ q, q.T @ h @ c)  # minimiser of f(q z)
    for _ in range(steps):
        opt.step(closure)
    return float((w.detach() - q @ z).norm() / (q @ z).norm()), opt


def test_scale_free_curvature_test_keeps_the_pairs_a_tiny_loss_scale_would_drop():
    tiny, big = 1e-8, 1.0  # with ‖s‖ ~ 1e-7 at scale 1e-8, yᵀs ~ 1e-22 falls under the paper's 1e-20
    gap, opt = quadratic(tiny, "absolute")
    assert opt.subspace_state["curvature_skips"] == 11  # every pair dropped: B stays I, w barely moves
    assert torch.equal(opt.subspace_state["inverse_hessian"], torch.eye(5, dtype=torch.float64))
    assert gap > 0.9
    for scale, reached in ((tiny, 1e-2), (big, 1e-6)):  # yᵀs > ε‖y‖‖s‖ does not depend on the loss's scale
        gap, opt = quadratic(scale, "relative")
        assert opt.subspace_state["curvature_skips"] == 0
        assert gap < reached  # (at scale 1e-8, B₀ = I is 1e8 off: BFGS needs more steps to learn it)
    gap, opt = quadratic(big, "absolute")
    assert opt.subspace_state["curvature_skips"] == 0 and gap < 1e-6
    assert opt.defaults["curvature_test"] == "absolute" and opt.defaults["curvature_eps"] == 1e-20


def test_bad_method_options_are_refused(tmp_path):
    model, basis = recorded(tmp_path)
    for bad in ({"curvature_pairs": "next"}, {"curvature_test": "cosine"}, {"residual_weight": -1.0},
                {"residual_momentum": 1.5}, {"curvature_eps": -1.0}):
        with pytest.raises(InvalidArgumentError):
            SubspaceBFGS(model.parameters(), basis, **bad)


# -- state_dict -------------------------------------------------------------------------------------------------
def test_state_dict_carries_the_new_state_through_weights_only_load_and_resumes_bit_for_bit(tmp_path):
    model, basis = recorded(tmp_path)
    options = dict(residual_weight=0.01, curvature_pairs="same_batch", curvature_test="relative")
    opt = SubspaceBFGS(model.parameters(), basis, **options)
    for x, y in batches(4, seed=8):
        opt.step(Counting(model, opt, x, y).loss_only)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    saved = ckpt["opt"]
    assert all(isinstance(v, torch.Tensor) for s in saved["state"].values() for v in s.values())
    assert sum("residual_momentum_buffer" in s for s in saved["state"].values()) == len(list(model.parameters()))
    assert saved["param_groups"][0]["curvature_pairs"] == "same_batch"
    resumed = MixedNet()
    resumed.load_state_dict(ckpt["model"])
    opt2 = SubspaceBFGS(resumed.parameters(), basis, **options)
    opt2.load_state_dict(saved)
    for q1, q2 in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(opt.state[q1]["residual_momentum_buffer"], opt2.state[q2]["residual_momentum_buffer"])
    for x, y in batches(3, seed=9):
        opt.step(Counting(model, opt, x, y).loss_only)
        opt2.step(Counting(resumed, opt2, x, y).loss_only)
    assert torch.equal(flat(model.parameters()), flat(resumed.parameters()))


def test_a_state_dict_saved_before_the_new_options_still_loads(tmp_path):
    model, basis = recorded(tmp_path)
    opt = SubspaceBFGS(model.parameters(), basis)
    for x, y in batches(2, seed=10):
        opt.step(Counting(model, opt, x, y).plain)
    old = opt.state_dict()
    for key in ("curvature_test", "curvature_pairs", "residual_momentum", "residual_weight", "replay_rng"):
        old["param_groups"][0].pop(key)
    old["state"][0].pop("curvature_skips")
    other = twin(model)
    opt2 = SubspaceBFGS(other.parameters(), basis)
    opt2.load_state_dict(old)
    assert opt2.param_groups[0]["curvature_pairs"] == "consecutive"
    for x, y in batches(2, seed=11):
        opt.step(Counting(model, opt, x, y).plain)
        opt2.step(Counting(other, opt2, x, y).plain)
    assert torch.equal(flat(model.parameters()), flat(other.parameters()))
