"""Fast Gradient (Sign) Method, Goodfellow et al. 2015, in any norm.

    x_adv = clip(x + eps * steepest(grad_x objective(x)))

steepest() is sign() in Linf (FGSM) and grad/||grad||_2 in L2 (the "fast gradient method").
One forward+backward per sample. Targeted: ascend -CE(target), i.e. step toward the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


from robustlab.errors import InputError

from .base import Attack, Perturbed
from .gradient import loss_and_gradient
from .losses import LOSSES


@dataclass(frozen=True)
class FGSM(Attack):
    name: ClassVar[str] = "fgsm"

    loss: str = "ce"

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise InputError("loss", f"expected one of {', '.join(LOSSES)}, got {self.loss!r}")

    def _perturb(self, model, x, y, targets, sample_ids, eps, seed) -> Perturbed:
        _, _, grad = loss_and_gradient(model, x, y, targets, self.loss)
        step = self.geometry.steepest(grad) * eps
        return Perturbed(model.bounds.clip(x + step), gradient_calls=len(x))
