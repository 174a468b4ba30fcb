"""Projected Gradient Descent, Madry et al. 2018, in any norm, with restarts.

    for each restart:
        x_0 = clip(x + project_eps(uniform point of the eps ball))     (random start)
        for k in 1..steps:
            c_{k-1} = contain(x_{k-1})                                  (the point finalize would return)
            x_k = clip(x + project_eps(x_{k-1} + alpha * steepest(grad objective(c_{k-1})) - x))

The iterate x_k is kept in at least float32 (robustlab.threat.working_dtype); gradients and
successes are taken at c_k, the iterate cast to the model's dtype and contained exactly inside
ball and box, so a success found in the loop is the success the verification pass sees (the
random start used to be judged outside the ball, frozen, then clamped back in by finalize where
it no longer fooled: float16 PGD reported robust accuracy twice the truth).

Per sample we keep the first (contained) iterate that succeeds, over all steps and restarts; a
sample that never succeeds returns its last iterate. The default step size alpha = 2.5 eps / steps
lets an iterate cross the ball from any start (Madry et al.). The loop has no host sync: success
tracking is done with masks on the device.

EoT (`eot_samples` = k > 1, Athalye et al. 2018, for models with a random forward pass): each step
ascends the mean gradient over k forward+backward passes on the same input. Nothing is frozen at
the first success: an iterate that fools on average sits at an expected margin near 0, where a
fresh draw fools about half the time. The loop keeps ascending the expected objective past the
boundary and keeps, per sample, the iterate (last one included) whose k draws have the largest
expected-prediction margin: the runner-up's mean softmax minus the label's (targeted: the target's
minus the best other's). The outcome is verified by the expected prediction over
`attacks.base.EOT_VERIFY_DRAWS` fresh draws (attacks.base.finalize). `gradient_calls` counts all k
passes. k = 1 is the plain PGD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from robustlab.errors import InputError
from robustlab.threat import expand_per_sample

from .base import Attack, Perturbed
from .gradient import draw_logits, draws_loss_and_gradient
from .losses import LOSSES, best_other, class_logit, succeeded
from .working import Working

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
        w = Working.of(model, x, eps, self.geometry)
        xw = w.xw
        alpha = self.alpha(eps)
        eot = self.eot_samples > 1
        best = x.clone()
        found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        best_margin = torch.full((len(x),), -math.inf, dtype=torch.float64, device=x.device)

        contained = w.contained  # the iterate as finalize would return it

        def keep(point: torch.Tensor, draws: torch.Tensor) -> None:
            nonlocal best, found, best_margin
            if not eot:  # deterministic: the first success is final (finalize re-checks that point)
                hit = succeeded(draws[0], y, targets)
                best = torch.where(expand_per_sample(hit & ~found, x), point, best)
                found = found | hit
                return
            margin = expected_margin(draws, y, targets)
            better = margin > best_margin
            best = torch.where(expand_per_sample(better, x), point, best)
            best_margin = torch.where(better, margin, best_margin)

        for restart in range(self.restarts):
            if self.random_start:
                x_adv = w.random_point(sample_ids, seed=seed, stream=RANDOM_START_STREAM + restart)
            else:
                x_adv = xw.clone()
            for _ in self.progress(range(self.steps)):
                point = contained(x_adv)
                draws, _, grad = draws_loss_and_gradient(model, point.to(xw.dtype), y, targets, self.loss,
                                                         self.eot_samples)
                keep(point, draws)
                x_adv = w.ascend(x_adv, grad, alpha)
            if eot or restart < self.restarts - 1:
                point = contained(x_adv)
                keep(point, draw_logits(model, point, self.eot_samples))
        if eot:
            return Perturbed(best, gradient_calls=len(x) * self.steps * self.restarts * self.eot_samples)
        # The last iterate needs no forward pass of its own: where nothing succeeded earlier it is
        # returned, and the verification pass (attacks.base.finalize) decides whether it fools.
        result = torch.where(expand_per_sample(found, x), best, contained(x_adv))
        return Perturbed(result, gradient_calls=len(x) * self.steps * self.restarts * self.eot_samples)


def expected_margin(draws: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Margin of the expected prediction over draws (samples, n, classes), float64: positive
    exactly where the argmax of the mean softmax fools (untargeted: differs from y; targeted:
    is the target), the criterion finalize verifies randomised models by."""
    probs = torch.softmax(draws.double(), dim=2).mean(0)
    if targets is None:
        return best_other(probs, y) - class_logit(probs, y)
    return class_logit(probs, targets) - best_other(probs, targets)
