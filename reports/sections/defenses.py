"""What each defense bought and what it cost: defended models side by side with the undefended one.

Shown when the results hold a model built by a robustlab defense (its metadata carries `defense`,
written by `robustlab.defenses`). The baseline is the first audited model without a defense.
"""

from __future__ import annotations

from typing import Any

from robustlab import verdicts as V
from robustlab.results import WORST_CASE, AuditResult

from .. import facts, figures
from ..serializers.html import cell, esc, figure, fold, heat, table

ID = "defenses"
TITLE = "Defenses: what each bought, what it cost"


def defended(result: AuditResult) -> dict[str, dict]:
    """{model: its defense description} for the audited models that a defense built."""
    models = (result.metadata or {}).get("models", {}) or {}
    return {name: info["defense"] for name, info in models.items()
            if isinstance(info, dict) and isinstance(info.get("defense"), dict)}


def baseline(result: AuditResult) -> str | None:
    built = defended(result)
    return next((m for m in facts.models(result) if m not in built), None)


def applies(result: AuditResult) -> bool:
    return bool(defended(result)) and not facts.bounded(result.summary).empty


def render(result: AuditResult) -> str:
    built = defended(result)
    base = baseline(result)
    summary = result.summary[result.summary["targeted"] == "none"]
    if summary.empty:
        summary = result.summary
    eps_list = facts.eps_values(summary)
    figures_of = {m: _figures(summary, m) for m in facts.models(result)}
    rows, lines = [], []
    base_clean, base_robust = figures_of.get(base, (None, {})) if base else (None, {})
    for model in facts.models(result):
        if model != base and model not in built:
            continue
        clean, robust = figures_of[model]
        d = built.get(model)
        cells = [cell(model, cls="l"), cell(describe(d) if d else "none (baseline)", cls="l"),
                 cell(_with_delta(clean, base_clean if d else None), sort=clean, raw=True)]
        for e in eps_list:
            v = robust.get(e)
            ref = base_robust.get(e) if d else None
            cells.append(cell(_with_delta(v, ref) + _verdict_mark(result, model, e), sort="" if v is None else v,
                              style=heat(v) if v is not None else "", raw=True))
        cells.append(cell(_how_audited(result, model, d), cls="l"))
        rows.append("<tr>" + "".join(cells) + "</tr>")
        if d and base is not None and eps_list:
            e = max(eps_list)
            lines.append(_bought(model, d, clean, base_clean, robust, base_robust, e,
                                 _unestablished(result, {model: model, "baseline " + base: base}, e)))
    headers = ["model", "defense", "clean", *[f"worst case eps={e:g}" for e in eps_list], "attacked"]
    html = ('<p class="note">Worst-case robust accuracy over every attack (untargeted), with the change against the '
            f'undefended baseline <b>{esc(base) if base else "(none audited)"}</b> in points. A defense is only as good '
            'as the attacks that test it: a gain is only "bought" between figures whose evaluation is established '
            '(standard attack suite, every integrity check passed); other changes are marked.</p>')
    # Open: the side-by-side table and what each defense bought are the section's findings; the training
    # curves that back them are folded (_training).
    html += table(headers, rows, sortable=True, cls="defenses", text=2)
    if lines:
        html += "<ul>" + "".join(f"<li>{line}</li>" for line in lines) + "</ul>"
    html += _training(built)
    return html


def _evaluation(result: AuditResult, model: str, eps: float) -> dict | None:
    return V.find(V.records(result.metadata, result.summary), model, None, eps, "none")


def _verdict_mark(result: AuditResult, model: str, eps: float) -> str:
    """A mark under a figure whose evaluation is not established (or weaker than standard)."""
    entry = _evaluation(result, model, eps)
    if entry is None or entry.get("status") == V.ESTABLISHED:
        return ""
    cls = "down" if entry.get("status") == V.NOT_ESTABLISHED else "muted"
    return f'<br><span class="{cls}">{esc(V.status_label(entry))}</span>'


def _unestablished(result: AuditResult, models: dict[str, str], eps: float) -> list[str]:
    """'name: status (reasons)' for each of the models whose figure at eps is not established."""
    out = []
    for label, model in models.items():
        entry = _evaluation(result, model, eps)
        if entry is None or entry.get("status") != V.ESTABLISHED:
            out.append(f"{label}: {V.status_label(entry)}")
    return out


