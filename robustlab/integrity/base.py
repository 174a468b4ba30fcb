"""The check contract: what a check sees (the audit's per-sample evidence) and what it returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from robustlab.attacks import Attack, AttackOutcome
from robustlab.model import ModelUnderTest

from . import text



@dataclass
class CheckResult:
    """One check on one model (and, where it applies, one norm / eps / targeted mode)."""

    model: str
    check: str
    status: str  # "pass" | "fail" | "skipped"
    norm: str | None = None
    eps: float | None = None  # None: the whole model or every eps of the mode
    targeted: str | None = None  # None: every targeted mode
    evidence: dict = field(default_factory=dict)
    seconds: float = 0.0
    reason: str = ""  # why skipped, or a short note
    found: list["Found"] = field(default_factory=list, repr=False)  # verified adversarials; not serialised

    def to_dict(self) -> dict:
        return {"model": self.model, "check": self.check, "title": text.title(self.check), "status": self.status,
                "norm": self.norm, "eps": self.eps, "targeted": self.targeted, "evidence": _jsonable(self.evidence),
                "explanation": text.explanation(self.check, self.status, self.reason),
                "next_step": text.next_step(self.check, self.status), "seconds": round(float(self.seconds), 4)}


@dataclass
class Found:
    """Verified adversarial examples a check found, for the harness to keep.

    A probe attacks a subset of the rows every attack left robust (the unbounded check, the first
    correctly classified samples); what it breaks is as real as any attack's success, so the harness
    writes these rows to the results under `label` (e.g. "probe:square") and they join the per-sample
    worst case. `parts` holds, per target set, the sample positions attacked (ascending) and the
    verified outcome on them, within eps.
    """

    label: str
    mode: str
    eps: float
    parts: list[tuple[int, torch.Tensor, AttackOutcome]]

    @property
    def probed(self) -> int:
        return sum(len(idx) for _, idx, _ in self.parts)


@dataclass
class Extra:
    """An attack the checks ask the harness to run on every attackable sample, with summary rows.

    source None: the model the audit's own attacks use (its surrogate for transfer-only models).
    Otherwise the attack runs on `source` and, when `transfer`, is judged on the audited model.
    """

    label: str
    attack: Attack
    reason: str
    check: str | None = None
    source: ModelUnderTest | None = None
    transfer: bool = False
    eps: list[float] | None = None  # None: every eps of the audit

    def describe(self, model: str) -> dict:
        return {"model": model, "attack": self.label, "config": _jsonable(self.attack.config()),
                "check": self.check, "reason": self.reason,
                "eps": None if self.eps is None else [float(e) for e in self.eps],
                "evaluated_by": "transfer to the audited model" if self.transfer else "attack on the audited model"}


@dataclass
class ModelContext:
    """What the checks of one model need from the harness."""

    mut: ModelUnderTest
    source: ModelUnderTest  # the model gradient attacks use (the surrogate of a transfer-only model)
    via_transfer: bool
    x: torch.Tensor
    y: torch.Tensor
    ids: torch.Tensor
    clean_correct: torch.Tensor
    norm: str
    eps: list[float]
    seed: int
    batch_size: int | None
    level: str
    attacks: list[Attack]
    surrogate: ModelUnderTest | None = None  # for the strict transfer check
    robust_fraction: float = 0.5

    def attack(self, name: str) -> Attack | None:
        return next((a for a in self.attacks if getattr(a, "name", None) == name
                     and not hasattr(a, "attack_class")), None)


@dataclass
class CheckCall:
    """What one run of a check can ask for (robustlab.integrity.runner builds it from the check's
    scope and passes what the check's parameters name).

    evidence: every targeted mode's per-sample results. mode/ev: the mode a "mode" or "eps" check
    runs for; eps: the budget of an "eps" check. margin_label: the margin-loss PGD's row name.
    """

    ctx: ModelContext
    evidence: dict[str, "ModeEvidence"]
    clean_logits: torch.Tensor
    margin_label: str | None = None
    mode: str | None = None
    ev: "ModeEvidence | None" = None
    eps: float | None = None


@dataclass
class ModeEvidence:
    """Per-sample results of one targeted mode, indexed (target set, sample): robust, success."""

    mode: str
    target_sets: list  # robustlab.targets.TargetSet; empty for untargeted
    masks: torch.Tensor  # (sets, n) attacked
    robust: dict[tuple[str, float], torch.Tensor] = field(default_factory=dict)
    success: dict[tuple[str, float], torch.Tensor] = field(default_factory=dict)
    unbounded: dict[str, torch.Tensor] = field(default_factory=dict)  # minimal attacks' success, no budget
    also: list["ModeEvidence"] = field(default_factory=list)  # untargeted: the targeted modes' evidence

    def targets(self, set_index: int) -> torch.Tensor | None:
        return None if not self.target_sets else self.target_sets[set_index].targets

    def labels(self, eps: float) -> list[str]:
        return [label for (label, e) in self.robust if e == eps]

    def worst(self, eps: float, labels: list[str] | None = None) -> torch.Tensor:
        """(sets, n): robust under every attack (of `labels`) at eps and at every smaller eps.

        The balls are nested (one norm), so a sample broken at a smaller eps is broken at eps too;
        untargeted, a sample a targeted mode misclassified (`also`) is broken as well.
        """
        robust = self.masks.new_ones(self.masks.shape)
        for other in [self, *self.also]:
            keys = [(label, e) for (label, e) in other.robust
                    if e <= eps + _EPS_SLACK * max(1.0, eps) and (labels is None or label in labels or other is not self)]
            if not keys:
                continue
            kept = torch.stack([other.robust[k] for k in keys]).all(dim=0)
            robust &= kept if other is self else kept.all(dim=0, keepdim=True)
        return robust

    def accuracy(self, robust: torch.Tensor) -> float:
        """Robust accuracy (share of samples robust under every target) from a (sets, n) mask."""
        return float(robust.all(dim=0).double().mean())


_EPS_SLACK = 1e-9  # relative: eps values equal up to float noise are the same budget


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):
        return value.item()
    return value
