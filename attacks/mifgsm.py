"""Momentum Iterative FGSM, Dong et al. 2018 (MI-FGSM), in any norm.

    g_0 = 0, x_0 = x
    for t in 0..steps-1:
        c_t = contain(x_t)                                           (the point finalize would return)
        g_{t+1} = decay * g_t + grad objective(c_t) / ||grad objective(c_t)||_1
        x_{t+1} = clip(x + project_eps(x_t + alpha * steepest(g_{t+1}) - x))

The momentum term stabilises the update direction, which is what makes its adversarials transfer
better than PGD's (the paper's point; it won the NeurIPS 2017 competition). It is a white-box row
of the audit beside FGSM and PGD, not a replacement for the cascade. alpha defaults to eps / steps
(the paper's); decay 1.0 and 10 steps are the paper's. Per sample the first contained iterate
that succeeds is kept, as in PGD; no host sync in the loop. The L1 normalisation is per sample
(the paper divides by the mean absolute value, which differs by the constant number of features
and gives the same iterates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from robustlab.errors import InputError
from robustlab.threat import expand_per_sample, flat

from .base import Attack, Perturbed
from .gradient import loss_and_gradient
from .losses import LOSSES, succeeded
from .working import Working


@dataclass(frozen=True)
class MIFGSM(Attack):
    name: ClassVar[str] = "mifgsm"

    steps: int = 10
    decay: float = 1.0
    step_size: float | None = None  # absolute; default eps / steps
    loss: str = "ce"

    def validate(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise InputError("steps", f"must be a positive integer, got {self.steps!r}")
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not self.decay >= 0:
            raise InputError("decay", f"must be a number >= 0, got {self.decay!r}")
        if self.step_size is not None and not self.step_size > 0:
            raise InputError("step_size", f"must be positive, got {self.step_size!r}")
        if self.loss not in LOSSES:
            raise InputError("loss", f"expected one of {', '.join(LOSSES)}, got {self.loss!r}")

    def _perturb(self, model, x, y, targets, sample_ids, eps, seed) -> Perturbed:
        w = Working.of(model, x, eps, self.geometry)
        alpha = float(self.step_size) if self.step_size is not None else eps / self.steps
        momentum = torch.zeros_like(w.xw)
        x_adv, best = w.xw.clone(), x.clone()
        found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in self.progress(range(self.steps)):
            point = w.contained(x_adv)
            logits, _, grad = loss_and_gradient(model, point.to(w.xw.dtype), y, targets, self.loss)
            hit = succeeded(logits, y, targets) & ~found
            best = torch.where(expand_per_sample(hit, x), point, best)
            found = found | hit
            l1 = flat(grad).abs().sum(dim=1).clamp_min(1e-30)
            momentum = self.decay * momentum + grad / expand_per_sample(l1, grad)
            x_adv = w.ascend(x_adv, momentum, alpha)
        last = w.contained(x_adv)
        # The last iterate is returned where nothing succeeded earlier; finalize verifies it.
        return Perturbed(torch.where(expand_per_sample(found, x), best, last), gradient_calls=len(x) * self.steps)
