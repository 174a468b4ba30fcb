"""Run a model's checks in order, cheapest first, from the evidence the harness collected."""

from __future__ import annotations

import time

import torch

from . import comparisons, model_checks, probes
from .base import CheckResult, ModeEvidence, ModelContext


def run_checks(ctx: ModelContext, evidence: dict[str, ModeEvidence], clean_logits: torch.Tensor,
               margin_label: str | None) -> list[CheckResult]:
    """Every check that applies to this model (default or strict level)."""
    results: list[CheckResult] = [
        model_checks.gradients(ctx),
        model_checks.logits(ctx, clean_logits),
        model_checks.determinism(ctx),
        model_checks.unbounded(ctx, evidence),
    ]
    pgd = ctx.attack("pgd")
    for mode, ev in evidence.items():
        started = time.perf_counter()
        labels = list(dict.fromkeys(label for (label, _) in ev.robust))
        results.append(comparisons.eps_monotonic(ctx, ev, labels))
        for eps in ctx.eps:
            results.append(comparisons.iterative_vs_single_step(ctx, ev, eps))
            if pgd is not None and pgd.loss == "margin":
                results.append(CheckResult(model=ctx.mut.name, check="margin-vs-ce", status="skipped", norm=ctx.norm,
                                           eps=eps, targeted=mode, reason="the audit's PGD already uses the margin loss"))
            elif pgd is None:
                results.append(CheckResult(model=ctx.mut.name, check="margin-vs-ce", status="skipped", norm=ctx.norm,
                                           eps=eps, targeted=mode, reason="no cross-entropy PGD in the audit"))
            else:
                results.append(comparisons.margin_vs_ce(ctx, ev, eps, "pgd", margin_label or "pgd-margin"))
        spent = time.perf_counter() - started
        for r in results[-(1 + 2 * len(ctx.eps)):]:
            r.seconds = spent / (1 + 2 * len(ctx.eps))
        for eps in ctx.eps:  # every eps, whatever its verdict: a gate can read any figure
            results.append(probes.convergence(ctx, ev, eps))
            results.append(probes.black_box(ctx, ev, eps))
    for r in results:
        r.norm = r.norm if r.norm is not None or r.check in ("gradients", "logits", "determinism", "unbounded") \
            else ctx.norm
    return results
