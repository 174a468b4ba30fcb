"""Fast Gradient (Sign) Method, Goodfellow et al. 2015, in any norm.

    x_adv = clip(x + eps * steepest(grad_x objective(x)))

steepest() is sign() in Linf (FGSM) and grad/||grad||_2 in L2 (the "fast gradient method").
One forward+backward per sample. Targeted: ascend -CE(target), i.e. step toward the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from robustlab.errors import InputError
from robustlab.threat import working_dtype

from .base import Attack, Perturbed
from .gradient import expected_loss_and_gradient
from .losses import LOSSES


@dataclass(frozen=True)
class FGSM(Attack):
    name: ClassVar[str] = "fgsm"

    loss: str = "ce"
    eot_samples: int = 1  # EoT: gradient = mean over this many passes (randomised models)

    def validate(self) -> None:
        if isinstance(self.eot_samples, bool) or not isinstance(self.eot_samples, int) or self.eot_samples < 1:
            raise InputError("eot_samples", f"must be a positive integer, got {self.eot_samples!r}")
        if self.loss not in LOSSES:
            raise InputError("loss", f"expected one of {', '.join(LOSSES)}, got {self.loss!r}")

    def _perturb(self, model, x, y, targets, sample_ids, eps, seed) -> Perturbed:
        # The step is taken in at least float32 (a float16 / bfloat16 gradient and x + eps rounded
        # on the model's grid); finalize casts to the model's dtype and contains the result.
        xw = x.to(working_dtype(x.dtype))
        _, _, grad = expected_loss_and_gradient(model, xw, y, targets, self.loss, self.eot_samples)
        step = self.geometry.steepest(grad) * eps
        return Perturbed(model.bounds.clip(xw + step), gradient_calls=len(x) * self.eot_samples)
