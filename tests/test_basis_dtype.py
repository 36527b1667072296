"""P held in bfloat16 / float16: products in float32 on the rounded basis P̂, updates exactly in span(P̂).

Real stores on disk, a real model trained and recorded, a real extraction. Tolerances:
* the same 16-bit basis resident and streamed (any block and piece size): g̃ agrees to float32
  accumulation, |Δ| <= 1e-5 · (|P̂|ᵀ|g|) per component;
* a 16-bit basis against float32 P: |g̃₁₆ − g̃₃₂| <= u · (|P|ᵀ|g|) per component, u = 2^-8 (bfloat16)
  or 2^-11 (float16): the rounding of P alone (the gradient is never rounded).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

import pipeline.placement as placement
from pipeline.basis import Basis
from pipeline.optim import SubspaceBFGS, SubspaceSGD
from trajstore.errors import InvalidArgumentError

from .helpers import batches, recorded_model

LOW = [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A recorded MixedNet with a 6-dim subspace, and the model at snapshot 0."""
    path = tmp_path_factory.mktemp("dtype") / "run.zarr"
    model = recorded_model(path, d=6)
    return path, model


def _grads(model: nn.Module, seed: int = 3) -> list[torch.Tensor]:
    x, y = batches(1, seed=seed)[0]
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _flat(tensors) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors]).numpy()


def _rounded(path, dtype) -> np.ndarray:
    """P̂: the stored float32 P rounded to ``dtype``, as float64 (n, d)."""
    p32 = torch.from_numpy(Basis.from_store(path, mode="resident").to_numpy())
    return p32.to(dtype).double().numpy()


@pytest.mark.parametrize("dtype,u", LOW)
def test_low_precision_resident_and_streamed_agree(run, monkeypatch, dtype, u):
    path, model = run
    grads = _grads(model)
    g = _flat(grads)
    f32 = Basis.from_store(path, mode="resident")
    resident = Basis.from_store(path, dtype=dtype, mode="resident")
    monkeypatch.setattr(placement, "UPCAST_BYTES", 7 * f32.d * 4)  # pieces of 7 rows: every boundary case
    streamed = Basis.from_store(path, dtype=dtype, mode="streamed", block_rows=50)
    assert resident.device_bytes() == f32.n * f32.d * torch.finfo(dtype).bits // 8 == f32.device_bytes() // 2
    assert streamed._tiles.dtype == dtype  # tiles leave the host at 2 bytes a value
    p_hat = _rounded(path, dtype)
    exact = p_hat.T @ g  # what P̂ᵀg is, in float64
    scale = np.abs(p_hat).T @ np.abs(g)  # (d,)
    for b in (resident, streamed):
        got = b.project(grads).cpu().numpy()
        assert got.dtype == np.float64
        assert np.all(np.abs(got - exact) <= 1e-5 * scale), (b, got - exact)
    g32 = f32.project(grads).numpy()
    assert np.all(np.abs(resident.project(grads).numpy() - g32) <= u * scale)


@pytest.mark.parametrize("mode", ["resident", "streamed"])
def test_psgd_update_lies_exactly_in_span_of_rounded_basis(run, monkeypatch, mode):
    """The update is P̂ c with c = −lr g̃ unrounded: it matches P̂ c to the float32 rounding of w, and it
    is not in span(P) (float32) to that accuracy: the optimizer moves in the rounded basis's span."""
    path, model0 = run
    monkeypatch.setattr(placement, "UPCAST_BYTES", 11 * 6 * 4)
    model = type(model0)()
    model.load_state_dict(model0.state_dict())
    basis = Basis.from_store(path, dtype=torch.bfloat16, mode=mode, block_rows=40)
    opt = SubspaceSGD(model.parameters(), basis, lr=0.5)
    before = _flat(model.parameters())
    grads = _grads(model)
    g = basis.project(grads).numpy()
    opt.step()
    delta = _flat(model.parameters()) - before  # (n,)
    p_hat = _rounded(path, torch.bfloat16)
    expected = p_hat @ (-0.5 * g)
    ulp = np.spacing(np.abs(before).astype(np.float32)).astype(np.float64)  # one rounding of w + step
    products = 1e-6 * (np.abs(p_hat) @ np.abs(0.5 * g))  # float32 rounding of P̂ c (d = 6 terms)
    assert np.all(np.abs(delta - expected) <= ulp + products)
    residual = delta - p_hat @ np.linalg.lstsq(p_hat, delta, rcond=None)[0]
    p32 = Basis.from_store(path, mode="resident").to_numpy().astype(np.float64)
    outside_p = delta - p32 @ np.linalg.lstsq(p32, delta, rcond=None)[0]
    rounding = np.linalg.norm(ulp)  # w is float32: Δw is known to one ulp of w per element
    assert np.linalg.norm(residual) <= rounding
    assert np.linalg.norm(outside_p) > 30 * rounding  # the 16-bit rounding of P is far above it


