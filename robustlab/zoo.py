"""Small reference models: the demo's digits CNN, and factories usable as `robustlab.zoo:NAME`."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 digits: two 3x3 convolutions, max-pool, two linear layers."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def digits_cnn() -> DigitsCNN:
    """Factory for `--model robustlab.zoo:digits_cnn --weights FILE`."""
    return DigitsCNN()


def linear_classifier(in_features: int, num_classes: int) -> nn.Module:
    """A linear model: attacks on it have closed forms (used by the tests)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
