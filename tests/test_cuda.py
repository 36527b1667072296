"""CUDA paths (run by benchmarks/gpu_check.sh on a lent GPU): skip cleanly on CPU-only machines."""
import numpy as np
import pytest
import torch

from pipeline.basis import Basis
from pipeline.optim import SubspaceSGD
from trajstore import TrajectoryStore

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh)")]


def _model(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10)).to(device)


def _basis_rows(model: torch.nn.Module, d: int) -> np.ndarray:
    n = sum(p.numel() for p in model.parameters())
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((n, d)))
    return q.astype(np.float32)  # (n, d)


@pytest.mark.parametrize("mode", ["resident", "streamed"])
def test_psgd_on_cuda_matches_the_cpu_steps(mode):
    """The streamed basis (two device buffers, copies on a side stream) gives the CPU result."""
    x, y = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)), torch.randint(0, 10, (32,))
    weights = {}
    for device in ("cpu", "cuda"):
        model = _model(device)
        p = _basis_rows(model, 8)
        basis = Basis.from_array(p, model, device=device, mode=mode if device == "cuda" else "resident",
                                 block_rows=1000)
        opt = SubspaceSGD(model.parameters(), basis, lr=0.1, momentum=0.9)
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        weights[device] = torch.cat([q.detach().cpu().reshape(-1) for q in model.parameters()])
    assert torch.allclose(weights["cuda"], weights["cpu"], rtol=1e-4, atol=1e-6)


def test_snapshots_of_cuda_weights_equal_their_host_copy(tmp_path):
    model = _model("cuda")
    with TrajectoryStore.create(tmp_path / "run.zarr", model) as store:
        for step in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.01)
            store.append(model, step=step)
            want = torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()]).numpy()
            store.flush()
            assert np.array_equal(store.read(step), want)
