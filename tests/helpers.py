"""Small real models and helpers shared by the tests."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class MixedNet(nn.Module):
    """Tensors of many shapes: conv (4-D), linear (2-D), bias (1-D), a scalar, BN with buffers."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = nn.Conv1d(1, width, 5, padding=2)
        self.bn = nn.BatchNorm1d(width)
        self.fc = nn.Linear(width * 8, 10)
        self.temperature = nn.Parameter(torch.tensor(1.5))
        self.emb = nn.Parameter(torch.randn(3, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 8)
        h = torch.relu(self.bn(self.conv(x)))  # (B, width, 8)
        return self.fc(h.flatten(1)) / self.temperature + self.emb.sum()


def flat(model: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def sgd_steps(model: nn.Module, k: int, seed: int = 0, lr: float = 0.05):
    """k real SGD steps on random data; yields after each step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(k):
        x = torch.randn(16, 1, 8, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield loss.item()


def batches(k: int, seed: int = 0, n: int = 32, shape: tuple = (1, 8), classes: int = 10) -> list:
    """``k`` random mini-batches (x (n, *shape), y (n,)) from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)) for _ in range(k)]


def record_sgd(path, model: nn.Module, steps: int = 30, every: int = 2, shape: tuple = (1, 8), classes: int = 10):
    """Train ``model`` with momentum SGD on random data, recording every ``every`` steps into a new store."""
    from trajstore import TrajectoryStore
    from trajstore.recorder import Recorder

    store = TrajectoryStore.create(path, model)
    rec = Recorder(store, model, every_n_steps=every)
    rec.start()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in batches(steps, seed=1, shape=shape, classes=classes):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        rec.step()
    store.close()
    return path


def recorded_model(path, make=MixedNet, d: int = 6) -> nn.Module:
    """``make()`` trained and recorded at ``path``, a d-dim basis extracted; the model at snapshot 0."""
    from pipeline import extract_subspace
    from trajstore import TrajectoryStore

    torch.manual_seed(0)
    model = make()
    record_sgd(path, model)
    extract_subspace(path, dim=d)
    with TrajectoryStore.open(path) as s:
        s.load_into(model, 0)
    return model
