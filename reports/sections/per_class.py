"""5a. Robust accuracy per true class (worst case over attacks)."""

from __future__ import annotations

from typing import cast

from robustlab.results import AuditResult

from .. import facts
from ..serializers.html import cell, esc, fold, heat, table

ID = "per-class"
TITLE = "Per-class robust accuracy"
MAX_ROWS = 20


def applies(result: AuditResult) -> bool:
    s = result.samples
    return bool(len(s)) and bool(s["eps"].notna().any())


def render(result: AuditResult) -> str:
    out = ['<p class="note">Share of each true class that stayed correct under every attack (and every target) at '
           'each budget. Sorted by the class label; click a header to sort.</p>']
    s = result.samples
    for model in facts.models(result):
        names = facts.class_names(result, model)
        modes = list(dict.fromkeys(s.loc[s["model"] == model, "targeted"]))
        for mode in modes:
            frame = facts.per_class(result, model, mode)
            if frame.empty:
                continue
            eps_cols = [c for c in frame.columns if isinstance(c, float)]
            headline = _headline(frame, eps_cols, names)
            note = ""
            if len(frame) > MAX_ROWS:
                key = eps_cols[len(eps_cols) // 2] if eps_cols else "clean"
                frame = frame.sort_values(key).head(MAX_ROWS)
                note = (f'<p class="note">{MAX_ROWS} weakest of {len(names)} classes at '
                        f'eps={key:g}.</p>' if eps_cols else "")
            rows = []
            for label, r in frame.iterrows():
                class_id = int(cast(int, label))  # the index holds the class ids
                name = names[class_id] if 0 <= class_id < len(names) else str(label)
                cells = [cell(name, cls="l", sort=class_id), cell(int(r["n"]), sort=int(r["n"])),
                         cell(facts.pct(r["clean"]), sort=r["clean"], style=heat(r["clean"]))]
                cells += [cell(facts.pct(r[e]), sort=r[e], style=heat(r[e])) for e in eps_cols]
                rows.append("<tr>" + "".join(cells) + "</tr>")
            # Folded: one row per class is detail; the headline names the weakest and the strongest class.
            out.append(fold(f"<b>{esc(model)}: {esc(facts.mode_label(mode))}</b>{headline}", note +
                            table(["class", "n", "clean", *[f"eps={e:g}" for e in eps_cols]], rows, sortable=True)))
    return "".join(out)


def _headline(frame, eps_cols: list, names: list[str]) -> str:
    """' · weakest class 8 (11.6%), strongest 0 (77.8%) at eps=0.1': at the eps where the classes differ
    most (the smallest such eps on ties), where a per-class gap is worth opening the table for."""
    if not eps_cols or len(frame) < 2:
        return ""
    spread = {e: float(frame[e].max() - frame[e].min()) for e in eps_cols}
    eps = max(eps_cols, key=lambda e: (spread[e], -e))
    column = frame[eps]
    low, high = column.idxmin(), column.idxmax()

    def name(label) -> str:
        return names[int(label)] if 0 <= int(label) < len(names) else str(label)

    return (f" · weakest class {esc(name(low))} ({facts.pct(column[low])}), strongest {esc(name(high))} "
            f"({facts.pct(column[high])}) at eps={eps:g}")
