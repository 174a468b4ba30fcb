"""The markdown serializer: short summaries for CI step summaries and PR comments.

Text from results is escaped for markdown and for the HTML that markdown renderers pass through.
"""

from __future__ import annotations

import re
from typing import Any

from robustlab.results import WORST_CASE, AuditResult

from .. import facts

_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def md(value: Any) -> str:
    text = " ".join(str("" if value is None else value).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _SPECIAL.sub(r"\\\1", text)


def _table(headers: list[str], rows: list[list[str]], text: int = 1) -> list[str]:
    """A markdown table; the first `text` columns are left-aligned, the rest (figures) right-aligned."""
    aligns = [":--" if i < text else "--:" for i in range(len(headers))]
    return ["| " + " | ".join(headers) + " |", "| " + " | ".join(aligns) + " |"] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def _status(t: facts.ThreatModel) -> str:
    return {"pass": "✅ thresholds met", "fail": "❌ threshold missed", "none": "no thresholds set"}[t.status]


def summary(result: AuditResult, *, report: str | None = None) -> str:
    lines = facts.threat_models(result)
    names = facts.models(result)
    data = result.metadata.get("data") or {}
    out = [f"## robustlab audit: {', '.join(md(n) for n in names) or 'no models'}", ""]
    meta = [f"data {md(data.get('source'))} (n={md(data.get('n'))})" if data else "",
            f"seed {md(result.metadata.get('seed'))}" if "seed" in result.metadata else "",
            f"{md(result.metadata.get('started', ''))[:19]}" if result.metadata.get("started") else ""]
    if any(meta):
        out += [" · ".join(m for m in meta if m), ""]
    failed = [t for t in lines if t.status == "fail"]
    if failed:
        out.append(f"**Verdict: ❌ {len(failed)} of {len(lines)} threat models missed a threshold.**")
    elif any(t.status == "pass" for t in lines):
        out.append("**Verdict: ✅ every recorded threshold was met.**")
    else:
        out.append("**Verdict: no thresholds recorded.**")
    out += ["", *_integrity_head(result, lines), ""]

    eps_list = facts.eps_values(result.summary)
    if lines:
        out += ["### Worst-case robust accuracy", ""]
        rows = []
        for t in lines:
            rows.append([md(t.model), md(t.norm), md(t.mode_label), facts.pct(t.clean)] +
                        [facts.pct(t.worst.get(e)) if e in t.worst else "–" for e in eps_list] + [_status(t)])
        out += _table(["model", "norm", "threat model", "clean", *[f"eps={e:g}" for e in eps_list], "verdict"], rows, 3)
        out.append("")
    out += _integrity(result, lines)
    checks = [c for t in lines for c in t.thresholds]
    if checks:
        out += ["### Thresholds", ""]
        for c in facts.thresholds(result.metadata):
            mark = "✅" if c.get("passed") else "❌"
            observed = f": {facts.num(c.get('observed'), '.4g')}" if facts.is_num(c.get("observed")) else ""
            where = " ".join(md(x) for x in (c.get("model"), c.get("attack"),
                                              f"eps={c['eps']:g}" if facts.is_num(c.get("eps")) else None,
                                              c.get("targeted")) if x)
            out.append(f"- {mark} {md(c.get('description') or c.get('metric'))}{' (' + where + ')' if where else ''}{observed}")
        out.append("")

    bounded = facts.bounded(result.summary)
    if len(bounded):
        out += ["### Robust accuracy per attack", ""]
        rows = []
        for (model, targeted), block in bounded.groupby(["model", "targeted"], sort=False):
            for attack in facts.attack_order(block["attack"]):
                at = block[block["attack"] == attack]
                cells = []
                for e in eps_list:
                    hit = at[(at["eps"] - e).abs() <= 1e-12]
                    value = facts.pct(hit["robust_accuracy"].iloc[0]) if len(hit) else "–"
                    cells.append(f"**{value}**" if attack == WORST_CASE else value)
                rows.append([md(model), md(facts.mode_label(targeted)), md(attack)] + cells)
        out += _table(["model", "threat model", "attack", *[f"eps={e:g}" for e in eps_list]], rows, 3)
        out.append("")
    minimal = result.summary[result.summary["eps"].isna()] if len(result.summary) else result.summary
    if len(minimal):
        out += ["### Smallest perturbations (no budget)", ""]
        rows = [[md(r["model"]), md(facts.mode_label(r["targeted"])), md(r["attack"]), facts.pct(r["success_rate"]),
                 facts.num(r["median_l2"]), facts.num(r["median_linf"])] for _, r in minimal.iterrows()]
        out += _table(["model", "threat model", "attack", "success", "median L2", "median Linf"], rows, 3)
        out.append("")
    if report:
        out += [f"Full report: `{md(report)}`", ""]
    return "\n".join(out)


def _integrity_head(result: AuditResult, lines: list[facts.ThreatModel]) -> list[str]:
    level = facts.checks_level(result.metadata)
    if level in (None, "none"):
        return ["Integrity checks: **not run** (robustness measured, not established)."]
    results = facts.check_results(result.metadata)
    counts = {s: sum(1 for c in results if c.get("status") == s) for s in ("pass", "fail", "skipped")}
    unproven = sum(1 for v in facts.verdict_records(result.metadata) if v.get("verdict") == "robustness not established")
    text = (f"Integrity checks ({md(level)}): {counts['pass']} passed, **{counts['fail']} failed**, "
            f"{counts['skipped']} skipped; adaptive attacks are included in the worst case.")
    if unproven:
        text += f" **Robustness not established** for {unproven} (threat model, eps) pair{'s' if unproven != 1 else ''}."
    return [text]


def _integrity(result: AuditResult, lines: list[facts.ThreatModel]) -> list[str]:
    """Verdict per threat model and eps, then each failed check with its evidence and next step."""
    records = facts.verdict_records(result.metadata)
    if facts.checks_level(result.metadata) in (None, "none") or not records:
        return []
    mark = {"robust": "✅ robust", "not robust": "❌ not robust", "robustness not established": "⚠️ robustness not established"}
    rows = [[md(v.get("model")), md(facts.mode_label(str(v.get("targeted")))), facts.eps_label(v.get("eps")),
             mark.get(str(v.get("verdict")), md(v.get("verdict"))), facts.pct(v.get("robust_accuracy")),
             md(", ".join(v.get("reasons") or [])) or "–"] for v in records]
    out = ["### Integrity verdict", ""]
    out += _table(["model", "threat model", "eps", "verdict", "worst-case robust", "failed checks"], rows, 4)
    out.append("")
    failed = [c for c in facts.check_results(result.metadata) if c.get("status") == "fail"]
    if failed:
        out += ["### Failed checks", ""]
        for c in failed:
            where = " ".join(x for x in (md(c.get("model")), f"eps={float(c['eps']):g}" if facts.is_num(c.get("eps")) else "",
                                         md(facts.mode_label(str(c["targeted"]))) if c.get("targeted") else "") if x)
            out.append(f"- ❌ **{md(c.get('title') or c.get('check'))}** ({where}): {md(c.get('explanation'))} "
                       f"Evidence: {md(facts.evidence_text(c.get('evidence')))}. Next: {md(c.get('next_step'))}")
        out.append("")
    runs = [a for a in facts.adaptive_runs(result.metadata)]
    if runs:
        out += ["Adaptive attacks: " + "; ".join(f"{md(a.get('attack'))} on {md(a.get('model'))} ({md(a.get('reason'))})"
                                                for a in runs), ""]
    return out


def comparison(comp) -> str:
    counts = comp.counts()
    out = [f"## robustlab comparison: {md(comp.label_a)} → {md(comp.label_b)}", "",
           f"**{counts['better']} better, {counts['worse']} worse, {counts['same']} unchanged** "
           "(robust accuracy per model, attack and eps; clean accuracy; CW median L2).", ""]
    for w in comp.warnings:
        out.append(f"> ⚠️ {md(w)}")
    if comp.warnings:
        out.append("")
    rows = []
    for _, r in comp.rows.iterrows():
        delta = "–" if r["delta"] is None or r["delta"] != r["delta"] else (
            f"{r['delta'] * 100:+.1f} pp" if r["metric"] != "median_l2" else f"{r['delta']:+.3g}")
        fmt = facts.pct if r["metric"] != "median_l2" else facts.num
        mark = {"better": "▲ better", "worse": "▼ worse", "same": "= same"}.get(r["change"], r["change"])
        rows.append([md(r["model"]), md(facts.mode_label(r["targeted"])), md(r["attack"]),
                     facts.eps_label(r["eps"]) if r["attack"] != "(clean)" else "–", md(r["metric"]),
                     fmt(r["a"]), fmt(r["b"]), delta, mark])
    out += _table(["model", "threat model", "attack", "eps", "metric", "A", "B", "change", ""], rows, 3)
    for title, items in (("Only in A", comp.only_a), ("Only in B", comp.only_b)):
        if items:
            out += ["", f"{title}: " + "; ".join(md(i) for i in items)]
    return "\n".join(out) + "\n"
