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
