"""The markdown serializer: short summaries for CI step summaries and PR comments.

Text from results is escaped for markdown and for the HTML that markdown renderers pass through.
"""

from __future__ import annotations

import re
from typing import Any

from robustlab import verdicts as V
from robustlab.results import WORST_CASE, AuditResult

from .. import facts

_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def md(value: Any) -> str:
    text = " ".join(str("" if value is None else value).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _SPECIAL.sub(r"\\\1", text)


def code(value: Any) -> str:
    """`value` as a code span inside a table cell: shown verbatim, with `|` escaped for the table."""
    text = " ".join(str("" if value is None else value).split()).replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _table(headers: list[str], rows: list[list[str]], text: int = 1) -> list[str]:
    """A markdown table; the first `text` columns are left-aligned, the rest (figures) right-aligned."""
    aligns = [":--" if i < text else "--:" for i in range(len(headers))]
    return ["| " + " | ".join(headers) + " |", "| " + " | ".join(aligns) + " |"] + \
        ["| " + " | ".join(r) + " |" for r in rows]


_OUTCOME_MARK = {V.MEETS: "✅ meets", V.DOES_NOT_MEET: "❌ does not meet", V.CANNOT_JUDGE: "❌ cannot be judged"}
_STATUS_MARK = {V.ESTABLISHED: "established", V.WEAKER: "⚠️ weaker than standard", V.NOT_ESTABLISHED: "⚠️ not established"}


def _status(record: dict) -> str:
    label = V.status_label(record)
    status = str(record.get("status"))
    return md(_STATUS_MARK.get(status, status) + label[len(status):])


def _requirement(t: facts.ThreatModel, eps: float) -> str:
    judged = t.at(eps)
    if not judged:
        return V.NO_REQUIREMENT if not t.requirements else "–"
    return "; ".join(f"{_OUTCOME_MARK.get(str(j.get('outcome')), md(j.get('outcome')))} {md(j.get('requirement'))}"
                     for j in judged)


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
    judged = facts.requirements(result.metadata)
    if judged:
        counts = {o: sum(1 for j in judged if j.get("outcome") == o) for o in V.OUTCOMES}
        bad = counts[V.DOES_NOT_MEET] + counts[V.CANNOT_JUDGE]
        out.append(f"**Verdict: {'❌' if bad else '✅'} requirements: {counts[V.MEETS]} met, "
                   f"{counts[V.DOES_NOT_MEET]} not met, {counts[V.CANNOT_JUDGE]} cannot be judged.**")
    else:
        out.append("**Verdict: no requirement set.** The figures are measurements, not a pass; set one with "
                   "`--require robust_accuracy>=VALUE@EPS` or `[tool.robustlab]`.")
    out.append("")
    if lines:
        out += ["### Verdict per threat model", "",
                f"Worst-case robust accuracy over every attack ({V.CONFIDENCE:.0%} Wilson interval over n), whether "
                "that figure can be trusted, and the requirement's outcome.", ""]
        rows = []
        for t in lines:
            for e, v in sorted(t.evaluations.items()):
                rows.append([md(t.model), md(f"{v.get('norm')} {t.mode_label}"), f"{e:g}",
                             f"**{facts.pct(v.get('robust_accuracy'))}** ({md(facts.interval_text(v))})",
                             _status(v), _requirement(t, e)])
        out += _table(["model", "threat model", "eps", "worst-case robust accuracy", "evaluation", "requirement"],
                      rows, 6)
        out.append("")
    out += [*_integrity_head(result, lines), ""]

    eps_list = facts.eps_values(result.summary)
    out += _integrity(result, lines)
    if judged:
        out += ["### Requirements", ""]
        for j in judged:
            mark = _OUTCOME_MARK.get(str(j.get("outcome")), md(j.get("outcome")))
            observed = f": {facts.num(j.get('observed'), '.4g')}" if facts.is_num(j.get("observed")) else ""
            where = " ".join(md(x) for x in (j.get("model"), j.get("attack"),
                                              f"eps={j['eps']:g}" if facts.is_num(j.get("eps")) else None,
                                              facts.mode_label(str(j["targeted"])) if j.get("targeted") else None)
                             if x)
            why = f" — {md(j.get('reason'))}" if j.get("outcome") == V.CANNOT_JUDGE and j.get("reason") else ""
            note = f" — {md(j.get('note'))}" if j.get("note") else ""
            out.append(f"- {mark} {md(j.get('requirement') or j.get('metric'))}{' (' + where + ')' if where else ''}"
                       f"{observed}{why}{note}")
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
            for attack in facts.certified_order(block["attack"]):  # certified accuracy: the bracket's lower end
                at = block[block["attack"] == attack]
                cells = [facts.pct(hit["certified_accuracy"].iloc[0]) if len(hit) else "–"
                         for hit in (at[(at["eps"] - e).abs() <= 1e-12] for e in eps_list)]
                rows.append([md(model), md(facts.mode_label(targeted)), md(f"{attack} (certified)")] + cells)
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
        return ["Integrity checks: **not run** (no figure is established)."]
    results = facts.check_results(result.metadata)
    counts = {s: sum(1 for c in results if c.get("status") == s) for s in ("pass", "fail", "skipped")}
    unproven = sum(1 for t in lines for v in t.evaluations.values() if v.get("status") == V.NOT_ESTABLISHED)
    text = (f"Integrity checks ({md(level)}): {counts['pass']} passed, **{counts['fail']} failed**, "
            f"{counts['skipped']} skipped; adaptive attacks are included in the worst case.")
    if unproven:
        text += f" **Not established** for {unproven} (threat model, eps) pair{'s' if unproven != 1 else ''}."
    return [text]


def _integrity(result: AuditResult, lines: list[facts.ThreatModel]) -> list[str]:
    """Each failed check with its evidence and next step, then the adaptive attacks run."""
    if facts.checks_level(result.metadata) in (None, "none"):
        return []
    out: list[str] = []
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


_GATE_RESULT = {"PASS": "✅ pass", "FAIL": "❌ **FAIL**"}


def gate_summary(header: list[str], rows: list[list[str]], *, failures: list[tuple[str, list[str]]],
                 quick: bool = False) -> str:
    """The pytest plugin's summary.md: its gate table (the cells as the terminal table writes them, the
    first a test id, the last PASS or FAIL), then each failed test with its failed checks."""
    failed = sum(1 for r in rows if r[-1] != "PASS")
    out = ["## Robustness gates", "",
           f"{len(rows)} gates, {failed} failed" + (" (quick mode)" if quick else "") + ".", ""]
    out += _table(header, [[code(r[0])] + [md(c) for c in r[1:-1]] + [_GATE_RESULT.get(r[-1], md(r[-1]))]
                           for r in rows], len(header))
    if failures:
        out += ["", "### Failures", ""]
        out += [f"- {code(test)}: " + "; ".join(md(f) for f in lines) for test, lines in failures]
    out += ["", "robust: the worst case over every attack, with its 95% Wilson interval over n samples. "
                "evaluation: established (standard attack suite, every integrity check passed), weaker than "
                "standard (quick or no suite, or no checks), or not established (a check failed: the gate "
                "cannot be judged and fails). requirement: the gate's threshold and its outcome."]
    return "\n".join(out) + "\n"


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
