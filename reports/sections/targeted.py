"""4. Targeted attacks: success rate per true class x target class (only when targeted rows exist)."""

from __future__ import annotations

from robustlab.results import AuditResult

from .. import facts, figures
from ..serializers.html import esc, figure, fold

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
            panels, overall_at = [], []
            for eps in sorted(at_mode["eps"].unique()):
                rate, count = facts.success_matrix(result, model, mode, float(eps), len(names))
                overall = (rate[count > 0] * count[count > 0]).sum() / max(count.sum(), 1)
                panels.append({"title": f"eps={float(eps):g}: {overall * 100:.0f}% overall", "rate": rate})
                overall_at.append(f"{facts.pct(overall, 0)} at eps={float(eps):g}")
            if panels:
                # Folded: the matrices are per-pair detail; the headline gives the overall success per budget.
                out.append(fold(f"<b>{esc(model)}: {esc(facts.mode_label(mode))}</b> · target reached for "
                                f"{esc(', '.join(overall_at))} of the attacked pairs", figure(
                    figures.success_matrices(panels, names), f"targeted success matrix for {model}, {mode}")))
    return "".join(out)
