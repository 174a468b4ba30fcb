"""Objectives the gradient attacks ascend, per sample.

Untargeted attacks push away from the true label, targeted ones toward the target. Both are written
as a quantity to *maximise*, so FGSM and PGD share one update rule.
- "ce": cross-entropy (Madry et al. 2018).
- "margin": the logit margin of Carlini and Wagner 2017; unlike cross-entropy it does not vanish
  when the softmax saturates (defensive distillation, probability outputs).
- "dlr": the Difference of Logits Ratio of Croce and Hein 2020 (APGD): the margin divided by the
  spread of the top logits, so it is invariant to shifting and rescaling the logits; targeted,
  the published targeted DLR.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "margin", "dlr")


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


def dlr(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020, eq. 5 and its targeted form), to maximise.

    Untargeted: (max_{j != y} z_j - z_y) / (z_(1) - z_(3)); targeted: (z_t - z_y) / (z_(1) -
    (z_(3) + z_(4)) / 2), with z_(i) the i-th largest logit. With fewer classes than the formula
    reads (3 untargeted, 4 targeted) the ratio degenerates (with 2 classes it is the constant +-1),
    so the plain logit margin is used there: the same sign, a usable gradient.
    """
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    k = z.shape[1]
    if targets is None:
        gap = best_other(z, labels) - class_logit(z, labels)
        if k < 3:
            return gap
        ordered = z.topk(3, dim=1).values
        return gap / (ordered[:, 0] - ordered[:, 2] + 1e-12)
    gap = class_logit(z, targets) - class_logit(z, labels)
    if k < 4:
        return gap
    ordered = z.topk(4, dim=1).values
    return gap / (ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3]) + 1e-12)


def objective(name: str, logits: torch.Tensor, labels: torch.Tensor,
              targets: torch.Tensor | None) -> torch.Tensor:
    """Per-sample quantity to maximise."""
    if name == "margin":
        return margin(logits, labels, targets)
    if name == "dlr":
        return dlr(logits, labels, targets)
    if targets is None:
        return F.cross_entropy(logits, labels, reduction="none")
    return -F.cross_entropy(logits, targets, reduction="none")


def succeeded(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Untargeted: prediction differs from the label. Targeted: prediction equals the target."""
    pred = logits.argmax(dim=1)
    return pred != labels if targets is None else pred == targets
