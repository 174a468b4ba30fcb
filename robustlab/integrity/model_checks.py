"""Model-wide checks (6: gradients, logits, determinism; 2: an unbounded attack reaches ~100%).

They apply to every threat model of the model: a model whose gradients are blocked makes every
gradient attack blind, at every eps and in every targeted mode.
"""

from __future__ import annotations

from typing import Any

import time

import torch
import torch.nn.functional as F

from robustlab.attacks import PGD
from robustlab.attacks.base import restrict, transfer
from robustlab.attacks.losses import margin

from .base import CheckResult, Found, ModeEvidence, ModelContext
from .stats import wilson

GRADIENT_SAMPLES = 128
GRADIENT_SHARE = 0.10  # fail when more than this share of points has a zero / NaN / inf margin gradient
DETERMINISM_SAMPLES = 64
UNBOUNDED_SAMPLES = {"default": 64, "strict": 256}
UNBOUNDED_STEPS = 20
UNBOUNDED_SUCCESS = 0.95  # fail when the success rate's 99% Wilson upper bound is below this
UNBOUNDED_LABEL = "probe:unbounded"  # its adversarial examples that fit an audit eps, kept as rows
MINIMAL_MIN_STEPS = 50  # a minimal attack (CW) is judged only with at least this many steps per search step:
                        # fewer (quick CI settings) cannot reach every point even on an honest model


def _first_correct(ctx: ModelContext, count: int) -> torch.Tensor:
    return torch.nonzero(ctx.clean_correct).reshape(-1)[:count]


