"""1. The verdict: per model and threat model, in one glance."""

from __future__ import annotations

from robustlab.results import AuditResult

from .. import facts
from ..serializers.html import esc, heat

ID = "verdict"
TITLE = "Verdict"

_BADGE = {"pass": ("pass", "thresholds met"), "fail": ("fail", "threshold missed"),
          "none": ("none", "no thresholds set")}


def applies(result: AuditResult) -> bool:
    return not result.summary.empty


def render(result: AuditResult) -> str:
    lines = facts.threat_models(result)
    cards = "".join(_card(t) for t in lines)
    return f'<p class="lead">{_lead(lines)}</p><div class="cards">{cards}</div>'


def _lead(lines: list[facts.ThreatModel]) -> str:
    failed = [t for t in lines if t.status == "fail"]
    checked = [t for t in lines if t.status != "none"]
    if failed:
        head = f'<span class="bad">{len(failed)} of {len(lines)} threat models missed a threshold.</span> '
    elif checked:
        head = '<span class="ok">Every recorded threshold was met.</span> '
    else:
        head = "No pass/fail thresholds were recorded for this run. "
    return head + ("Robust accuracy is the worst case over all attacks at each budget (a sample counts as robust "
                   "only if every attack failed on it). The integrity checks that would establish these numbers "
                   "were not run.")


def _card(t: facts.ThreatModel) -> str:
    cls, badge = _BADGE[t.status]
    largest = max(t.worst) if t.worst else None
    big = ""
    if largest is not None:
        value = t.worst[largest]
        color = f"hsl({120 * max(0.0, min(1.0, value)):.0f} 65% 32%)"
        big = (f'<div class="arrow">→</div><div class="big" style="color: {color}">{facts.pct(value)}'
               f'<small>worst-case robust accuracy at eps={largest:g}</small></div>')
    steps = "".join(f'<span class="step" style="{heat(v)}">eps {e:g}: <b>{facts.pct(v)}</b></span>'
                    for e, v in sorted(t.worst.items()))
    checks = ""
    if t.thresholds:
        items = []
        for c in t.thresholds:
            mark = '<span class="ok">✓ met</span>' if c.get("passed") else '<span class="bad">✗ missed</span>'
            observed = c.get("observed")
            seen = f" (observed {facts.num(observed, '.4g')})" if facts.is_num(observed) else ""
            where = " · ".join(esc(x) for x in (c.get("attack"), f"eps={c['eps']:g}" if facts.is_num(c.get("eps")) else None) if x)
            items.append(f"<li>{mark} {esc(c.get('description') or c.get('metric'))}{seen}"
                         f"{' — ' + where if where else ''}</li>")
        checks = f'<ul class="checks">{"".join(items)}</ul>'
    attacks = ", ".join(esc(a) for a in t.attacks) or "–"
    return (f'<div class="card {cls}"><h3><span>{esc(t.model)}</span><span class="badge {cls}">{badge}</span></h3>'
            f'<div class="tm">{esc(t.norm)} · {esc(t.mode_label)} · n={t.n} · attacks: {attacks}</div>'
            f'<div class="bigrow"><div class="big">{facts.pct(t.clean)}<small>clean accuracy</small></div>{big}</div>'
            f'<div class="steps"><span class="muted">worst case by budget:</span> {steps}</div>{checks}'
            f'<div class="integrity"><b>Integrity checks: not run.</b> Gradient masking and weak-attack checks '
            f'are not part of this run, so robustness is measured but not established.</div></div>')
