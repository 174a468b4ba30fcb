"""Checks read off the audit's own per-sample results (1, 3, 7): nearly free.

Each compares two attack results on the same (target set, sample) rows with McNemar counts:
b = rows only the attack that should be weaker broke, c = the reverse. Honest models give
b <= c (usually b << c); a check fails only when b exceeds c beyond chance (exact one-sided
sign test, p < ALPHA) and by a margin that matters.
"""

from __future__ import annotations

from typing import Any


from robustlab.results import WORST_CASE

from .base import CheckResult, ModeEvidence, ModelContext
from .stats import sign_test_p

ALPHA = 1e-3
SINGLE_STEP_SHARE = 0.02  # FGSM-only breaks must also exceed this share of the attacked rows
MARGIN_GAP = 0.05  # margin-only minus CE-only breaks, as a share of attacked rows


def eps_monotonic(ctx: ModelContext, ev: ModeEvidence, labels: list[str]) -> CheckResult:
    """Per attack (and the worst case): samples robust at the larger eps but broken at the smaller."""
    eps_list = sorted(ctx.eps)
    base: dict[str, Any] = dict(model=ctx.mut.name, check="eps-monotonic", norm=ctx.norm, eps=None, targeted=ev.mode)
    if len(eps_list) < 2:
        return CheckResult(status="skipped", reason="needs two or more eps values", **base)
    pairs: list[dict[str, Any]] = []
    failed = False
    for label in labels + [WORST_CASE]:
        for lo, hi in zip(eps_list, eps_list[1:]):
            if label == WORST_CASE:
                r_lo = ev.worst(lo, labels).all(dim=0)
                r_hi = ev.worst(hi, labels).all(dim=0)
            elif (label, lo) in ev.robust and (label, hi) in ev.robust:
                r_lo, r_hi = ev.robust[(label, lo)].all(dim=0), ev.robust[(label, hi)].all(dim=0)
            else:
                continue
            rose, fell = int((r_hi & ~r_lo).sum()), int((r_lo & ~r_hi).sum())
            p = sign_test_p(rose, fell)
            hit = p < ALPHA
            failed = failed or hit
            pairs.append({"attack": label, "eps_low": lo, "eps_high": hi, "robust_low": float(r_lo.double().mean()),
                          "robust_high": float(r_hi.double().mean()), "samples_rose": rose, "samples_fell": fell,
                          "p": p, "fired": hit})
    worst = min(pairs, key=lambda q: q["p"]) if pairs else None
    evidence = {"alpha": ALPHA, "rule": "fail when samples robust only at the larger eps outnumber the reverse "
                                        "(exact one-sided sign test p < alpha)",
                "smallest_p": None if worst is None else worst["p"], "pairs": pairs}
    return CheckResult(status="fail" if failed else "pass", evidence=evidence, **base)


def _counts(ev: ModeEvidence, weak: str, strong: str, eps: float) -> tuple[int, int, int]:
    attacked = ev.masks
    a = ev.success[(weak, eps)] & attacked
    s = ev.success[(strong, eps)] & attacked
    return int((a & ~s).sum()), int((s & ~a).sum()), int(attacked.sum())


def iterative_vs_single_step(ctx: ModelContext, ev: ModeEvidence, eps: float) -> CheckResult:
    base: dict[str, Any] = dict(model=ctx.mut.name, check="iterative-vs-single-step", norm=ctx.norm, eps=eps, targeted=ev.mode)
    if ("fgsm", eps) not in ev.success or ("pgd", eps) not in ev.success:
        return CheckResult(status="skipped", reason="needs both fgsm and pgd in the audit", **base)
    if ctx.via_transfer:  # iterative attacks overfit the surrogate; single-step ones often transfer better
        return CheckResult(status="skipped", reason="attacks are transferred from a surrogate, where single-step "
                                                    "attacks often transfer better than iterative ones", **base)
    only_fgsm, only_pgd, n = _counts(ev, "fgsm", "pgd", eps)
    p = sign_test_p(only_fgsm, only_pgd)
    failed = p < ALPHA and only_fgsm > max(3, SINGLE_STEP_SHARE * n)
    evidence = {"n_attacked": n, "fgsm_only": only_fgsm, "pgd_only": only_pgd, "p": p, "alpha": ALPHA,
                "min_share": SINGLE_STEP_SHARE}
    return CheckResult(status="fail" if failed else "pass", evidence=evidence, **base)


def margin_vs_ce(ctx: ModelContext, ev: ModeEvidence, eps: float, margin_label: str | None) -> CheckResult:
    """The audit's cross-entropy PGD against the margin-loss PGD the checks always run."""
    base: dict[str, Any] = dict(model=ctx.mut.name, check="margin-vs-ce", norm=ctx.norm, eps=eps, targeted=ev.mode)
    pgd = ctx.attack("pgd")
    if pgd is None:
        return CheckResult(status="skipped", reason="no cross-entropy PGD in the audit", **base)
    if pgd.loss == "margin":  # type: ignore[attr-defined]
        return CheckResult(status="skipped", reason="the audit's PGD already uses the margin loss", **base)
    ce, margin = "pgd", margin_label or "pgd-margin"
    if (ce, eps) not in ev.success or (margin, eps) not in ev.success:
        return CheckResult(status="skipped", reason="needs a cross-entropy and a margin-loss PGD", **base)
    only_margin, only_ce, n = _swap(ev, ce, margin, eps)
    gap = (only_margin - only_ce) / n if n else 0.0
    p = sign_test_p(only_margin, only_ce)
    failed = p < ALPHA and gap > MARGIN_GAP
    evidence = {"n_attacked": n, "margin_only": only_margin, "ce_only": only_ce, "gap": gap, "max_gap": MARGIN_GAP,
                "p": p, "alpha": ALPHA, "ce_attack": ce, "margin_attack": margin,
                "ce_robust_accuracy": ev.accuracy(ev.robust[(ce, eps)]),
                "margin_robust_accuracy": ev.accuracy(ev.robust[(margin, eps)])}
    return CheckResult(status="fail" if failed else "pass", evidence=evidence, **base)


def _swap(ev: ModeEvidence, ce: str, margin: str, eps: float) -> tuple[int, int, int]:
    only_ce, only_margin, n = _counts(ev, ce, margin, eps)
    return only_margin, only_ce, n
