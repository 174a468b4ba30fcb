"""3. Clean vs robust accuracy: the table (models x attacks x eps, worst case) and the curves."""

from __future__ import annotations

from robustlab.results import WORST_CASE, AuditResult

from .. import facts, figures
from ..serializers.html import cell, esc, figure, fold, heat, table

ID = "accuracy"
TITLE = "Clean vs robust accuracy"


def applies(result: AuditResult) -> bool:
    return not facts.bounded(result.summary).empty


def render(result: AuditResult) -> str:
    summary = result.summary
    eps_list = facts.eps_values(summary)
    rows: list[str] = []
    for (model, targeted), block in summary.groupby(["model", "targeted"], sort=False):
        b = facts.bounded(block)
        clean = float(block["clean_accuracy"].iloc[0])
        for index, attack in enumerate(facts.attack_order(b["attack"])):
            at = b[b["attack"] == attack]
            cls = "worst" if attack == WORST_CASE else ("sep" if index == 0 and rows else "")
            cells = [cell(model, cls="l"), cell(", ".join(dict.fromkeys(at["norm"])), cls="l"),
                     cell(facts.mode_label(targeted), cls="l"), cell(attack, cls="l"),
                     cell(facts.pct(clean), sort=clean)]
            for e in eps_list:
                hit = at[(at["eps"] - e).abs() <= 1e-12]
                v = float(hit["robust_accuracy"].iloc[0]) if len(hit) else None
                cells.append(cell(facts.pct(v), sort="" if v is None else v, style=heat(v) if v is not None else ""))
            rows.append(f'<tr class="{cls}">' + "".join(cells) + "</tr>")
        for attack in facts.certified_order(b["attack"]):
            at = b[b["attack"] == attack]
            cells = [cell(model, cls="l"), cell(", ".join(dict.fromkeys(at["norm"])), cls="l"),
                     cell(facts.mode_label(targeted), cls="l"), cell(f"{attack} (certified)", cls="l"),
                     cell(facts.pct(clean), sort=clean)]
            for e in eps_list:
                hit = at[(at["eps"] - e).abs() <= 1e-12]
                v = float(hit["certified_accuracy"].iloc[0]) if len(hit) and facts.is_num(
                    hit["certified_accuracy"].iloc[0]) else None
                cells.append(cell(facts.pct(v), sort="" if v is None else v, style=heat(v) if v is not None else ""))
            rows.append('<tr class="certified">' + "".join(cells) + "</tr>")
    certified = facts.certified_order(summary["attack"]) if len(summary) else []
    headers = ["model", "norm", "threat model", "attack", "clean", *[f"eps={e:g}" for e in eps_list]]
    html = ('<p class="note">Robust accuracy over all n samples (misclassified clean samples count as not robust). '
            '<b>worst-case</b>: a sample is robust only if every attack failed on it. '
            + ('<b>certified</b> rows: the share of samples <i>proven</i> robust (certified accuracy), a lower '
               'bound of robust accuracy under any attack, so the truth lies in [certified, worst-case]; '
               'randomised smoothing certifies the smoothed classifier, not the model. ' if certified else '')
            + 'Click a header to sort.</p>')
    # Open, unlike the sections below: the table and the curves are the audit's findings, what a reader
    # came for; only the per-record detail (cost, perturbation sizes) is folded.
    html += table(headers, rows, sortable=True, cls="accuracy", text=4)
    html += _curves(result)
    html += _details(result)
    return html


def _curves(result: AuditResult) -> str:
    out = []
    for model in facts.models(result):
        block = result.summary[result.summary["model"] == model]
        panels = []
        for targeted, tb in block.groupby("targeted", sort=False):
            b = facts.bounded(tb)
            if b.empty:
                continue
            lines = {}
            for attack in facts.attack_order(b["attack"]):
                if attack == WORST_CASE:
                    continue
                at = b[b["attack"] == attack]
                lines[attack] = {float(e): float(v) for e, v in zip(at["eps"], at["robust_accuracy"])}
            for attack in facts.certified_order(b["attack"]):
                at = b[b["attack"] == attack]
                lines[attack] = {float(e): float(v) for e, v in
                                                    zip(at["eps"], at["certified_accuracy"]) if facts.is_num(v)}
            panels.append({"title": facts.mode_label(targeted), "norm": ", ".join(dict.fromkeys(b["norm"])),
                           "clean": float(tb["clean_accuracy"].iloc[0]), "lines": lines,
                           "worst": facts.worst_case(tb) if len(lines) > 1 else {}})
        if panels:
            out.append(f"<h3>Robustness curves: {esc(model)}</h3>" + figure(
                figures.robustness_curves(panels), f"robust accuracy against eps for {model}",
                "Accuracy against the attack budget; eps = 0 is clean accuracy. Dashed black: worst case over attacks."
                + _bracket_text(block)))
    return "".join(out)


def _bracket_text(block) -> str:
    """' Certified >= 31.7% (crown) at eps=0.1, ...': the lower end of the bracket, from the worst-case rows."""
    found = facts.certified(block[block["targeted"] == facts.UNTARGETED])
    if not found:
        return ""
    parts = [f"certified &ge; {facts.pct(v)} ({esc(method)}) at eps={e:g}" for e, (method, v) in sorted(found.items())]
    return " Untargeted: " + ", ".join(parts) + "."


def _details(result: AuditResult) -> str:
    s = result.summary
    cols = ["model", "attack", "norm", "eps", "targeted", "n", "clean_accuracy", "robust_accuracy",
            "certified_accuracy", "success_rate",
            "n_attacked", "median_l2", "median_linf", "gradient_calls", "seconds"]
    cols = [c for c in cols if c in s]
    rows = []
    for _, r in s.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if c in ("model", "attack", "norm", "targeted"):
                cells.append(cell(v, cls="l"))
            elif c == "eps":
                cells.append(cell(facts.eps_label(v), sort=v if facts.is_num(v) else -1))
            elif c in ("clean_accuracy", "robust_accuracy", "certified_accuracy", "success_rate"):
                cells.append(cell(facts.pct(v), sort=v if facts.is_num(v) else ""))
            elif c in ("median_l2", "median_linf"):
                cells.append(cell(facts.num(v, ".4g"), sort=v if facts.is_num(v) else ""))
            else:
                cells.append(cell(facts.num(v, ".4g") if c == "seconds" else (int(v) if facts.is_num(v) else "–"),
                                  sort=v if facts.is_num(v) else ""))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    # (no total cost in the headline: a minimal run's cost repeats at each eps and worst-case rows sum
    # their attacks, so summing the column would count work twice)
    return fold(f"Every summary record: {len(s)} rows (success rates, perturbation sizes, gradient calls and "
                "seconds per attack)", table(cols, rows, sortable=True, text=5))
