"""Objectives the gradient attacks ascend, per sample.

Untargeted attacks push away from the true label, targeted ones toward the target. Both are written
as a quantity to *maximise*, so FGSM and PGD share one update rule.
- "ce": cross-entropy (Madry et al. 2018).
- "margin": the logit margin of Carlini and Wagner 2017; unlike cross-entropy it does not vanish
  when the softmax saturates (defensive distillation, probability outputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "margin")


def best_other(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Largest logit among classes other than cls, per sample."""
    masked = logits.scatter(1, cls.unsqueeze(1), float("-inf"))
    return masked.amax(dim=1)


def class_logit(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, cls.unsqueeze(1)).squeeze(1)


def margin(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Positive exactly when the attack has succeeded (ties count as failure)."""
    if targets is None:
        return best_other(logits, labels) - class_logit(logits, labels)
    return class_logit(logits, targets) - best_other(logits, targets)


def objective(name: str, logits: torch.Tensor, labels: torch.Tensor,
              targets: torch.Tensor | None) -> torch.Tensor:
    """Per-sample quantity to maximise."""
    if name == "margin":
        return margin(logits, labels, targets)
    if targets is None:
        return F.cross_entropy(logits, labels, reduction="none")
    return -F.cross_entropy(logits, targets, reduction="none")


def succeeded(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Untargeted: prediction differs from the label. Targeted: prediction equals the target."""
    pred = logits.argmax(dim=1)
    return pred != labels if targets is None else pred == targets