def input_gradients(mut, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample input gradients of cross-entropy and of the logit margin (one forward pass)."""
    x = mut.to_device(x).detach().requires_grad_(True)
    y = y.to(mut.device)
    out: dict[str, torch.Tensor] = {}
    with mut.evaluating(), torch.enable_grad():
        logits = mut(x)
        for name, value in (("ce", F.cross_entropy(logits, y, reduction="none")), ("margin", margin(logits, y, None))):
            if not value.requires_grad:  # the output does not depend on the input through autograd at all
                out[name] = torch.zeros_like(x)
                continue
            (grad,) = torch.autograd.grad(value.sum(), x, retain_graph=True, allow_unused=True)
            out[name] = torch.zeros_like(x) if grad is None else grad.detach()
    return {k: v.reshape(len(x), -1).double().cpu() for k, v in out.items()}


def gradients(ctx: ModelContext) -> CheckResult:
    started = time.perf_counter()
    base: dict[str, Any] = dict(model=ctx.mut.name, check="gradients", norm=None)
    if ctx.via_transfer:
        return CheckResult(status="skipped", reason="the model is attacked through its surrogate (no gradient of "
                                                     "its own is used)", **base)
    idx = _first_correct(ctx, GRADIENT_SAMPLES)
    if len(idx) == 0:
        return CheckResult(status="skipped", reason="no correctly classified sample", **base)
    grads = input_gradients(ctx.mut, ctx.x[idx], ctx.y[idx])
    evidence: dict = {"n": len(idx), "threshold_share": GRADIENT_SHARE}
    for name, g in grads.items():
        finite = torch.isfinite(g).all(dim=1)
        zero = finite & (g.abs().amax(dim=1) <= torch.finfo(torch.float32).tiny)
        evidence[f"share_zero_{name}"] = float(zero.double().mean())
        evidence[f"share_nonfinite_{name}"] = float((~finite).double().mean())
    bad = evidence["share_zero_margin"] + evidence["share_nonfinite_margin"]
    evidence["share_unusable_margin"] = bad
    status = "fail" if bad > GRADIENT_SHARE else "pass"
    return CheckResult(status=status, evidence=evidence, seconds=time.perf_counter() - started,
                       reason="" if status == "fail" else "margin-loss input gradients are finite and non-zero "
                                                          "(cross-entropy ones may vanish where the softmax "
                                                          "saturates: see margin-vs-ce)", **base)


def logits(ctx: ModelContext, clean_logits: torch.Tensor) -> CheckResult:
    kind = ctx.mut.inspection.output_kind if ctx.mut.inspection else "unknown"
    correct = clean_logits[ctx.clean_correct].float()
    saturated = float((torch.softmax(correct, dim=1).amax(dim=1) >= 1.0).double().mean()) if len(correct) else 0.0
    evidence = {"output_kind": kind, "share_saturated_softmax": saturated,
                "declared_output": ctx.mut.output}
    status = "fail" if kind in ("probs", "binary_prob") else "pass"
    return CheckResult(model=ctx.mut.name, check="logits", status=status, evidence=evidence)


def determinism(ctx: ModelContext) -> CheckResult:
    from robustlab.attacks.adaptive import is_random

    started = time.perf_counter()
    inspection = ctx.mut.inspection
    random = bool(inspection is not None and not inspection.deterministic)
    random = random or is_random(ctx.mut, ctx.x[:DETERMINISM_SAMPLES], repeats=3)
    evidence = {"deterministic": not random, "repeats": 3,
                "max_repeat_difference": None if inspection is None else inspection.max_repeat_difference}
    return CheckResult(model=ctx.mut.name, check="determinism", status="fail" if random else "pass",
                       evidence=evidence, seconds=time.perf_counter() - started)


def unbounded(ctx: ModelContext, evidence_by_mode: dict[str, ModeEvidence]) -> CheckResult:
    """PGD (margin loss, no random start) with eps = the whole box; and the minimal attacks' success."""
    started = time.perf_counter()
    base: dict[str, Any] = dict(model=ctx.mut.name, check="unbounded", norm=None)
    idx = _first_correct(ctx, UNBOUNDED_SAMPLES.get(ctx.level, 64))
    if len(idx) == 0:
        return CheckResult(status="skipped", reason="no correctly classified sample", **base)
    shape = tuple(ctx.x.shape[1:])
    eps = ctx.mut.bounds.width() if ctx.norm == "linf" else ctx.mut.bounds.diameter_l2(shape)
    attack = PGD(norm=ctx.norm, eps=float(eps), steps=UNBOUNDED_STEPS, random_start=False, loss="margin")
    outcome = attack(ctx.source, ctx.x[idx], ctx.y[idx], sample_ids=ctx.ids[idx], seed=ctx.seed,
                     batch_size=ctx.batch_size)
    if ctx.via_transfer:
        outcome = transfer(outcome, ctx.mut, ctx.x[idx], ctx.y[idx], batch_size=ctx.batch_size)
    hits = int(outcome.success.sum())
    evidence: dict = {"pgd_eps": float(eps), "pgd_steps": UNBOUNDED_STEPS, "pgd_n": len(idx), "pgd_success": hits,
                      "pgd_success_rate": hits / len(idx), "required_rate": UNBOUNDED_SUCCESS,
                      "rule": "fail when the 99% Wilson upper bound of a success rate is below required_rate"}
    failed = wilson(hits, len(idx))[1] < UNBOUNDED_SUCCESS
    for mode, ev in evidence_by_mode.items():
        for label, success in ev.unbounded.items():
            attacked = ev.masks
            n = int(attacked.sum())
            if n == 0:
                continue
            k = int((success & attacked).sum())
            key = label if mode == "none" else f"{label}[{mode}]"
            steps = getattr(ctx.attack(label), "steps", None)
            judged = steps is None or steps >= MINIMAL_MIN_STEPS
            evidence[f"{key}_success_rate"] = k / n
            evidence[f"{key}_n"] = n
            evidence[f"{key}_judged"] = judged
            if not judged:
                evidence[f"{key}_note"] = f"{steps} steps < {MINIMAL_MIN_STEPS}: reported, not judged"
            failed = failed or (judged and wilson(k, n)[1] < UNBOUNDED_SUCCESS)
    return CheckResult(status="fail" if failed else "pass", evidence=evidence,
                       seconds=time.perf_counter() - started, found=_within_budgets(ctx, outcome, idx, evidence_by_mode),
                       **base)


def _within_budgets(ctx: ModelContext, outcome, idx: torch.Tensor, evidence_by_mode: dict) -> list[Found]:
    """The unbounded PGD's adversarial examples at each audit eps (projected onto the ball, verified):
    an adversarial example found by a check counts like any attack's (untargeted)."""
    if "none" not in evidence_by_mode:
        return []
    return [Found(label=UNBOUNDED_LABEL, mode="none", eps=float(e),
                  parts=[(0, idx, restrict(outcome, ctx.mut, ctx.x[idx], ctx.y[idx], float(e), ctx.norm,
                                           batch_size=ctx.batch_size))])
            for e in ctx.eps]
