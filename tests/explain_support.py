"""Test helpers for robustlab.explain: a breast-cancer MLP and models DeepExplainer gets wrong."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from support import single_thread


@dataclass(frozen=True)
class Tabular:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    feature_names: tuple[str, ...]
    model: nn.Module


@functools.lru_cache(maxsize=None)
def breast_cancer() -> Tabular:
    """scikit-learn's breast-cancer data, standardised on the training split and scaled into [0, 1]
    (clipped), with a 30-16-2 MLP trained full-batch with Adam (seeded, one thread, ~0.5 s)."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    x_tr, x_te, y_tr, y_te = train_test_split(data.data, data.target, test_size=0.3, random_state=0,
                                              stratify=data.target)
    mean, std = x_tr.mean(0), x_tr.std(0)
    z_tr, z_te = (x_tr - mean) / std, (x_te - mean) / std
    low, high = z_tr.min(0), z_tr.max(0)
    scale = lambda z: np.clip((z - low) / (high - low), 0.0, 1.0)  # noqa: E731
    x_train = torch.tensor(scale(z_tr), dtype=torch.float32)
    x_test = torch.tensor(scale(z_te), dtype=torch.float32)
    y_train, y_test = torch.tensor(y_tr), torch.tensor(y_te)
    with single_thread():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))
        optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(300):
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train), y_train)
            loss.backward()
            optimiser.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Tabular(x_train, y_train, x_test, y_test, tuple(str(n) for n in data.feature_names), model)


def digits_cnn_like(source: nn.Module, *, inplace: bool) -> nn.Module:
    """A copy of the digits CNN's weights in the same architecture, optionally with in-place ReLUs."""
    from robustlab.zoo import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict(source.state_dict())
    if inplace:
        for seq in (model.features, model.classifier):
            for i, layer in enumerate(seq):
                if isinstance(layer, nn.ReLU):
                    seq[i] = nn.ReLU(inplace=True)
    return model.eval()


class FunctionalRelu(nn.Module):
    """The digits CNN with its ReLUs called as functions: invisible to DeepExplainer's hooks."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        source = copy.deepcopy(source)  # never hook or alter the session's shared model
        self.conv1, self.conv2 = source.features[0], source.features[2]
        self.fc1, self.fc2 = source.classifier[1], source.classifier[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.relu(self.conv1(x))
        h = nn.functional.max_pool2d(nn.functional.relu(self.conv2(h)), 2)
        return self.fc2(nn.functional.relu(self.fc1(h.flatten(1))))


class ReusedRelu(nn.Module):
    """One nn.ReLU module applied at two places (DeepLIFT keeps one set of saved tensors per module)."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        source = copy.deepcopy(source)  # never hook or alter the session's shared model
        self.conv1, self.conv2 = source.features[0], source.features[2]
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1, self.fc2 = source.classifier[1], source.classifier[3]
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.relu(self.conv2(self.relu(self.conv1(x)))))
        return self.fc2(self.relu(self.fc1(self.flatten(h))))


class Failing(nn.Module):
    """Raises in forward after its first layer ran (for hook-removal tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        if bool(getattr(self, "explode", False)):
            raise RuntimeError("boom")
        return self.second(h)


def hook_count(module: nn.Module) -> int:
    """Every forward / backward hook registered anywhere in the module."""
    total = 0
    for m in module.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            total += len(getattr(m, name, {}))
    return total
