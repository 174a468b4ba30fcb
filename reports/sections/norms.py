"""5b. Perturbation-norm distributions of minimal-perturbation attacks (CW without a budget)."""

from __future__ import annotations

from robustlab.results import AuditResult

from .. import facts, figures
from ..serializers.html import esc, figure

ID = "norms"
TITLE = "Smallest adversarial perturbations"


def applies(result: AuditResult) -> bool:
    rows = facts.minimal_rows(result)
    return bool(len(rows)) and bool(rows["attacked"].any())


def render(result: AuditResult) -> str:
    rows = facts.minimal_rows(result)
    norm = str(result.metadata.get("config", {}).get("norm") or "")
    eps_list = facts.eps_values(result.summary)
    out = ['<p class="note">Minimal-perturbation attacks search for the smallest change that flips the prediction, '
           'without a budget. Per attacked sample, the size of the perturbation found (successes only); '
           f'dotted lines: the audit budgets ({esc(norm or "-")}).</p>']
    for model in facts.models(result):
        mine = rows[(rows["model"] == model) & rows["attacked"]]
        for attack in dict.fromkeys(mine["attack"]):
            at = mine[mine["attack"] == attack]
            series, notes = [], []
            for mode in dict.fromkeys(at["targeted"]):
                m = at[at["targeted"] == mode]
                ok = m[m["success"]]
                series.append({"label": facts.mode_label(mode), "l2": ok["l2"].to_numpy(),
                               "linf": ok["linf"].to_numpy()})
                notes.append(f"{esc(facts.mode_label(mode))}: found for {len(ok)} of {len(m)} attacked "
                             f"({facts.pct(len(ok) / max(len(m), 1))})")
            out.append(f"<h3>{esc(model)}: {esc(attack)}</h3>" + figure(
                figures.norm_histograms(series, eps_lines={norm: eps_list} if norm in ("l2", "linf") else {}),
                f"minimal perturbation sizes of {attack} on {model}", "; ".join(notes) + "."))
    return "".join(out)
