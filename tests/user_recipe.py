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
