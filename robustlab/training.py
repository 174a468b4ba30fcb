"""Plain supervised training for the small models robustlab ships (the demo, the tests)."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.data import Dataset


M = TypeVar("M", bound=nn.Module)


def seeded_init(factory: Callable[[], M], seed: int) -> M:
    """Build a model with initial weights fixed by `seed`, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def train_classifier(model: nn.Module, data: Dataset, *, epochs: int = 40, lr: float = 3e-3,
                     batch_size: int = 64, seed: int = 0, weight_decay: float = 0.0) -> nn.Module:
    """Adam + cross-entropy, seeded; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    x, y = data.x, data.y
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            optimiser.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimiser.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset) -> float:
    return float((model(data.x).argmax(1) == data.y).float().mean())
