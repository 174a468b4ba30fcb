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


# Repeat the batch k times (one forward+backward) while k * batch values stay below this; otherwise
# loop k times. Both compute the same expectation; only the model's random draws differ.
EOT_REPEAT_VALUES = 1 << 22


def expected_loss_and_gradient(model: ModelUnderTest, x: torch.Tensor, labels: torch.Tensor,
                               targets: torch.Tensor | None, loss: str,
                               samples: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EoT (Athalye et al. 2018): mean logits, mean objective and mean gradient over `samples`
    forward+backward passes on the same input, so a randomised model's own randomness is averaged.

    samples == 1 is exactly `loss_and_gradient`.
    """
    if samples == 1:
        return loss_and_gradient(model, x, labels, targets, loss)
    n = len(x)
    if samples * x.numel() <= EOT_REPEAT_VALUES:
        many = x.repeat(samples, *([1] * (x.dim() - 1)))
        logits, value, grad = loss_and_gradient(model, many, labels.repeat(samples),
                                                None if targets is None else targets.repeat(samples), loss)
        return (logits.reshape(samples, n, -1).mean(0), value.reshape(samples, n).mean(0),
                grad.reshape(samples, *x.shape).mean(0))
    logits_sum = value_sum = grad_sum = None
    for _ in range(samples):
        logits, value, grad = loss_and_gradient(model, x, labels, targets, loss)
        logits_sum = logits if logits_sum is None else logits_sum + logits
        value_sum = value if value_sum is None else value_sum + value
        grad_sum = grad if grad_sum is None else grad_sum + grad
    return logits_sum / samples, value_sum / samples, grad_sum / samples


def expected_logits(model: ModelUnderTest, x: torch.Tensor, samples: int) -> torch.Tensor:
    """Mean logits over `samples` forward passes (no gradient); one plain pass when samples == 1."""
    with torch.no_grad():
        if samples == 1:
            return model(x)
        if samples * x.numel() <= EOT_REPEAT_VALUES:
            return model(x.repeat(samples, *([1] * (x.dim() - 1)))).reshape(samples, len(x), -1).mean(0)
        return torch.stack([model(x) for _ in range(samples)]).mean(0)
