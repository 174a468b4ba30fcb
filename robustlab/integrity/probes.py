"""Checks that run a stronger or different attack on the points the audit's attacks left robust (4, 5).

Only rows that every attack failed on can lower the worst-case robust accuracy, so the probe
attack runs on those alone (default: a seeded random subset of them; strict: all). With R such
rows out of n samples, m probed and b broken, the worst-case robust accuracy would fall by about
(b / m) R / n. A check fails when the lower end of the 99% Wilson interval of b / m, scaled by
R / n, exceeds DROP_TOLERANCE: the audit's figure is too high by more than that, beyond chance.
The probes run only at budgets where the attacks failed (elsewhere the verdict is already
"not robust" and cannot change).
"""

from __future__ import annotations

import time

import torch

from robustlab.attacks import PGD, Attack, Square
from robustlab.attacks.base import transfer

from .base import CheckResult, ModeEvidence, ModelContext
from .stats import wilson

DROP_TOLERANCE = 0.02
PROBE_SAMPLES = {"default": 64, "strict": None}  # None: every robust row
SQUARE_QUERIES = {"default": 300, "strict": 1000}
STREAM = {"convergence": 11, "black-box": 12}


def attacks_failed(ctx: ModelContext, ev: ModeEvidence, eps: float, labels: list[str]) -> bool:
    clean = float(ctx.clean_correct.double().mean())
    return ev.accuracy(ev.worst(eps, labels)) >= ctx.robust_fraction * clean - 1e-12


def _rows(ctx: ModelContext, ev: ModeEvidence, eps: float, labels: list[str], limit: int | None,
          stream: int) -> tuple[list[tuple[int, torch.Tensor]], int]:
    """The probed (set, sample positions) and the number R of robust rows they are drawn from."""
    robust = ev.masks & ev.worst(eps, labels)
    flat = torch.nonzero(robust.reshape(-1)).reshape(-1)
    total = len(flat)
    if limit is not None and total > limit:
        generator = torch.Generator().manual_seed(ctx.seed * 1_000_003 + stream * 7919 + int(round(eps * 1e6)))
        flat = flat[torch.randperm(total, generator=generator)[:limit]].sort().values
    n = robust.shape[1]
    sets = flat // n
    return [(int(s), flat[sets == s] % n) for s in sets.unique().tolist()], total


def probe(ctx: ModelContext, ev: ModeEvidence, eps: float, attack: Attack, rows, *, source, via_transfer: bool) -> int:
    """How many of the given rows `attack` breaks (verified on the audited model)."""
    broken = 0
    for set_index, idx in rows:
        targets = ev.targets(set_index)
        t = None if targets is None else targets[idx]
        outcome = attack(source, ctx.x[idx], ctx.y[idx], t, sample_ids=ctx.ids[idx], seed=ctx.seed,
                         batch_size=ctx.batch_size)
        if via_transfer:
            outcome = transfer(outcome, ctx.mut, ctx.x[idx], ctx.y[idx], batch_size=ctx.batch_size)
        broken += int(outcome.success.sum())
    return broken


def _judge(b: int, m: int, total: int, n: int) -> tuple[bool, dict]:
    scale = total / n if n else 0.0
    low, high = wilson(b, m) if m else (0.0, 0.0)
    evidence = {"robust_rows": total, "probed": m, "broken": b,
                "estimated_drop": (b / m) * scale if m else 0.0, "drop_lower_99": low * scale,
                "drop_upper_99": high * scale, "tolerance": DROP_TOLERANCE}
    return low * scale > DROP_TOLERANCE, evidence


def stronger_pgd(ctx: ModelContext) -> PGD:
    baseline = ctx.attack("pgd") or PGD(norm=ctx.norm, loss="margin")
    return baseline.replace(steps=2 * baseline.steps, restarts=baseline.restarts + 1)  # type: ignore[return-value]


def convergence(ctx: ModelContext, ev: ModeEvidence, eps: float, labels: list[str]) -> CheckResult:
    started = time.perf_counter()
    base = dict(model=ctx.mut.name, check="convergence", norm=ctx.norm, eps=eps, targeted=ev.mode)
    if not attacks_failed(ctx, ev, eps, labels):
        return CheckResult(status="skipped", reason="the attacks already broke the model at this eps", **base)
    strong = stronger_pgd(ctx).replace(eps=eps)
    rows, total = _rows(ctx, ev, eps, labels, PROBE_SAMPLES.get(ctx.level), STREAM["convergence"])
    m = sum(len(i) for _, i in rows)
    b = probe(ctx, ev, eps, strong, rows, source=ctx.source, via_transfer=ctx.via_transfer) if m else 0
    failed, evidence = _judge(b, m, total, len(ctx.y))
    evidence.update(steps=strong.steps, restarts=strong.restarts, loss=strong.loss)
    return CheckResult(status="fail" if failed else "pass", evidence=evidence, seconds=time.perf_counter() - started,
                       **base)


def square_attack(ctx: ModelContext, eps: float, queries: int) -> Square:
    return Square(norm=ctx.norm, eps=eps, queries=queries, loss="margin")


def black_box(ctx: ModelContext, ev: ModeEvidence, eps: float, labels: list[str]) -> CheckResult:
    """Square (score-based) and, in strict mode with a surrogate, transfer, against the white-box worst case."""
    started = time.perf_counter()
    base = dict(model=ctx.mut.name, check="black-box", norm=ctx.norm, eps=eps, targeted=ev.mode)
    if not attacks_failed(ctx, ev, eps, labels):
        return CheckResult(status="skipped", reason="the attacks already broke the model at this eps", **base)
    square = square_attack(ctx, eps, SQUARE_QUERIES.get(ctx.level, 300))
    rows, total = _rows(ctx, ev, eps, labels, PROBE_SAMPLES.get(ctx.level), STREAM["black-box"])
    m = sum(len(i) for _, i in rows)
    b = probe(ctx, ev, eps, square, rows, source=ctx.mut, via_transfer=False) if m else 0
    failed, evidence = _judge(b, m, total, len(ctx.y))
    evidence = {"square_" + k if k in ("broken", "estimated_drop", "drop_lower_99", "drop_upper_99") else k: v
                for k, v in evidence.items()}
    evidence["square_queries"] = square.queries
    failed_by = ["square"] if failed else []
    if ctx.level == "strict":
        if ctx.surrogate is None:
            evidence["transfer"] = "skipped: no surrogate (audit(..., surrogate=module))"
        else:
            pgd = (ctx.attack("pgd") or PGD(norm=ctx.norm)).replace(eps=eps)
            bt = probe(ctx, ev, eps, pgd, rows, source=ctx.surrogate, via_transfer=True) if m else 0
            t_failed, t_evidence = _judge(bt, m, total, len(ctx.y))
            evidence.update(transfer_broken=bt, transfer_estimated_drop=t_evidence["estimated_drop"],
                            transfer_drop_lower_99=t_evidence["drop_lower_99"])
            if t_failed:
                failed_by.append("transfer")
    evidence["failed_by"] = failed_by
    return CheckResult(status="fail" if failed_by else "pass", evidence=evidence,
                       seconds=time.perf_counter() - started, **base)
