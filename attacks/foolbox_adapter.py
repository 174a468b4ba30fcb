"""Run any foolbox 3 attack through robustlab's verification and results path.

foolbox is imported lazily (it is heavy). The adapter hands foolbox the wrapped model (so
normalisation stays inside it and foolbox works in the user's input space), then the base class
contains, verifies and re-checks every output like any other attack's: foolbox's own success
flags are never trusted (its CW returns an all-zero input where it fails).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from robustlab.errors import InputError

from .base import Attack, Perturbed


class _Logits(nn.Module):
    """nn.Module face of a ModelUnderTest, as foolbox's PyTorchModel expects."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@dataclass(frozen=True)
class FoolboxAttack(Attack):
    """`FoolboxAttack(attack_class="LinfPGD", eps=0.1, options={"steps": 40})`."""

    name: ClassVar[str] = "foolbox"

    attack_class: str = "LinfPGD"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def minimal(self) -> bool:  # type: ignore[override]
        """Minimisation attacks (DeepFool, CW, ...) run once without a budget, then per eps."""
        import foolbox

        return issubclass(self._foolbox_class(), foolbox.attacks.base.MinimizationAttack)

    def _foolbox_class(self) -> type:
        import foolbox  # lazy: heavy

        cls = getattr(foolbox.attacks, self.attack_class, None)
        if not isinstance(cls, type) or not issubclass(cls, foolbox.attacks.base.Attack):
            raise InputError("attack", f"foolbox has no attack named {self.attack_class!r}")
        return cls

    @property
    def label(self) -> str:
        return f"foolbox:{self.attack_class}"

    def native_norm(self) -> str | None:
        """'linf' or 'l2' from the foolbox attack's distance, if it has one."""
        distance = getattr(self._foolbox_class()(**self.options), "distance", None)
        p = getattr(distance, "p", None)
        return {float("inf"): "linf", 2.0: "l2"}.get(float(p)) if isinstance(p, (int, float)) else None

    def validate(self) -> None:
        self._foolbox_class()
        native = self.native_norm()
        if native is not None and native != self.norm and not self.minimal:
            raise InputError("attack", f"foolbox:{self.attack_class} is an {native} attack with a fixed budget; "
                                       f"it cannot be evaluated under {self.norm} (use --norm {native})")

    def config(self) -> dict:
        return {"attack": f"foolbox:{self.attack_class}", "norm": self.norm, "eps": self.eps, "options": dict(self.options)}

    def _validated_eps(self, model, x):
        if self.eps is None and self.minimal:
            return None
        return super()._validated_eps(model, x)

    def _perturb(self, model, x, y, targets, sample_ids, eps, seed) -> Perturbed:
        import foolbox

        if not model.bounds.is_scalar:
            raise InputError("bounds", "foolbox attacks need scalar bounds (low, high)")
        torch.manual_seed(seed)  # foolbox draws its own random starts from torch's global generator
        fmodel = foolbox.PyTorchModel(_Logits(model).eval(), bounds=(float(model.bounds.low), float(model.bounds.high)),
                                      device=x.device)
        attack = getattr(foolbox.attacks, self.attack_class)(**self.options)
        criterion = (foolbox.criteria.Misclassification(y) if targets is None
                     else foolbox.criteria.TargetedMisclassification(targets))
        _, clipped, _ = attack(fmodel, x, criterion, epsilons=eps)
        return Perturbed(clipped.detach(), gradient_calls=0)
