"""Verdicts from summary rows and check results; lookups for gates, reports and the CLI.

Pandas and the standard library only (no torch): gates and reports read saved results with it.

A verdict is given per (model, norm, eps, targeted mode), from the worst case over every attack,
adaptive ones included:
- "not robust": the attacks broke the model, i.e. worst-case robust accuracy
  < robust_fraction x clean accuracy (default robust_fraction = 0.5: the attacks took away more
  than half of what the model got right), or robust accuracy is 0;
- "robust": the attacks failed (the opposite), no applicable check failed, and the standard attack
  cascade (robustlab.attacks.cascade, row "cascade") ran at that threat model;
- "robustness not established": the attacks failed but at least one applicable check failed, or
  the attack suite was weaker than the standard cascade (reason SUITE_REASON). Only failed checks
  block a threshold (`threshold_blocked`): a weaker suite's figure is still an upper bound that a
  gate may compare, and the verdict says it is not established.
A check applies to a threat model when it names the same model and its norm, eps and targeted
mode are equal or null (null: model-wide, e.g. gradients; or every eps of a mode, e.g. eps-monotonic).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import pandas as pd

from robustlab.results import WORST_CASE

from .text import NOT_ESTABLISHED, NOT_ROBUST, ROBUST, VERDICT_TEXT

ROBUST_FRACTION = 0.5
STANDARD_SUITE_ROW = "cascade"  # the standard cascade's row label (robustlab.attacks.Cascade().label)
SUITE_REASON = "attack suite weaker than standard"
_EPS_TOLERANCE = 1e-9


def same_eps(a: Any, b: Any) -> bool:
    return a is not None and b is not None and abs(float(a) - float(b)) <= _EPS_TOLERANCE * max(1.0, abs(float(a)))


def applies(check: Mapping, model: str, norm: str | None, eps: float | None, targeted: str | None) -> bool:
    """Does this check result bear on the threat model (model, norm, eps, targeted)?"""
    if str(check.get("model")) != str(model):
        return False
    if check.get("norm") is not None and norm is not None and str(check["norm"]) != str(norm):
        return False
    if check.get("targeted") is not None and targeted is not None and str(check["targeted"]) != str(targeted):
        return False
    if check.get("eps") is not None and eps is not None and not same_eps(check["eps"], eps):
        return False
    return True


def compute_verdicts(summary: pd.DataFrame, checks: Iterable[Mapping], *, norm: str,
                     robust_fraction: float = ROBUST_FRACTION) -> list[dict]:
    """One verdict record per (model, eps, targeted) of the budgeted rows in `norm`."""
    checks = list(checks)
    out: list[dict] = []
    rows = summary[summary["eps"].notna() & (summary["norm"] == norm)] if len(summary) else summary
    if not len(rows):
        return out
    for (model, targeted, eps), block in rows.groupby(["model", "targeted", "eps"], sort=False):
        worst = block[block["attack"] == WORST_CASE]
        use = worst if len(worst) else block
        robust = float(use["robust_accuracy"].min())
        clean = float(block["clean_accuracy"].iloc[0])
        required = robust_fraction * clean
        fired = sorted({str(c["check"]) for c in checks
                        if c.get("status") == "fail" and applies(c, str(model), norm, float(eps), str(targeted))})
        weaker = STANDARD_SUITE_ROW not in set(block["attack"])
        if robust <= 0.0 or not robust >= required - 1e-12:
            verdict = NOT_ROBUST
        elif fired or weaker:
            verdict = NOT_ESTABLISHED
        else:
            verdict = ROBUST
        out.append({"model": str(model), "norm": norm, "eps": float(eps), "targeted": str(targeted),
                    "verdict": verdict, "robust_accuracy": robust, "clean_accuracy": clean,
                    "robust_fraction": robust_fraction, "attacks_failed": verdict != NOT_ROBUST,
                    "attacks": [a for a in dict.fromkeys(block["attack"]) if a != WORST_CASE],
                    "reasons": fired + ([SUITE_REASON] if weaker and verdict != NOT_ROBUST else []),
                    "meaning": VERDICT_TEXT[verdict]})
    return out


# ---------------------------------------------------------------------------- lookups (saved results)
def entries(metadata: Mapping | None) -> list[dict]:
    """The verdict records of a result (empty when the checks were not run)."""
    found = (metadata or {}).get("verdict")
    return [v for v in found if isinstance(v, Mapping)] if isinstance(found, list) else []


def check_results(metadata: Mapping | None) -> list[dict]:
    node = (metadata or {}).get("checks")
    results = node.get("results") if isinstance(node, Mapping) else None
    return [c for c in results if isinstance(c, Mapping)] if isinstance(results, list) else []


def level(metadata: Mapping | None) -> str | None:
    node = (metadata or {}).get("checks")
    return str(node.get("level")) if isinstance(node, Mapping) and node.get("level") else None


def find(metadata: Mapping | None, model: str, norm: str | None, eps: float | None,
         targeted: str = "none") -> dict | None:
    """The verdict record of one threat model, or None (checks not run, or no budgeted row)."""
    if eps is None or (isinstance(eps, float) and math.isnan(eps)):
        return None
    for v in entries(metadata):
        if (str(v.get("model")) == str(model) and str(v.get("targeted")) == str(targeted)
                and (norm is None or str(v.get("norm")) == str(norm)) and same_eps(v.get("eps"), eps)):
            return dict(v)
    return None


def failed_checks(entry: Mapping) -> list[str]:
    """The failed checks behind a verdict (its reasons less the weaker-suite note): what blocks a threshold."""
    return [str(r) for r in entry.get("reasons") or [] if r != SUITE_REASON]


def threshold_blocked(result: Any, model: str, norm: str | None, eps: float | None,
                      targeted: str = "none") -> str | None:
    """Why a robustness threshold on this threat model must not pass, or None.

    A threshold never passes where robustness is not established: the figure it would be compared
    with may come from blind attacks.
    """
    entry = find(getattr(result, "metadata", result), model, norm, eps, targeted)
    if entry is None or entry.get("verdict") != NOT_ESTABLISHED:
        return None
    failed = failed_checks(entry)
    if not failed and entry.get("reasons"):
        return None  # only the suite was weaker: the figure is an upper bound, and the verdict says so
    reasons = ", ".join(failed) or "a check"
    return (f"robustness not established for {model!r} at {entry.get('norm')} eps={float(entry['eps']):g} "
            f"({'untargeted' if str(targeted) == 'none' else 'targeted: ' + str(targeted)}): failed checks: "
            f"{reasons}; the attacks may be blind, so no robustness threshold can pass")


def describe(metadata: Mapping | None, *, model: str | None = None, norm: str | None = None,
             eps: float | None = None, targeted: str | None = None) -> str | None:
    """A one-line verdict for messages: one verdict, or each threat model's; None if not run."""
    chosen = [v for v in entries(metadata)
              if (model is None or str(v.get("model")) == str(model))
              and (norm is None or str(v.get("norm")) == str(norm))
              and (targeted is None or str(v.get("targeted")) == str(targeted))
              and (eps is None or same_eps(v.get("eps"), eps))]
    if not chosen:
        return None
    kinds = list(dict.fromkeys(str(v["verdict"]) for v in chosen))
    if len(kinds) == 1 and not any(v.get("reasons") for v in chosen):
        return kinds[0]
    models = len({v["model"] for v in chosen}) > 1
    modes = len({v["targeted"] for v in chosen}) > 1
    parts = []
    for v in chosen:
        where = (f"{v['model']} " if models else "") + (f"{v['targeted']} " if modes else "") + f"eps={float(v['eps']):g}"
        why = f" ({', '.join(v['reasons'])})" if v.get("reasons") else ""
        parts.append(f"{where}: {v['verdict']}{why}")
    return "; ".join(parts)


