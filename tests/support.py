"""Shared test models and data (plain functions, cached per session)."""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import nn

from robustlab.data import Dataset, digits_split
from robustlab.training import seeded_init, train_classifier
from robustlab.zoo import DigitsCNN


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """torch on one intra-op thread for the duration; the previous count restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@functools.lru_cache(maxsize=None)
def digits_model() -> DigitsCNN:
    """The test suite's digits CNN (about 97% test accuracy): 15 epochs, seed 0, one thread, so
    the same model, and the same reference figures, in every session. Do not modify it."""
    with single_thread():
        return train_classifier(seeded_init(DigitsCNN, 0), digits_split("train"), epochs=15, seed=0)


@functools.lru_cache(maxsize=None)
def digits_test(n: int = 120) -> Dataset:
    return digits_split("test").head(n)


class Scale(nn.Module):
    """Multiplies its input by a constant: puts a [0, 1] model behind inputs in [0, 255]."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Softmaxed(nn.Module):
    """A model that (wrongly, for attacks) returns probabilities."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.inner(x), dim=1)


class LogSoftmaxed(Softmaxed):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.inner(x), dim=1)


class Noisy(nn.Module):
    """Adds random noise in the forward pass (randomised 'defense')."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x + 0.05 * torch.randn_like(x))


def tiny_linear(in_features: int = 64, classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, classes)).eval()


class ZeroGradient(torch.autograd.Function):
    """Identity forward, zero backward: masks every input gradient (a 'gradient killer')."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return torch.zeros_like(grad)


class GradientKiller(nn.Module):
    """Identity forward, zero backward: a 'defense' that only hides gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ZeroGradient.apply(x)
