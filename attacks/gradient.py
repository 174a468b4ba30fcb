"""Shared step of the gradient attacks: one forward+backward for input gradients only."""

from __future__ import annotations

import torch

from robustlab.model import ModelUnderTest

from .losses import objective


def loss_and_gradient(model: ModelUnderTest, x: torch.Tensor, labels: torch.Tensor,
                      targets: torch.Tensor | None, loss: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, per-sample objective, d objective / d x). Parameters stay frozen: no weight grads."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        value = objective(loss, logits, labels, targets)
        (grad,) = torch.autograd.grad(value.sum(), x)
    return logits.detach(), value.detach(), grad
