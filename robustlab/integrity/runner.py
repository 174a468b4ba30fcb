"""Run a model's checks as the registry (robustlab.integrity.catalogue) declares them, cheapest first.

Order: the model-wide checks; then per targeted mode its "mode" checks, its "eps" checks read off
the audit's own results, and last the probes (checks that run an attack of their own) at every
eps, whatever its verdict, so a gate can read any figure.
"""

from __future__ import annotations

import importlib
import inspect
import time
from typing import Callable

import torch

from robustlab import progress as bars

from . import catalogue
from .base import CheckCall, CheckResult, ModeEvidence, ModelContext

BLACK_BOX_SKIP = "the model is black-box (no gradient): only gradient-free attacks and transfer ran"


def resolve(spec: catalogue.CheckSpec) -> Callable[..., CheckResult]:
    """The function a registration names ("module:function" under robustlab.integrity)."""
    module, _, name = spec.run.partition(":")
    return getattr(importlib.import_module(f"robustlab.integrity.{module}"), name)


def call(spec: catalogue.CheckSpec, at: CheckCall) -> CheckResult:
    """Run the check with what its parameters name (ctx, ev, eps, labels, clean_logits,
    evidence_by_mode, margin_label): a check asks for the evidence it reads, nothing more."""
    fn = resolve(spec)
    available = {"ctx": at.ctx, "clean_logits": at.clean_logits, "evidence_by_mode": at.evidence,
                 "margin_label": at.margin_label, "ev": at.ev, "eps": at.eps,
                 "labels": None if at.ev is None else list(dict.fromkeys(label for (label, _) in at.ev.robust))}
    wanted = inspect.signature(fn).parameters
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise TypeError(f"check {spec.id}: {spec.run} asks for {unknown}; a check may ask for {sorted(available)}")
    return fn(**{name: available[name] for name in wanted})


def run_checks(ctx: ModelContext, evidence: dict[str, ModeEvidence], clean_logits: torch.Tensor,
               margin_label: str | None, *, black_box: bool = False) -> list[CheckResult]:
    """Every check of the context's level; on a black-box model those that need no gradient, the
    others recorded as skipped with the reason."""
    specs = catalogue.checks(ctx.level)
    skipped = [s for s in specs if black_box and not s.black_box]
    runnable = [s for s in specs if s not in skipped]
    base = CheckCall(ctx=ctx, evidence=evidence, clean_logits=clean_logits, margin_label=margin_label)
    results = [_timed(s, base) for s in runnable if s.scope == "model"]
    for mode, ev in evidence.items():
        per_mode = CheckCall(ctx=ctx, evidence=evidence, clean_logits=clean_logits, margin_label=margin_label,
                             mode=mode, ev=ev)
        results += [_timed(s, per_mode) for s in runnable if s.scope == "mode"]
        cheap = [s for s in runnable if s.scope == "eps" and not s.probe]
        probes = [s for s in runnable if s.scope == "eps" and s.probe]
        for eps in ctx.eps:
            results += [_timed(s, _at(per_mode, eps)) for s in cheap]
        if probes:
            for eps in bars.steps(ctx.eps, f"{ctx.mut.name} ({mode}): probe checks", unit="eps"):
                results += [_timed(s, _at(per_mode, eps)) for s in probes]
    results += [CheckResult(model=ctx.mut.name, check=s.id, status="skipped", reason=BLACK_BOX_SKIP) for s in skipped]
    for r in results:
        if r.norm is None and not catalogue.model_wide(r.check):
            r.norm = ctx.norm
    return results


def _at(call: CheckCall, eps: float) -> CheckCall:
    return CheckCall(ctx=call.ctx, evidence=call.evidence, clean_logits=call.clean_logits,
                     margin_label=call.margin_label, mode=call.mode, ev=call.ev, eps=eps)


def _timed(spec: catalogue.CheckSpec, at: CheckCall) -> CheckResult:
    started = time.perf_counter()
    result = call(spec, at)
    if not result.seconds:
        result.seconds = time.perf_counter() - started
    return result
