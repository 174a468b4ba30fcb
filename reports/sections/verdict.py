"""1. The verdict: per model and threat model, three things in this order.

What was measured (the worst-case robust accuracy, with its 95% Wilson interval over n), whether
that figure can be trusted (the evaluation status), and whether it meets the requirement the user
set (or "no requirement set"). No card calls a model robust: only a requirement can say it is
robust enough (robustlab.verdicts).

With certificates (an audit with certify=), each untargeted threat model also shows its certified
lower bound beside the attacked figure ("certified >= 41.0% [CI] (crown) · attacked 46.9%"), and a
requirement the lower bound itself meets reads "meets: certified": proven, not only unbroken.
"""

from __future__ import annotations

from robustlab import verdicts as V
from robustlab.results import AuditResult

from .. import facts
from ..serializers.html import esc, heat

ID = "verdict"
TITLE = "Verdict"

_OUTCOME_CLASS = {V.MEETS: "pass", V.DOES_NOT_MEET: "fail", V.CANNOT_JUDGE: "fail", V.NO_REQUIREMENT: "none"}
_STATUS_CLASS = {V.ESTABLISHED: "est", V.WEAKER: "warn", V.NOT_ESTABLISHED: "bad"}  # green is for "meets" only
_MARK = {"pass": '<span class="ok">✓</span>', "fail": '<span class="bad">✗</span>', "skipped": '<span class="muted">–</span>'}


def applies(result: AuditResult) -> bool:
    return not result.summary.empty


def render(result: AuditResult) -> str:
    lines = facts.threat_models(result)
    cards = "".join(_card(t) for t in lines)
    return (f'<p class="lead">{_lead(lines, facts.requirements(result.metadata))}</p>'
            f'<div class="cards verdicts">{cards}</div><p class="note">{_legend()}</p>')


def _lead(lines: list[facts.ThreatModel], judged: list[dict]) -> str:
    if judged:
        counts = {o: sum(1 for j in judged if j.get("outcome") == o) for o in V.OUTCOMES}
        parts = [f'<span class="ok">{counts[V.MEETS]} met</span>' if counts[V.MEETS] else "",
                 f'<span class="bad">{counts[V.DOES_NOT_MEET]} not met</span>' if counts[V.DOES_NOT_MEET] else "",
                 f'<span class="bad">{counts[V.CANNOT_JUDGE]} cannot be judged</span>' if counts[V.CANNOT_JUDGE] else ""]
        proven = sum(1 for j in judged if V.outcome_label(j) == f"{V.MEETS}: {V.CERTIFIED_BASIS}")
        if proven:
            parts[0] += f' <span class="ok">({proven} by the certified lower bound)</span>'
        head = f"<b>Requirements:</b> {', '.join(p for p in parts if p)} (of {len(judged)} checked). "
    else:
        head = ("<b>No requirement set.</b> The figures below are measurements, not a pass: whether they are enough "
                "is for a requirement to say (<code>--require robust_accuracy&gt;=0.6@8/255</code>, a pytest marker, "
                "or <code>require = [...]</code> under <code>[tool.robustlab]</code>). ")
    text = ""
    unproven = sum(1 for t in lines for v in t.evaluations.values() if v.get("status") == V.NOT_ESTABLISHED)
    if unproven:
        text += (f' <span class="bad">{unproven} (threat model, eps) figure{"s are" if unproven != 1 else " is"} '
                 "not established: a check says the attacks may be blind.</span>")
    return head + text


def _legend() -> str:
    return ("Each card gives, in this order: <b>measured</b>, the worst-case robust accuracy over every attack (a "
            f"sample counts only if every attack failed on it) with its {V.CONFIDENCE:.0%} Wilson interval over the n "
            "samples; <b>evaluation</b>, whether that figure can be trusted (<b>established</b>: the standard attack "
            "suite ran and every integrity check passed; <b>weaker than standard</b>: a reduced suite or no checks, "
            "so the figure is an upper bound from a weaker evaluation; <b>not established</b>: a check failed, the "
            "attacks may be blind); <b>requirement</b>, the outcome of the requirement you set (a figure that is not "
            "established cannot be judged). With certificates, <b>certified</b> is the share of samples proven to "
            "keep their label everywhere in the eps ball (IBP/CROWN; randomised smoothing: the smoothed classifier, "
            "with probability 1 - alpha), a lower bound of robust accuracy under any attack; a requirement it meets "
            "by itself reads "
            "<b>meets: certified</b>, whatever the evaluation status.")


