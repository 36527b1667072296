"""A user recipe, as a researcher would write one: python -m ... train tests.user_recipe:build"""
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def build(seed: int, batch_size: int):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(x[:1200], y[:1200]), batch_size=batch_size, shuffle=True, generator=gen)
    test = DataLoader(TensorDataset(x[1200:], y[1200:]), batch_size=500)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    return model, train, test, nn.functional.cross_entropy


def build_global_shuffle(seed: int, batch_size: int):
    """Shuffled by torch's global generator (no generator=): a run could not be resumed exactly."""
    model, train, test, loss = build(seed, batch_size)
    return model, DataLoader(train.dataset, batch_size=batch_size, shuffle=True), test, loss


def build_in_order(seed: int, batch_size: int):
    """Not shuffled, no generator: nothing random to checkpoint."""
    model, train, test, loss = build(seed, batch_size)
    return model, DataLoader(train.dataset, batch_size=batch_size), test, loss
