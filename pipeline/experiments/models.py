"""Small models for the recipes and benchmarks."""
from __future__ import annotations

from torch import nn


class CNN1D(nn.Module):
    """A 1D-CNN for MNIST-1D (input (B, 1, 40)), about 9.6K parameters."""

    def __init__(self, channels: int = 32, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, padding=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),  # (B, C, 20)
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),  # (B, C, 10)
        )
        self.head = nn.Linear(channels * 10, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of the given widths with ReLU in between."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
