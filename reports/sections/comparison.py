"""Sections of the comparison page (two runs). Each is (ID, TITLE, render(comparison))."""

from __future__ import annotations

from types import SimpleNamespace

from robustlab.results import WORST_CASE

from .. import facts, figures
from ..serializers.html import cell, esc, figure, table


def _overview(comp) -> str:
    counts = comp.counts()
    head = (f'<p class="lead"><span class="up">▲ {counts["better"]} better</span> · '
            f'<span class="down">▼ {counts["worse"]} worse</span> · <span class="same">= {counts["same"]} unchanged</span>'
            f' <span class="muted">(B against A: robust accuracy per model, attack and eps; clean accuracy; '
            f'median L2 of minimal attacks)</span></p>')
    lines = "".join(f"<li>{esc(line)}</li>" for line in _headline(comp))
    warn = "".join(f'<p><span class="badge warn">note</span> {esc(w)}</p>' for w in comp.warnings)
    runs = []
    for label, key, result in (("A", comp.label_a, comp.a), ("B", comp.label_b, comp.b)):
        meta = result.metadata
        data = meta.get("data") or {}
        models = "; ".join(f"{name} ({(info or {}).get('sha256', '')[:12]})"
                           for name, info in (meta.get("models") or {}).items())
        runs.append("<tr>" + cell(label, cls="l") + cell(key, cls="l") + cell(models, cls="l") +
                    cell(f"{data.get('source')} (n={data.get('n')})", cls="l") +
                    cell(str(meta.get("started", ""))[:19], cls="l") + "</tr>")
    return (head + (f"<h3>Worst case over attacks</h3><ul>{lines}</ul>" if lines else "") + warn +
            table(["run", "directory", "models (sha256)", "data", "started"], runs, text=5))


def _headline(comp):
    from ..diff import headline

    return headline(comp)


def _changes(comp) -> str:
    rows = []
    for _, r in comp.rows.iterrows():
        is_l2 = r["metric"] == "median_l2"
        fmt = facts.num if is_l2 else facts.pct
        delta = r["delta"]
        if delta is None or delta != delta:
            shown = "–"
        else:
            shown = f"{delta:+.3g}" if is_l2 else f"{delta * 100:+.1f} pp"
        cls = {"better": "up", "worse": "down"}.get(r["change"], "same")
        mark = {"better": "▲ better", "worse": "▼ worse", "same": "= same"}.get(r["change"], r["change"])
        rows.append(f'<tr class="{"worst" if r["attack"] == WORST_CASE else ""}">' +
                    cell(r["model"], cls="l") + cell(facts.mode_label(r["targeted"]), cls="l") +
                    cell(r["attack"], cls="l") +
                    cell("–" if r["attack"] == "(clean)" else facts.eps_label(r["eps"]),
                         sort=r["eps"] if facts.is_num(r["eps"]) else -1) +
                    cell(r["metric"], cls="l") +
                    cell(fmt(r["a"]), sort=r["a"] if r["a"] is not None else "") +
                    cell(fmt(r["b"]), sort=r["b"] if r["b"] is not None else "") +
                    cell(shown, sort=delta if delta is not None and delta == delta else "") +
                    cell(mark, cls=cls) + "</tr>")
    html = table(["model", "threat model", "attack", "eps", "metric", "A", "B", "change", ""], rows, sortable=True, text=3)
    for title, items in (("Only in A", comp.only_a), ("Only in B", comp.only_b)):
        if items:
            html += f'<p class="note"><b>{title}:</b> {esc("; ".join(items))}</p>'
    return html


def _curves(comp) -> str:
    out = []
    for model_a, model_b in comp.pairing.items():
        panels = []
        for targeted in dict.fromkeys(comp.a.summary.loc[comp.a.summary["model"] == model_a, "targeted"]):
            lines, clean, norm = {}, None, ""
            for tag, result, model in (("A", comp.a, model_a), ("B", comp.b, model_b)):
                block = result.summary[(result.summary["model"] == model) & (result.summary["targeted"] == targeted)]
                if block.empty:
                    continue
                lines[f"{tag} worst case"] = {0.0: float(block["clean_accuracy"].iloc[0]), **facts.worst_case(block)}
                clean = float(block["clean_accuracy"].iloc[0]) if clean is None else clean
                norm = ", ".join(dict.fromkeys(facts.bounded(block)["norm"]))
            if lines and clean is not None:
                panels.append({"title": facts.mode_label(targeted), "norm": norm, "clean": clean, "lines": lines})
        if panels:
            name = model_a if model_a == model_b else f"{model_a} → {model_b}"
            out.append(f"<h3>{esc(name)}</h3>" + figure(figures.robustness_curves(panels), f"worst-case curves of {name}",
                                                        "Worst-case robust accuracy against eps, A and B."))
    return "".join(out)


SECTIONS = [
    SimpleNamespace(ID="overview", TITLE="What changed", render=_overview),
    SimpleNamespace(ID="changes", TITLE="Every figure, A against B", render=_changes),
    SimpleNamespace(ID="curves", TITLE="Robustness curves, A and B", render=_curves),
]
