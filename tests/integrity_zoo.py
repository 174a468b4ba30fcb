"""Models with known answers for the integrity checks (built from the digits CNN in seconds).

Flagged (attacks are blinded, the model is not really robust): a quantising input layer, a
gradient-killing layer, a random input transformation, softmax outputs, defensive distillation
at T = 100. Honest: the plain CNN and a briefly PGD-adversarially-trained CNN.
Layers that defeat gradients are leaf modules, so `find_gradient_blockers` can name them.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from robustlab.data import digits_split
from robustlab.defenses import adversarial_training, distill
from robustlab.training import seeded_init
from robustlab.zoo import DigitsCNN
from support import GradientKiller, Softmaxed, digits_model, single_thread


class Quantise(nn.Module):
    """Rounds inputs to `levels` grey levels: a piecewise-constant layer, gradient zero almost everywhere."""

    def __init__(self, levels: int = 8) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * self.levels) / self.levels




class RandomNoise(nn.Module):
    """Adds Gaussian noise to the input on every forward pass (a randomised 'defense')."""

    def __init__(self, sigma: float = 0.1) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sigma * torch.randn_like(x)


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def plain() -> nn.Module:
    return _frozen(copy.deepcopy(digits_model()))


def quantised() -> nn.Module:
    return _frozen(nn.Sequential(Quantise(8), copy.deepcopy(digits_model())))


def gradient_killer() -> nn.Module:
    return _frozen(nn.Sequential(GradientKiller(), copy.deepcopy(digits_model())))


def random_noise() -> nn.Module:
    return _frozen(nn.Sequential(RandomNoise(0.1), copy.deepcopy(digits_model())))


def softmax() -> nn.Module:
    """Outputs probabilities: audit with output='probs'."""
    return _frozen(Softmaxed(copy.deepcopy(digits_model())))


@functools.lru_cache(maxsize=None)
def _distilled() -> nn.Module:
    with single_thread():
        teacher = seeded_init(DigitsCNN, 0)
        return _frozen(distill(teacher, digits_split("train"), temperature=100.0, epochs=8, teacher_epochs=8, seed=0))


def distilled() -> nn.Module:
    return copy.deepcopy(_distilled())


@functools.lru_cache(maxsize=None)
def _pgd_trained() -> nn.Module:
    with single_thread():
        model = copy.deepcopy(digits_model()).train()
        for p in model.parameters():
            p.requires_grad_(True)
        return _frozen(adversarial_training(model, digits_split("train"), method="pgd", eps=0.1, steps=5, epochs=3,
                                            seed=0))


def pgd_trained() -> nn.Module:
    return copy.deepcopy(_pgd_trained())


FLAGGED = {"quantised": quantised, "gradient-killer": gradient_killer, "random-noise": random_noise,
           "softmax": softmax, "distilled": distilled}
HONEST = {"plain": plain, "pgd-trained": pgd_trained}