def test_pbfgs_with_bfloat16_basis_moves_in_span(run):
    path, model0 = run
    model = type(model0)()
    model.load_state_dict(model0.state_dict())
    basis = Basis.from_store(path, dtype=torch.bfloat16)
    opt = SubspaceBFGS(model.parameters(), basis, module=model)
    start = _flat(model.parameters())
    first = None
    for x, y in batches(4, seed=5):
        def closure(backward=True):
            loss = nn.functional.cross_entropy(model(x), y)
            if backward:
                opt.zero_grad()
                loss.backward()
            return loss
        loss = float(opt.step(closure).detach())
        first = loss if first is None else first
    delta = _flat(model.parameters()) - start
    p_hat = _rounded(path, torch.bfloat16)
    residual = delta - p_hat @ np.linalg.lstsq(p_hat, delta, rcond=None)[0]
    ulp = np.spacing(np.abs(_flat(model.parameters())).astype(np.float32)).astype(np.float64)
    assert np.linalg.norm(delta) > 0
    assert np.linalg.norm(residual) <= 4 * np.linalg.norm(ulp)  # 4 steps, each rounded once into float32 w


def test_state_dict_round_trip_and_moves_between_dtypes(run):
    """A bf16 basis names the same extraction as the float32 one: its state loads into either."""
    path, model0 = run

    def trained(dtype, state=None, steps=3):
        model = type(model0)()
        model.load_state_dict(model0.state_dict())
        opt = SubspaceSGD(model.parameters(), Basis.from_store(path, dtype=dtype), lr=0.1, momentum=0.9)
        if state is not None:
            opt.load_state_dict(state)
        for x, y in batches(steps, seed=7):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return opt

    opt = trained(torch.bfloat16)
    assert torch.equal(opt.basis.fingerprint(), Basis.from_store(path).fingerprint())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    for dtype in (torch.bfloat16, torch.float32):
        again = trained(dtype, saved, steps=0)
        momentum = again.subspace_state["momentum_buffer"]
        assert momentum.dtype == torch.float64
        assert torch.equal(momentum, opt.subspace_state["momentum_buffer"])
        assert int(again.subspace_state["step"]) == 3


def test_refuses_a_dtype_that_is_not_a_float(run):
    path, _ = run
    with pytest.raises(InvalidArgumentError, match="dtype must be one of"):
        Basis.from_store(path, dtype=torch.int8)


def test_weight_decay_is_the_papers_none_by_default_and_projected_when_given(run):
    """Issue 11: no weight decay unless asked (P-SGD), none at all in P-BFGS; a given λ is projected with
    the gradient: with a zero gradient the step is −lr · P̂ (λ P̂ᵀ w), inside span(P̂) (16-bit basis)."""
    import inspect

    path, model0 = run
    assert "weight_decay" not in inspect.signature(SubspaceBFGS).parameters
    model = type(model0)()
    model.load_state_dict(model0.state_dict())
    basis = Basis.from_store(path, dtype=torch.bfloat16)
    assert SubspaceSGD(model.parameters(), basis, lr=0.1).defaults["weight_decay"] == 0
    opt = SubspaceSGD(model.parameters(), basis, lr=0.1, weight_decay=0.01)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = _flat(model.parameters())
    opt.step()
    p_hat = _rounded(path, torch.bfloat16)
    expected = -0.1 * p_hat @ (0.01 * (p_hat.T @ before))
    delta = _flat(model.parameters()) - before
    ulp = np.spacing(np.abs(before).astype(np.float32)).astype(np.float64)
    assert np.linalg.norm(expected) > 0
    assert np.all(np.abs(delta - expected) <= ulp + 1e-6 * np.abs(p_hat) @ np.abs(0.001 * (p_hat.T @ before)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("mode", ["resident", "streamed"])
def test_bfloat16_on_cuda_matches_the_cpu(run, monkeypatch, mode):
    """The CUDA paths (pinned 16-bit host copy, double-buffered blocks, upcast on the device) give the CPU's g̃."""
    path, model = run
    grads = _grads(model)
    monkeypatch.setattr(placement, "UPCAST_BYTES", 7 * 6 * 4)
    cpu = Basis.from_store(path, dtype=torch.bfloat16, mode="resident").project(grads).numpy()
    gpu = Basis.from_store(path, dtype=torch.bfloat16, mode=mode, block_rows=50, device="cuda")
    got = gpu.project([g.cuda() for g in grads]).cpu().numpy()
    scale = np.abs(_rounded(path, torch.bfloat16)).T @ np.abs(_flat(grads))
    assert np.all(np.abs(got - cpu) <= 1e-5 * scale)
    assert gpu.device_bytes() > 0
