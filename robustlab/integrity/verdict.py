"""The integrity checks' text block for the CLI, over the ground floor's verdicts (robustlab.verdicts).

Pandas and the standard library only (no torch). The evaluation status of each threat model
(established / weaker than standard / not established) and the requirement outcomes are decided in
robustlab.verdicts, which gates and reports import directly; this module names them for the
integrity package and prints what the checks found.
"""

from __future__ import annotations

from typing import Any, Mapping

from robustlab.verdicts import (ESTABLISHED, NOT_ESTABLISHED, STANDARD_SUITE_ROW, SUITE_REASONS, WEAKER, applies,
                                check_results, checks_level, evaluate, find, records, same_eps, status_label)

__all__ = ["ESTABLISHED", "NOT_ESTABLISHED", "STANDARD_SUITE_ROW", "SUITE_REASONS", "WEAKER", "applies",
           "check_results", "checks_level", "evaluate", "evidence_text", "find", "format_checks", "records",
           "same_eps", "status_label"]


def format_checks(result: Any) -> str:
    """The CLI's text block: the checks' counts, then every check that failed (evidence, next step) and
    the adaptive attacks run. The verdicts themselves: robustlab.verdicts.format_verdicts."""
    metadata = getattr(result, "metadata", result) or {}
    lvl = checks_level(metadata)
    if lvl is None or lvl == "none":
        return "Integrity checks: not run (the evaluation is weaker than standard; no figure is established)."
    checks = check_results(metadata)
    counts = {s: sum(1 for c in checks if c.get("status") == s) for s in ("pass", "fail", "skipped")}
    lines = [f"Integrity checks ({lvl}): {counts['pass']} passed, {counts['fail']} failed, {counts['skipped']} skipped"]
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