def describe(d: dict) -> str:
    kind = d.get("defense")
    if kind == "adversarial-training":
        method = {"pgd": "PGD-AT", "fast": "fast FGSM-AT", "trades": "TRADES"}.get(str(d.get("method")),
                                                                                   d.get("method"))
        best = f", best epoch {d['best_epoch']}" if d.get("best_epoch") else ""
        return (f"{method}, {d.get('norm')} eps={_g(d.get('eps'))}, {d.get('steps')} steps, "
                f"{d.get('epochs')} epochs{best}" + (f", {d['processes']} processes" if d.get("processes", 1) > 1 else ""))
    if kind == "distillation":
        return f"defensive distillation, T={_g(d.get('temperature'))}, deployed at T=1"
    if kind == "ensemble":
        rule = {"logits": "averaged logits", "probs": "averaged probabilities", "vote": "majority vote"}.get(
            str(d.get("combine")), d.get("combine"))
        return f"ensemble of {d.get('members')}, {rule}"
    return str(kind)


def _figures(summary, model: str) -> tuple[float | None, dict[float, float]]:
    block = summary[summary["model"] == model]
    if block.empty:
        return None, {}
    clean = float(block["clean_accuracy"].iloc[0])
    bounded = facts.bounded(block)
    worst = bounded[bounded["attack"] == WORST_CASE]
    rows = worst if len(worst) else bounded
    robust: dict[float, float] = {}
    for e, v in zip(rows["eps"], rows["robust_accuracy"]):
        robust[float(e)] = min(float(v), robust.get(float(e), 1.0))
    return clean, robust


def _with_delta(value: float | None, reference: float | None) -> str:
    if value is None:
        return "–"
    text = esc(facts.pct(value))
    if reference is None:
        return text
    delta = 100 * (value - reference)
    cls = "up" if delta > 0.05 else ("down" if delta < -0.05 else "muted")
    return f'{text} <span class="{cls}">({delta:+.1f})</span>'


def _how_audited(result: AuditResult, model: str, d: dict | None) -> str:
    transfer = (result.metadata or {}).get("transfer", {}) or {}
    if model in transfer:
        return "transfer from its surrogate (not differentiable)"
    return "white-box" if d is None or d.get("combine") != "vote" else "transfer"


def _bought(model, d, clean, base_clean, robust, base_robust, e, unestablished: list[str]) -> str:
    """What the defense bought at the largest eps: "bought N points" only between established figures."""
    gain = None if robust.get(e) is None or base_robust.get(e) is None else 100 * (robust[e] - base_robust[e])
    change = None if clean is None or base_clean is None else 100 * (clean - base_clean)
    text = f"<b>{esc(model)}</b>: "
    if gain is None:
        text += "no robust figure"
    elif not unestablished:
        text += f"bought {gain:+.1f} points of worst-case robust accuracy at eps={e:g}"
    else:
        text += (f'{gain:+.1f} points of worst-case robust accuracy at eps={e:g}, <span class="down">not a bought gain: '
                 f"{esc('; '.join(unestablished))}</span>")
    text += f", {change:+.1f} points of clean accuracy" if change is not None else ""
    if d.get("defense") == "distillation":
        text += (". Distillation saturates the softmax, which blinds cross-entropy attacks (Carlini and Wagner 2016); "
                 "the margin-loss attacks and CW are what measure it")
    if d.get("combine") == "vote":
        text += ". A vote has no gradient: these figures come from transfer attacks, an upper bound on its robustness"
    return text + "."


def _training(built: dict[str, dict]) -> str:
    panels = []
    for model, d in built.items():
        history = [h for h in d.get("history", []) if isinstance(h, dict)]
        if d.get("defense") != "adversarial-training" or not history:
            continue
        series = {key: {int(h["epoch"]): float(h[key]) for h in history if h.get(key) is not None}
                  for key in ("clean_accuracy", "robust_accuracy")}
        if not any(series.values()):
            continue
        panels.append({"title": model, "series": series, "best": d.get("best_epoch"),
                       "eps": d.get("eps"), "norm": d.get("norm")})
    if not panels:
        return ""
    return fold("Adversarial training: validation accuracy per epoch · " + "; ".join(
        _best_epoch(p) for p in panels), figure(
        figures.training_curves(panels), "clean and robust validation accuracy per training epoch",
        "Clean and PGD robust accuracy on held-out training data after each epoch; the marked epoch's weights were "
        "kept (best robust accuracy, against robust overfitting, Rice et al. 2020)."))


def _best_epoch(panel: dict) -> str:
    """'pgd-at: epoch 12 of 30 kept, robust 41.0% / clean 88.0%' (the epoch the weights come from)."""
    robust, clean = panel["series"].get("robust_accuracy", {}), panel["series"].get("clean_accuracy", {})
    epochs = sorted(set(robust) | set(clean))
    best = panel.get("best") if panel.get("best") in epochs else (epochs[-1] if epochs else None)
    if best is None:
        return f"<b>{esc(panel['title'])}</b>"
    figures_at = " / ".join(f"{label} {facts.pct(series[best])}" for label, series in
                            (("robust", robust), ("clean", clean)) if best in series)
    return f"<b>{esc(panel['title'])}</b>: epoch {best} of {epochs[-1]} kept, {figures_at}"


def _g(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else esc(value)