def format_checks(result: Any) -> str:
    """The CLI's text block: each model's verdicts, then every check that failed (evidence, next step)."""
    metadata = getattr(result, "metadata", result) or {}
    lvl = level(metadata)
    if lvl is None or lvl == "none":
        return "Integrity checks: not run (robustness measured, not established)."
    lines = [f"Integrity checks ({lvl}):"]
    checks = check_results(metadata)
    for v in entries(metadata):
        mode = "untargeted" if v["targeted"] == "none" else f"targeted: {v['targeted']}"
        why = f"  [failed: {', '.join(v['reasons'])}]" if v.get("reasons") else ""
        lines.append(f"  {v['model']}  {v['norm']} eps={float(v['eps']):g} ({mode}): {v['verdict'].upper()}  "
                     f"worst-case robust accuracy {float(v['robust_accuracy']):.1%}{why}")
    counts = {s: sum(1 for c in checks if c.get("status") == s) for s in ("pass", "fail", "skipped")}
    lines.append(f"  checks: {counts['pass']} passed, {counts['fail']} failed, {counts['skipped']} skipped")
    for c in checks:
        if c.get("status") != "fail":
            continue
        where = " ".join(x for x in (str(c.get("model")), c.get("norm") or "",
                                     "" if c.get("eps") is None else f"eps={float(c['eps']):g}",
                                     "" if c.get("targeted") in (None, "none") else f"targeted: {c['targeted']}") if x)
        lines.append(f"  FAILED {c.get('check')} ({where}): {c.get('title')}")
        lines.append(f"    evidence: {evidence_text(c.get('evidence') or {})}")
        lines.append(f"    why: {c.get('explanation')}")
        lines.append(f"    next: {c.get('next_step')}")
    for a in ((metadata.get("checks") or {}).get("adaptive") or []):
        lines.append(f"  adaptive attack {a.get('attack')} on {a.get('model')}: {a.get('reason')}")
    return "\n".join(lines)


def evidence_text(evidence: Mapping, limit: int = 8) -> str:
    """Scalar evidence as `key=value`, compactly (nested values left to results.json)."""
    items = []
    for key, value in evidence.items():
        if isinstance(value, float):
            items.append(f"{key}={value:.4g}")
        elif isinstance(value, (int, str, bool)) or value is None:
            items.append(f"{key}={value}")
        if len(items) >= limit:
            break
    return ", ".join(items)
