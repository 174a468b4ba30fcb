"""1. The verdict: per model and threat model, in one glance."""

from __future__ import annotations

from robustlab.results import AuditResult

from .. import facts
from ..serializers.html import esc, heat

ID = "verdict"
TITLE = "Verdict"

_BADGE = {"pass": ("pass", "thresholds met"), "fail": ("fail", "threshold missed"),
          "none": ("none", "no thresholds set")}
_VERDICT_CLASS = {"robust": "ok", "not robust": "bad", "robustness not established": "bad"}
_MARK = {"pass": '<span class="ok">✓</span>', "fail": '<span class="bad">✗</span>', "skipped": '<span class="muted">–</span>'}


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
    text = ("Robust accuracy is the worst case over all attacks at each budget (a sample counts as robust "
            "only if every attack failed on it). ")
    if lines and lines[0].checked:
        established = sum(1 for t in lines for v in t.verdicts.values() if v.get("verdict") == "robustness not established")
        text += (f"Integrity checks ({esc(lines[0].checks_level)}) ran; adaptive attacks are included in the worst case. "
                 + (f'<span class="bad">Robustness is not established for {established} (threat model, eps) '
                    f"pair{'s' if established != 1 else ''}: a check says the attacks may be blind.</span>"
                    if established else ""))
    else:
        text += "The integrity checks that would establish these numbers were not run."
    return head + text


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
            f'{_integrity(t)}</div>')


def _integrity(t: facts.ThreatModel) -> str:
    """The verdict per budget and every check with its evidence and next step (or: not run)."""
    if not t.checked:
        return ('<div class="integrity"><b>Integrity checks: not run.</b> Gradient masking and weak-attack checks '
                'are not part of this run, so robustness is measured but not established.</div>')
    verdicts = "".join(
        f'<li>eps {e:g}: <b class="{_VERDICT_CLASS.get(str(v.get("verdict")), "")}">{esc(v.get("verdict"))}</b> '
        f'(worst-case robust accuracy {facts.pct(v.get("robust_accuracy"))}'
        f'{"; failed checks: " + esc(", ".join(v.get("reasons") or [])) if v.get("reasons") else ""})</li>'
        for e, v in sorted(t.verdicts.items()))
    counts = {s: sum(1 for c in t.checks if c.get("status") == s) for s in ("pass", "fail", "skipped")}
    items = []
    for c in sorted(t.checks, key=lambda c: {"fail": 0, "pass": 1, "skipped": 2}.get(str(c.get("status")), 3)):
        where = f" (eps={float(c['eps']):g})" if facts.is_num(c.get("eps")) else ""
        detail = f"<div>{esc(c.get('explanation'))}</div>" if c.get("explanation") else ""
        evidence = facts.evidence_text(c.get("evidence"))
        detail += f'<div class="muted">evidence: {esc(evidence)}</div>' if evidence else ""
        detail += f"<div><b>Next step:</b> {esc(c.get('next_step'))}</div>" if c.get("next_step") else ""
        items.append(f"<li>{_MARK.get(str(c.get('status')), '')} {esc(c.get('title') or c.get('check'))}"
                     f"{esc(where)} <span class=\"muted\">[{esc(c.get('check'))}]</span>{detail}</li>")
    return (f'<div class="integrity"><b>Integrity checks ({esc(t.checks_level)}):</b> {counts["pass"]} passed, '
            f'{counts["fail"]} failed, {counts["skipped"]} skipped.<ul class="checks">{verdicts}</ul>'
            f'<details{" open" if counts["fail"] else ""}><summary>each check</summary>'
            f'<ul class="checks">{"".join(items)}</ul></details></div>')