def _card(t: facts.ThreatModel) -> str:
    outcome = t.outcome
    cls = _OUTCOME_CLASS[outcome]
    eps = t.headline
    record = t.evaluations.get(eps) if eps is not None else None
    figure = record.get("robust_accuracy") if record else (t.worst.get(eps) if eps is not None else None)
    attacks = ", ".join(esc(a) for a in t.attacks) or "–"
    verdict = ""
    if eps is not None:
        status = str((record or {}).get("status") or "")
        verdict = (
            '<ol class="verdict">'
            f'<li><span class="label">Measured</span><span class="big">{facts.pct(figure)}</span>'
            f'<small>worst-case robust accuracy at eps={eps:g}'
            f'{" · " + esc(facts.interval_text(record)) if record and record.get("interval") else ""}</small>'
            f'{_certified(record)}</li>'
            f'<li><span class="label">Evaluation</span><b class="{_STATUS_CLASS.get(status, "")}">'
            f'{esc(status or "not evaluated")}</b><small>{esc(_status_detail(record))}</small></li>'
            f'<li><span class="label">Requirement</span>{_requirement(t, eps)}</li></ol>')
    bounded = any(facts.is_num(v.get("certified_accuracy")) for v in t.evaluations.values())
    rows = "".join(_row(t, e, v, bounded) for e, v in sorted(t.evaluations.items()))
    certified_head = f'<th>certified lower bound ({V.CONFIDENCE:.0%} CI)</th>' if bounded else ""
    per_eps = (f'<table class="data verdicts"><thead><tr><th class="l">eps</th>'
               f'<th>worst-case robust accuracy ({V.CONFIDENCE:.0%} CI)</th>{certified_head}'
               f'<th class="l">evaluation</th><th class="l">requirement</th></tr></thead>'
               f'<tbody>{rows}</tbody></table>') if rows else ""
    others = [j for j in t.requirements if j.get("metric") not in V.INTERVAL_METRICS or j.get("model") is None]
    extra = ""
    if others:
        extra = '<ul class="checks">' + "".join(f"<li>{_judgement(j)}</li>" for j in others) + "</ul>"
    badge = esc(outcome if outcome != V.MEETS else "meets the requirement")
    return (f'<div class="card {cls}"><h3><span>{esc(t.model)}</span><span class="badge {cls}">{badge}</span></h3>'
            f'<div class="tm">{esc(t.norm)} · {esc(t.mode_label)} · n={t.n} · attacks: {attacks} · '
            f'clean accuracy {facts.pct(t.clean)}</div>{verdict}{per_eps}{extra}{_integrity(t)}</div>')


def _at(t: facts.ThreatModel, eps: float) -> list[dict]:
    """The robust- and certified-accuracy judgements at one eps of this card."""
    return [j for j in t.requirements if j.get("metric") in V.INTERVAL_METRICS and j.get("model") is not None
            and V.same_eps(j.get("eps"), eps)]


def _certified(record: dict | None) -> str:
    """The certified lower bound beside the attacked figure, or nothing without a certificate."""
    text = V.certified_text(record)
    return f'<small class="certified">{esc(text)}</small>' if text else ""


def _status_detail(record: dict | None) -> str:
    if not record:
        return ""
    failed = record.get("failed_checks") or []
    reductions = record.get("reductions") or []
    if record.get("status") == V.ESTABLISHED:
        return "standard attack suite; every applicable integrity check passed"
    parts = ([f"failed checks: {', '.join(map(str, failed))}"] if failed else []) + [str(r) for r in reductions]
    return "; ".join(parts)


