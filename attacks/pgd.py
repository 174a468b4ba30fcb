"""Projected Gradient Descent, Madry et al. 2018, in any norm, with restarts.

    for each restart:
        x_0 = clip(x + uniform point of the eps ball)            (random start)
        for k in 1..steps:
            x_k = clip(x + project_eps(x_{k-1} + alpha * steepest(grad objective(x_{k-1})) - x))

Per sample we keep the first iterate that succeeds, over all steps and restarts; a sample that
never succeeds returns its last iterate. The default step size alpha = 2.5 eps / steps
lets an iterate cross the ball from any start (Madry et al.). The loop has no host sync: success
tracking is done with masks on the device.

EoT (`eot_samples` = k > 1, Athalye et al. 2018, for models with a random forward pass): each step
ascends the mean gradient over k forward+backward passes on the same input, and success during the
steps is judged on the mean logits of those k passes (the model's expected prediction), so a lucky
single draw does not freeze an iterate. The returned input is still verified by one fresh forward
pass (attacks.base.finalize). `gradient_calls` counts all k passes. k = 1 is the plain PGD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from robustlab.errors import InputError
from robustlab.threat import expand_per_sample

from .base import Attack, Perturbed
from .gradient import expected_logits, expected_loss_and_gradient
from .losses import LOSSES, succeeded

RANDOM_START_STREAM = 100  # + restart index; see robustlab.seeding


@dataclass(frozen=True)
class PGD(Attack):
    name: ClassVar[str] = "pgd"

    steps: int = 20
    step_size: float | None = None  # absolute; default 2.5 * eps / steps
    rel_step_size: float | None = None  # step_size = rel_step_size * eps (foolbox's convention)
    restarts: int = 1
    random_start: bool = True
    loss: str = "ce"
    eot_samples: int = 1  # EoT: gradient = mean over this many passes (randomised models)

    def validate(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise InputError("steps", f"must be a positive integer, got {self.steps!r}")
        if not isinstance(self.restarts, int) or self.restarts < 1:
            raise InputError("restarts", f"must be a positive integer, got {self.restarts!r}")
        if isinstance(self.eot_samples, bool) or not isinstance(self.eot_samples, int) or self.eot_samples < 1:
            raise InputError("eot_samples", f"must be a positive integer, got {self.eot_samples!r}")
        if self.loss not in LOSSES:
            raise InputError("loss", f"expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        for name in ("step_size", "rel_step_size"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InputError(name, f"must be positive, got {value!r}")

    def alpha(self, eps: float) -> float:
        if self.step_size is not None:
            return float(self.step_size)
        if self.rel_step_size is not None:
            return float(self.rel_step_size) * eps
        return 2.5 * eps / self.steps

    def _perturb(self, model, x, y, targets, sample_ids, eps, seed) -> Perturbed:
        norm = self.geometry
        low, high = model.bounds.tensors(x)
        eps_t = torch.full((len(x),), eps, dtype=x.dtype, device=x.device)
        alpha = self.alpha(eps)
        best = x.clone()
        found = torch.zeros(len(x), dtype=torch.bool, device=x.device)

        def keep(candidate: torch.Tensor, logits: torch.Tensor) -> None:
            nonlocal best, found
            hit = succeeded(logits, y, targets)
            best = torch.where(expand_per_sample(hit & ~found, x), candidate, best)
            found = found | hit

        for restart in range(self.restarts):
            if self.random_start:
                start = norm.random_start(eps_t, sample_ids, tuple(x.shape[1:]), seed=seed,
                                          stream=RANDOM_START_STREAM + restart, device=x.device, dtype=x.dtype)
                x_adv = torch.minimum(torch.maximum(x + start, low), high)
            else:
                x_adv = x.clone()
            for _ in range(self.steps):
                logits, _, grad = expected_loss_and_gradient(model, x_adv, y, targets, self.loss, self.eot_samples)
                keep(x_adv, logits)
                x_adv = norm.ascend(x, x_adv, grad, alpha, eps_t, low, high)
            if restart < self.restarts - 1:
                keep(x_adv, expected_logits(model, x_adv, self.eot_samples))
        # The last iterate needs no forward pass of its own: where nothing succeeded earlier it is
        # returned, and the verification pass (attacks.base.finalize) decides whether it fools.
        result = torch.where(expand_per_sample(found, x), best, x_adv)
        return Perturbed(result, gradient_calls=len(x) * self.steps * self.restarts * self.eot_samples)
