"""Which adaptive attacks to run, from the checks that failed (Athalye et al. 2018; Tramer et al. 2020).

Each check's registration (robustlab.integrity.catalogue) names the planner its failure calls:

- always (checks on): PGD with the margin loss ("pgd-margin"): it does not vanish where the softmax
  saturates (distillation, probability outputs) and costs one more PGD; it also feeds check 7;
- gradients blocked: BPDA ("pgd-bpda") through the layers `find_gradient_blockers` names (identity
  backward), judged on the original model by `transfer`; no such layer: the Square attack;
- random forward pass: EoT ("pgd-eot", gradient averaged over EOT_SAMPLES passes);
- black-box beat white-box: the Square attack in full ("square", AutoAttack's published settings) /
  transfer ("transfer");
- PGD not converged: the stronger PGD on every sample ("pgd-strong");
- any other failed check (unbounded, iterative-vs-single-step, eps-monotonic) with no gradient
  cause found: the Square attack, which needs no gradient.
Their rows join the summary and the per-sample worst case, so the reported robust accuracy is
the adaptive one. A check that failed at one eps calls its attack at that eps and every larger one:
the balls are nested, so an attack that was needed at eps is needed at every larger budget too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, cast

import torch

from robustlab.attacks import PGD

from . import catalogue
from .base import CheckResult, Extra, ModelContext
from .probes import published_square, stronger_pgd

EOT_SAMPLES = 8
ADAPTIVE_STEPS = 20  # at least; else twice the audit PGD's steps
BLOCKER_SAMPLES = 64


def margin_pgd(ctx: ModelContext) -> Extra | None:
    """The always-run margin-loss PGD (the audit's PGD settings with loss='margin')."""
    pgd = cast("PGD | None", ctx.attack("pgd"))  # the attack registered as "pgd" is PGD
    if pgd is not None and pgd.loss == "margin":
        return None  # the audit's PGD already uses it
    attack = (pgd or PGD(norm=ctx.norm)).replace(loss="margin", eps=None)
    return Extra(label="pgd-margin", attack=attack, check="margin-vs-ce",
                 reason="always run with the checks: the margin loss does not vanish where the softmax saturates")


@dataclass
class _Planning:
    """The plan being built from the failed checks (one planner per registry `adaptive` key)."""

    ctx: ModelContext
    steps: int
    extras: list[Extra] = field(default_factory=list)
    notes: list[dict] = field(default_factory=list)
    square_eps: set[float] = field(default_factory=set)
    gradient_cause: bool = False  # BPDA or EoT addresses the failure: no blanket Square
    square_wanted: bool = False  # a check whose failure calls for Square when no gradient cause is found


def _plan_bpda(state: _Planning, result: CheckResult) -> None:
    state.gradient_cause = True
    blocked = _bpda(state.ctx, state.steps)
    if isinstance(blocked, Extra):
        state.extras.append(blocked)
    else:
        state.notes.append({"model": state.ctx.mut.name, "attack": "pgd-bpda", "check": result.check, "reason": blocked})
        state.square_eps.update(state.ctx.eps)


def _plan_eot(state: _Planning, result: CheckResult) -> None:
    state.gradient_cause = True
    state.extras.append(Extra(label="pgd-eot", attack=PGD(norm=state.ctx.norm, steps=state.steps, loss="margin",
                                                           eot_samples=EOT_SAMPLES),
                              check=result.check,
                              reason=f"random forward pass: PGD with the gradient averaged over {EOT_SAMPLES} passes (EoT)"))


def _plan_black_box(state: _Planning, result: CheckResult) -> None:
    ctx = state.ctx
    upward = _at_and_above(ctx, result.eps)
    for source in result.evidence.get("failed_by", []):
        if source == "square":
            state.square_eps.update(upward)
        elif source == "transfer" and ctx.surrogate is not None:
            state.extras.append(Extra(label="transfer", attack=(ctx.attack("pgd") or PGD(norm=ctx.norm)).replace(eps=None),
                                      check=result.check, source=ctx.surrogate, transfer=True, eps=upward,
                                      reason="transfer from the surrogate broke points the white-box attacks missed"))


def _plan_stronger_pgd(state: _Planning, result: CheckResult) -> None:
    state.extras.append(Extra(label="pgd-strong", attack=stronger_pgd(state.ctx).replace(eps=None), check=result.check,
                              eps=_at_and_above(state.ctx, result.eps),
                              reason="PGD had not converged: twice the steps and one more restart, on every sample"))


def _plan_square(state: _Planning, result: CheckResult) -> None:
    state.square_wanted = True


# registry `adaptive` key -> planner (robustlab.integrity.catalogue.ADAPTIVE)
PLANNERS: dict[str, Callable[[_Planning, CheckResult], None]] = {
    "bpda": _plan_bpda, "eot": _plan_eot, "black-box": _plan_black_box, "stronger-pgd": _plan_stronger_pgd,
    "square": _plan_square}
_SQUARE_REASONS = ("bpda", "eot", "black-box", "square")  # planners whose checks are named in Square's reason


def plan(ctx: ModelContext, results: list[CheckResult]) -> tuple[list[Extra], list[dict]]:
    """Adaptive attacks for the failed checks (each check's registered planner), and notes on those
    that could not be run."""
    state = _Planning(ctx=ctx, steps=max(ADAPTIVE_STEPS, 2 * (getattr(ctx.attack("pgd"), "steps", 0) or 0)))
    failed = [(r, catalogue.get(r.check)) for r in results if r.status == "fail"]
    planned: set[tuple[str, str]] = set()
    for r, spec in failed:
        if spec is None or spec.adaptive is None:
            continue
        if spec.scope == "model" and (spec.id, spec.adaptive) in planned:
            continue  # a model-wide check's attack runs once
        planned.add((spec.id, spec.adaptive))
        PLANNERS[spec.adaptive](state, r)
    if state.square_wanted and not state.gradient_cause:
        state.square_eps.update(ctx.eps)
    merged: dict[str, Extra] = {}
    for e in state.extras:  # one row set per label: merge the eps lists of the same attack
        kept = merged.get(e.label)
        if kept is not None and kept.eps is not None and e.eps is not None:
            kept.eps = sorted(set(kept.eps) | set(e.eps))
        else:
            merged.setdefault(e.label, e)
    extras = list(merged.values())
    if state.square_eps:
        why = sorted({r.check for r, spec in failed if spec is not None and spec.adaptive in _SQUARE_REASONS})
        extras.append(Extra(label="square", attack=published_square(ctx, None),
                            check=", ".join(why), source=ctx.mut, eps=sorted(state.square_eps),
                            reason="a score-based attack, which needs no gradient, after: " + ", ".join(why)))
    return extras, state.notes


def _at_and_above(ctx: ModelContext, eps: float | None) -> list[float]:
    """The audit's eps values at or above `eps` (all of them for a model-wide check)."""
    if eps is None:
        return sorted(ctx.eps)
    return sorted(e for e in ctx.eps if e >= float(eps) * (1 - 1e-9))


def _bpda(ctx: ModelContext, steps: int) -> Extra | str:
    """BPDA through the blocking layers, or why it cannot run (then Square runs instead).

    The layers are searched on the model's hookable twin (robustlab.layers), so TorchScript and
    torch.export models get BPDA too; whatever stops it here (no layer found, a layer BPDA cannot
    replace) is returned as the reason, never raised: this runs after the attacks."""
    from robustlab.attacks.adaptive import bpda, locate_gradient_blockers
    from robustlab.model import NonFiniteOutputError

    if not isinstance(ctx.mut.module, torch.nn.Module):
        return "the model is not an nn.Module: no layer to replace; Square used instead"
    idx = torch.nonzero(ctx.clean_correct).reshape(-1)[:BLOCKER_SAMPLES]
    if len(idx) == 0:
        return "no correctly classified sample to locate blocking layers on"
    try:
        layers, note = locate_gradient_blockers(ctx.mut, ctx.x[idx], ctx.y[idx])
    except NonFiniteOutputError:
        raise
    except Exception as error:  # noqa: BLE001 - after the attacks: record, never crash
        return f"the blocking layers could not be searched ({_why(error)}); Square used instead"
    if not layers:
        where = f" ({note})" if note else " (an op inside a forward?)"
        return f"gradients are blocked but no single layer blocks them{where}; Square used instead"
    try:
        surrogate = bpda(ctx.mut, layers, probe=ctx.x[idx[:16]])
    except NonFiniteOutputError:
        raise
    except Exception as error:  # noqa: BLE001
        return f"BPDA could not replace {', '.join(layers)} ({_why(error)}); Square used instead"
    attack = PGD(norm=ctx.norm, steps=steps, loss="margin")
    return Extra(label="pgd-bpda", attack=attack, check="gradients", source=surrogate, transfer=True,
                 reason=f"gradients blocked by {', '.join(layers)}: BPDA (identity backward through them), adversarial "
                        "inputs judged on the original model")


def _why(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__
