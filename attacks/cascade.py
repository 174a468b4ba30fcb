"""The standard attack cascade (Croce & Hein 2020, AutoAttack's "standard" version), as one attack.

    remaining = every sample
    for member in (APGD-CE, APGD-T over the 9 most likely wrong classes, FAB-T over the same 9,
                   Square as AutoAttack runs it:
                   5000 queries, p_init 0.8, the absolute p schedule; attacks.square.PUBLISHED):
        outcome = member(remaining)                    (verified like every attack)
        remaining = remaining where the member failed
    per sample: the first member's adversarial input that fools the model, else the last attempt

Each member runs only on the samples every earlier member failed on, so the cascade costs little
more than its first member on weak models and spends its budget where robustness is claimed. The
result is the per-sample worst case over the members; `CascadeOutcome.broken_by` says which member
found each adversarial input. The "quick" suite (APGD-CE and APGD-T with fewer iterations and
targets) is for CI runs that need a fast signal; it is weaker than the standard suite, and the
verdicts say so.

The standard suite has AutoAttack's four members with its settings, so "standard" means the
same evaluation the field reports. On the digits CNNs of bench/autoattack.py (undefended and
PGD-trained, Linf and L2, 300 samples) FAB-T and Square broke none of the samples APGD-CE and
APGD-T had left (bench/fab.py; 675 sample-cases); they stay because they are the members that
catch what gradient ascent on a loss misses (FAB-T: minimum-norm steps on the linearised boundary;
Square: no gradients at all). The robust accuracies equal fra31/auto-attack's own in all 8 cases.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from robustlab.errors import InputError
from robustlab.model import ModelUnderTest

from .apgd import APGD, APGDT
from .base import Attack, AttackOutcome
from .fab import FABT
from .square import PUBLISHED, Square


def members(suite: str, norm: str) -> tuple[Attack, ...]:
    """The attacks of a suite, in cascade order, for one norm."""
    if suite == "standard":
        return (APGD(norm=norm, steps=100, loss="ce"), APGDT(norm=norm, steps=100, n_targets=9),
                FABT(norm=norm, steps=100, n_targets=9),
                Square(norm=norm, loss="margin", queries=int(PUBLISHED["queries"]), p_init=float(PUBLISHED["p_init"]),
                       rescale=bool(PUBLISHED["rescale"])))
    if suite == "quick":
        return (APGD(norm=norm, steps=25, loss="ce"), APGDT(norm=norm, steps=25, n_targets=3))
    raise InputError("suite", f"expected one of {', '.join(SUITES)}, got {suite!r}")


SUITES = ("standard", "quick")


@dataclass
class CascadeOutcome(AttackOutcome):
    """An AttackOutcome with, per sample, the cascade member that fooled it ("" where none did)."""

    broken_by: list[str] = field(default_factory=list)
    member_seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Cascade(Attack):
    name: ClassVar[str] = "cascade"

    suite: str = "standard"

    def validate(self) -> None:
        if self.suite not in SUITES:
            raise InputError("suite", f"expected one of {', '.join(SUITES)}, got {self.suite!r}")
        for member in members(self.suite, self.norm):
            member.validate()

    @property
    def label(self) -> str:
        """The row name of this suite in results: "cascade" (standard) or "cascade-quick"."""
        return self.name if self.suite == "standard" else f"{self.name}-{self.suite}"

    def members(self) -> tuple[Attack, ...]:
        return tuple(m.replace(eps=self.eps) for m in members(self.suite, self.norm))

    def __call__(self, model: ModelUnderTest, x, y, targets=None, *, sample_ids=None, seed: int = 0,
                 batch_size: int | None = None) -> CascadeOutcome:
        x, y, targets, sample_ids, eps = self.prepare(model, x, y, targets, sample_ids)
        started = time.perf_counter()
        n = len(x)
        merged: AttackOutcome | None = None
        broken_by = [""] * n
        seconds: dict[str, float] = {}
        calls = 0
        remaining = torch.arange(n)
        for member in self.members():
            if remaining.numel() == 0:
                break
            sub_targets = None if targets is None else targets[remaining]
            outcome = member(model, x[remaining], y[remaining], sub_targets, sample_ids=sample_ids[remaining],
                             seed=seed, batch_size=batch_size)
            calls += outcome.gradient_calls
            seconds[member.name] = outcome.seconds
            merged = outcome if merged is None else _overwrite(merged, outcome, remaining)
            for position in torch.nonzero(outcome.success).reshape(-1).tolist():
                broken_by[int(remaining[position])] = member.name
            remaining = remaining[~outcome.success]
        assert merged is not None  # n >= 1: validate_batch refuses empty inputs
        return CascadeOutcome(
            attack=self.label, norm=self.geometry.name, eps=eps, x_adv=merged.x_adv, adv_pred=merged.adv_pred,
            adv_confidence=merged.adv_confidence, success=merged.success, l2=merged.l2, linf=merged.linf,
            targets=None if targets is None else targets.cpu(), gradient_calls=calls,
            seconds=time.perf_counter() - started, batch_size=merged.batch_size, broken_by=broken_by,
            member_seconds=seconds)

    def _perturb(self, model, x, y, targets, sample_ids, eps, seed):  # pragma: no cover - __call__ drives members
        raise NotImplementedError("Cascade runs its members through __call__")


def _overwrite(merged: AttackOutcome, later: AttackOutcome, rows: torch.Tensor) -> AttackOutcome:
    """merged with the rows `rows` replaced by a later member's (verified) results on them."""
    def put(whole: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        out = whole.clone()
        out[rows] = part.to(out.dtype)
        return out

    return AttackOutcome(
        attack=merged.attack, norm=merged.norm, eps=merged.eps, x_adv=put(merged.x_adv, later.x_adv),
        adv_pred=put(merged.adv_pred, later.adv_pred), adv_confidence=put(merged.adv_confidence, later.adv_confidence),
        success=put(merged.success, later.success), l2=put(merged.l2, later.l2), linf=put(merged.linf, later.linf),
        targets=merged.targets, gradient_calls=merged.gradient_calls + later.gradient_calls,
        seconds=merged.seconds + later.seconds, batch_size=merged.batch_size)
