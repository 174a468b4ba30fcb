"""6. Examples from examples.npz: clean | adversarial | perturbation (amplified), with predictions.

Images ((H, W), or (C, H, W) with C in 1 or 3) are shown as pictures; 1-D (tabular) inputs as the
features the attack changed most. Other input shapes are not shown. One column group per budget,
each with the attack that did best at that budget, plus minimal-perturbation runs without a budget.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from robustlab.results import WORST_CASE, AuditResult, example_key

from .. import facts, figures
from ..serializers.html import esc, fold

ID = "examples"
TITLE = "Adversarial examples"
MAX_SIDE = 128      # larger images are subsampled for the report
TOP_FEATURES = 5


def _kind(shape: tuple) -> str | None:
    if len(shape) == 1:
        return "tabular"
    if len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3)):
        return "image"
    return None


def applies(result: AuditResult) -> bool:
    return any(_kind(result.examples[f"clean|{m}"].shape[1:]) and len(result.examples[f"clean|{m}"])
               for m in facts.models(result) if f"clean|{m}" in result.examples)


def _columns(result: AuditResult, model: str, mode: str) -> list[tuple[str, float | None, str]]:
    """(attack, eps or None, example key) per column group, in eps order, unbounded runs last."""
    s = result.summary
    block = s[(s["model"] == model) & (s["targeted"] == mode) & (s["attack"] != WORST_CASE)]
    out: list[tuple[str, float | None, str]] = []
    for eps in facts.eps_values(block):
        at = block[(block["eps"] - eps).abs() <= 1e-12].sort_values("robust_accuracy", kind="stable")
        for attack in at["attack"]:
            key = example_key(model, attack, eps, mode)
            if key in result.examples:
                out.append((attack, eps, key))
                break
    for attack in dict.fromkeys(block.loc[block["eps"].isna(), "attack"]):
        key = example_key(model, attack, None, mode)
        if key in result.examples:
            out.append((attack, None, key))
    return out


def _predictions(result: AuditResult, model: str, attack: str, eps: float | None, mode: str) -> pd.DataFrame:
    s = result.samples
    rows = s[(s["model"] == model) & (s["attack"] == attack) & (s["targeted"] == mode)]
    rows = rows[rows["eps"].isna()] if eps is None else rows[(rows["eps"] - eps).abs() <= 1e-12]
    return rows.drop_duplicates("sample", keep="first").set_index("sample")


def _bounds(result: AuditResult, model: str, clean: np.ndarray) -> tuple[float, float]:
    b = ((result.metadata.get("models") or {}).get(model) or {}).get("bounds") or {}
    low, high = b.get("low"), b.get("high")
    low = min(low) if isinstance(low, list) and low else low
    high = max(high) if isinstance(high, list) and high else high
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or not high > low:
        low, high = float(np.min(clean)), float(np.max(clean))
    return float(low), float(high) if high > low else float(low) + 1.0


def _shrink(array: np.ndarray) -> np.ndarray:
    side = max(array.shape[-2:]) if array.ndim >= 2 else 0
    step = math.ceil(side / MAX_SIDE) if side > MAX_SIDE else 1
    return array[..., ::step, ::step] if step > 1 else array


def _name(names: list[str], label) -> str:
    try:
        i = int(label)
    except (TypeError, ValueError):
        return "?"
    return names[i] if 0 <= i < len(names) else str(i)


def render(result: AuditResult) -> str:
    out = ['<p class="note">Correctly classified samples and what the strongest attack at each budget made of them. '
           'Perturbation: adversarial minus clean, amplified so the column\'s largest change is full colour '
           '(red: increased, blue: decreased, grey: unchanged). <span class="flip">Red</span> predictions changed.</p>']
    for model in facts.models(result):
        clean_key, ids_key = f"clean|{model}", f"sample|{model}"
        if clean_key not in result.examples or ids_key not in result.examples:
            continue
        clean = np.asarray(result.examples[clean_key])
        ids = [int(i) for i in result.examples[ids_key]]
        kind = _kind(clean.shape[1:])
        if kind is None or not len(clean):
            out.append(f'<p class="note">{esc(model)}: inputs of shape {esc(clean.shape[1:])} are not shown.</p>')
            continue
        names = facts.class_names(result, model)
        modes = list(dict.fromkeys(result.summary.loc[result.summary["model"] == model, "targeted"]))
        for mode in modes:
            columns = _columns(result, model, mode)
            if not columns:
                continue
            body = (_image_table if kind == "image" else _tabular_table)(result, model, mode, clean, ids, names, columns)
            heading = f"<b>{esc(model)}: {esc(facts.mode_label(mode))}</b> · {_headline(result, model, mode, ids, columns)}"
            # Folded, every one: pictures are what a figure looks like, not the figure; the headline counts
            # the flips of the strongest attack at the largest budget.
            out.append(fold(heading, body))
    return "".join(out)


def _headline(result: AuditResult, model: str, mode: str, ids: list[int], columns) -> str:
    """'8 samples; pgd at eps=0.2 changed 7 of 8 predictions' (the last budgeted column, else the first)."""
    bounded = [c for c in columns if c[1] is not None]
    attack, eps, _ = bounded[-1] if bounded else columns[0]
    rows = _predictions(result, model, attack, eps, mode)
    rows = rows[rows.index.isin(ids) & rows["attacked"].astype(bool)]
    budget = f"at eps={eps:g}" if eps is not None else "without a budget"
    if mode == facts.UNTARGETED:
        changed = int((rows["adv_pred"] != rows["label"]).sum())
        return f"{len(ids)} samples; {esc(attack)} {budget} changed {changed} of {len(rows)} predictions"
    reached = int((rows["adv_pred"] == rows["target"]).sum())
    return f"{len(ids)} samples; {esc(attack)} {budget} reached the target for {reached} of {len(rows)}"


def _pred_line(row: pd.Series | None, names: list[str], label: int, mode: str) -> str:
    if row is None:
        return '<span class="pred muted">no row</span>'
    if not bool(row["attacked"]):
        return '<span class="pred muted">not attacked</span>'
    pred = _name(names, row["adv_pred"])
    conf = f" ({facts.pct(row['adv_confidence'], 0)})" if facts.is_num(row["adv_confidence"]) else ""
    cls = "held" if int(row["adv_pred"]) == label else "flip"
    target = ""
    if mode != facts.UNTARGETED and not pd.isna(row["target"]):
        target = f'<span class="pred muted">target {esc(_name(names, row["target"]))}</span>'
    return f'<span class="pred {cls}">{esc(pred)}{esc(conf)}</span>{target}'


def _image_table(result, model, mode, clean, ids, names, columns) -> str:
    low, high = _bounds(result, model, clean)
    head1 = '<th rowspan="2">clean</th>' + "".join(
        f'<th colspan="2" class="grp">{esc(attack)} · {"eps=" + format(eps, "g") if eps is not None else "no budget"}</th>'
        for attack, eps, _ in columns)
    scales = []
    for _, _, key in columns:
        delta = np.asarray(result.examples[key], dtype=float) - clean
        scales.append(float(np.abs(delta).max()) if delta.size else 0.0)
    head2 = "".join(f'<th>adversarial</th><th>perturbation<br><span class="muted">±{s:.3g}</span></th>' for s in scales)
    preds = [_predictions(result, model, attack, eps, mode) for attack, eps, _ in columns]
    rows = []
    for i, sample in enumerate(ids):
        x = _shrink(clean[i])
        label = None
        first = next((p.loc[sample] for p in preds if sample in p.index), None)
        label = int(first["label"]) if first is not None else None
        clean_pred = _name(names, first["clean_pred"]) if first is not None else "?"
        cells = [f'<td><img src="{figures.image_uri(x, low, high)}" alt="clean sample {sample}">'
                 f'<span class="pred">#{sample} · label {esc(_name(names, label))}</span>'
                 f'<span class="pred held">pred {esc(clean_pred)}</span></td>']
        for (attack, eps, key), p, scale in zip(columns, preds, scales):
            adv = _shrink(np.asarray(result.examples[key][i]))
            row = p.loc[sample] if sample in p.index else None
            cells.append(f'<td class="start"><img src="{figures.image_uri(adv, low, high)}" alt="adversarial sample {sample}">'
                         f"{_pred_line(row, names, label if label is not None else -1, mode)}</td>")
            cells.append(f'<td><img src="{figures.delta_uri(adv - x, scale)}" alt="perturbation of sample {sample}">'
                         + (f'<span class="pred muted">L2 {facts.num(row["l2"])}</span>' if row is not None
                            and bool(row["attacked"]) else "") + "</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="examples"><thead><tr>{head1}</tr><tr>{head2}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _tabular_table(result, model, mode, clean, ids, names, columns) -> str:
    preds = [_predictions(result, model, attack, eps, mode) for attack, eps, _ in columns]
    head = "<th>sample</th>" + "".join(
        f'<th class="grp">{esc(attack)} · {"eps=" + format(eps, "g") if eps is not None else "no budget"}</th>'
        for attack, eps, _ in columns)
    features = facts.feature_names(result, model)
    if len(features) != clean.shape[1]:
        features = [f"x[{j}]" for j in range(clean.shape[1])]
    rows = []
    for i, sample in enumerate(ids):
        first = next((p.loc[sample] for p in preds if sample in p.index), None)
        label = int(first["label"]) if first is not None else -1
        cells = [f'<td>#{sample}<span class="pred">label {esc(_name(names, label))}</span></td>']
        for (attack, eps, key), p in zip(columns, preds):
            delta = np.asarray(result.examples[key][i], dtype=float) - clean[i]
            row = p.loc[sample] if sample in p.index else None
            top = np.argsort(-np.abs(delta))[:TOP_FEATURES]
            biggest = float(np.abs(delta).max()) or 1.0
            bars = "".join(
                f'<div class="mono" style="text-align:left;white-space:nowrap">{esc(features[j])} {clean[i][j]:.3g}→{clean[i][j] + delta[j]:.3g} '
                f'<span class="bar {"pos" if delta[j] > 0 else "neg"}" style="width:{40 * abs(delta[j]) / biggest:.0f}px"></span></div>'
                for j in top if delta[j] != 0)
            cells.append(f'<td class="start">{_pred_line(row, names, label, mode)}{bars or "<span class=muted>unchanged</span>"}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="examples"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')