def _requirement(t: facts.ThreatModel, eps: float) -> str:
    judged = _at(t, eps)
    if not judged and not t.requirements:
        return f'<b>{esc(V.NO_REQUIREMENT)}</b><small>this figure is a measurement, not a pass</small>'
    if not judged:
        return '<b>none at this eps</b><small>see the requirements below</small>'
    return "".join(f'<div>{_judgement(j, short=True)}</div>' for j in judged)


def _judgement(j: dict, short: bool = False) -> str:
    outcome = str(j.get("outcome"))
    cls = {V.MEETS: "ok", V.DOES_NOT_MEET: "bad", V.CANNOT_JUDGE: "bad"}.get(outcome, "")
    mark = "✓" if outcome == V.MEETS else "✗"
    label = V.outcome_label(j) if outcome == V.MEETS else outcome  # "meets: certified"
    observed = j.get("observed")
    seen = "" if short or not facts.is_num(observed) else f" (observed {facts.num(observed, '.4g')})"
    where = "" if short else " — " + " · ".join(esc(x) for x in (
        j.get("model"), j.get("attack"), f"eps={float(j['eps']):g}" if facts.is_num(j.get("eps")) else None) if x)
    why = f'<small>{esc(j.get("reason"))}</small>' if outcome == V.CANNOT_JUDGE and j.get("reason") else ""
    note = f'<small>{esc(j.get("note"))}</small>' if j.get("note") else ""
    return (f'<b class="{cls}">{mark} {esc(label)}</b> {esc(j.get("requirement") or j.get("metric"))}{seen}'
            f'{where if where != " — " else ""}{why}{note}')


def _row(t: facts.ThreatModel, eps: float, record: dict, bounded: bool = False) -> str:
    status = str(record.get("status") or "")
    judged = _at(t, eps)
    requirement = ("<br>".join(f'<span class="{"ok" if j.get("outcome") == V.MEETS else "bad"}">'
                             f'{esc(V.outcome_label(j) if j.get("outcome") == V.MEETS else j.get("outcome"))}'
                             f'</span> {esc(j.get("requirement"))}' for j in judged)
                   if judged else f'<span class="muted">{esc(V.NO_REQUIREMENT if not t.requirements else "–")}</span>')
    low_high = record.get("interval")
    ci = f' <span class="muted">[{facts.pct(low_high[0])}, {facts.pct(low_high[1])}]</span>' if low_high else ""
    value = record.get("robust_accuracy")
    shade = heat(float(value)) if value is not None and facts.is_num(value) else ""
    certified = _certified_cell(record) if bounded else ""
    return (f'<tr><td class="l">{eps:g}</td><td style="{shade}"><b>{facts.pct(value)}</b>{ci}</td>{certified}'
            f'<td class="l"><span class="{_STATUS_CLASS.get(status, "")}">{esc(status)}</span>'
            f'{" <small class=muted>(" + esc(_status_detail(record)) + ")</small>" if status != V.ESTABLISHED and _status_detail(record) else ""}'
            f'</td><td class="l">{requirement}</td></tr>')


def _certified_cell(record: dict) -> str:
    """The per-eps table's certified lower bound: '>= 41.0% [36.5%, 45.7%] (crown)', or a dash."""
    bound = record.get("certified_accuracy")
    if bound is None or not facts.is_num(bound):
        return '<td><span class="muted">–</span></td>'
    low_high = record.get("certified_interval")
    ci = f' <span class="muted">[{facts.pct(low_high[0])}, {facts.pct(low_high[1])}]</span>' if low_high else ""
    return (f'<td style="{heat(float(bound))}">&ge; <b>{facts.pct(bound)}</b>{ci} '
            f'<span class="muted">({esc(record.get("certified_method"))})</span></td>')


def _integrity(t: facts.ThreatModel) -> str:
    """Every check with its evidence and next step (or: not run)."""
    if not t.checked:
        return ('<div class="integrity"><b>Integrity checks: not run.</b> Gradient masking and weak-attack checks '
                'are not part of this run, so no figure here is established.</div>')
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
            f'{counts["fail"]} failed, {counts["skipped"]} skipped.'
            f'<details{" open" if counts["fail"] else ""}><summary>each check</summary>'
            f'<ul class="checks">{"".join(items)}</ul></details></div>')
