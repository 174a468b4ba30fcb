"""4. Targeted attacks: success rate per true class x target class (only when targeted rows exist)."""

from __future__ import annotations

from robustlab.results import AuditResult

from .. import facts, figures
from ..serializers.html import esc, figure

ID = "targeted"
TITLE = "Targeted attacks"


def applies(result: AuditResult) -> bool:
    rows = facts.targeted_rows(result)
    return bool(len(rows)) and bool(rows["attacked"].any())


def render(result: AuditResult) -> str:
    rows = facts.targeted_rows(result)
    out = ['<p class="note">Share of attacked (sample, target) pairs where <b>any</b> attack reached the target '
           'class, per true class (rows) and target class (columns). Grey: pair not attacked.</p>']
    for model in facts.models(result):
        mine = rows[rows["model"] == model]
        names = facts.class_names(result, model)
        for mode in dict.fromkeys(mine["targeted"]):
            at_mode = mine[mine["targeted"] == mode]
            panels = []
            for eps in sorted(at_mode["eps"].unique()):
                rate, count = facts.success_matrix(result, model, mode, float(eps), len(names))
                overall = (rate[count > 0] * count[count > 0]).sum() / max(count.sum(), 1)
                panels.append({"title": f"eps={float(eps):g}: {overall * 100:.0f}% overall", "rate": rate})
            if panels:
                out.append(f"<h3>{esc(model)}: {esc(facts.mode_label(mode))}</h3>" + figure(
                    figures.success_matrices(panels, names), f"targeted success matrix for {model}, {mode}"))
    return "".join(out)
