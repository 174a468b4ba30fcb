"""What the attacks changed inside the model: saliency, SHAP and layer probes, clean vs adversarial.

Shown when the audit ran its explanation stage (`--explain`); everything comes from the saved
frames (explain_*.csv) and maps (examples.npz, `explain|KIND|MODEL|KEY`).
"""

from __future__ import annotations

import math
from typing import Hashable

import numpy as np
import pandas as pd

from robustlab.results import AuditResult

from .. import facts, figures
from ..serializers.html import cell, esc, fold, table

ID = "explanations"
TITLE = "What the attacks changed: explanations"
MAX_MAPS = 6
MAX_BARS = 4  # tabular samples drawn as bar charts (each one panel)


def applies(result: AuditResult) -> bool:
    return any(name.startswith("explain_") for name in result.tables)


def render(result: AuditResult) -> str:
    info = (result.metadata or {}).get("explain", {}) or {}
    html = ('<p class="note">Explanations of the same correctly classified samples before and after each attack '
            '(the strongest attack at each budget). Saliency and SHAP explain the true class; probes are linear '
            'classifiers on each layer\'s activations. See the definitions under each table.</p>')
    html += _saliency(result, info)
    html += _sanity(result)
    html += _shap(result, info)
    html += _probes(result)
    html += _skipped(info)
    return html


# ---------------------------------------------------------------------------- saliency
def _saliency(result: AuditResult, info: dict) -> str:
    summary = result.tables.get("explain_saliency_summary")
    if summary is None or summary.empty:
        return ""
    rows, flags = [], []
    for _, r in summary.iterrows():
        flagged = r.get("flagged")
        flag = "" if not isinstance(flagged, str) or not flagged else flagged
        if flag:
            flags.append(f"{r['model']}, {_key_label(r['key'])}: {flag}")
        rows.append("<tr>" + "".join([
            cell(r["model"], cls="l"), cell(_key_label(r["key"]), cls="l"),
            cell(facts.pct(r.get("fooled_share"))), cell(_num(r.get("spearman_median")), sort=_v(r.get("spearman_median"))),
            cell(_num(r.get("topk_median")), sort=_v(r.get("topk_median"))),
            cell(_num(r.get("completeness_error_median"), ".2g")),
            cell(_num(r.get("sensitivity_max_median"), ".3g")), cell(_num(r.get("infidelity_median"), ".3g")),
            cell(_short_flag(flag), cls="l bad" if flag else "l")]) + "</tr>")
    methods = ", ".join(dict.fromkeys(str(m) for m in summary.get("method", pd.Series(dtype=str)).dropna()))
    html = table(["model", "inputs", "fooled", "Spearman", "top-10%", "completeness err.", "sensitivity", "infidelity",
                   "flag"], rows, sortable=True, text=2, cls="compact")
    if flags:
        html += '<ul class="checks">' + "".join(f'<li class="bad">{esc(f)}</li>' for f in flags) + "</ul>"
    html += ('<p class="note">Medians over the explained samples. <b>Spearman</b>: rank correlation between the clean and the adversarial map (|attribution|), '
             '1 = unchanged. <b>top-10%</b>: share of the most important features both maps share. '
             '<b>completeness err.</b>: |sum of attributions − (f(x) − f(baseline))| relative; a method whose '
             'completeness fails on this model is flagged and its maps should not be trusted. <b>sensitivity</b> (max) '
             'and <b>infidelity</b> (captum.metrics): how much the explanation changes under small noise, and how '
             'well it predicts the output change (lower is better for both).</p>')
    html += _maps(result, "saliency", "Integrated-gradients maps of the true class")
    adversarial = summary[summary["key"] != "clean"]
    rho = _range(adversarial.get("spearman_median"))
    headline = (f"<b>Saliency ({esc(methods.replace('_', ' '))})</b>: how far the attribution moved · "
                + (f"median Spearman clean vs adversarial {rho} over {len(adversarial)} attacks" if rho else
                   "no adversarial maps") + (f' · <span class="bad">{len(flags)} flagged</span>' if flags else ""))
    # Open when flagged: a flag says these maps should not be trusted, which a reader must not miss.
    return fold(headline, html, open=bool(flags))


def _range(values) -> str:
    """'0.12–0.94' (the smallest and the largest of the values), one value alone, or '' without any."""
    found = [v for v in (_v(x) for x in (values if values is not None else [])) if v is not None]
    if not found:
        return ""
    low, high = min(found), max(found)
    return f"{low:.2f}" if high - low < 0.005 else f"{low:.2f}–{high:.2f}"


def _short_flag(flag: str) -> str:
    """'...completeness fails on this model for 24% of samples...' -> 'completeness fails (24%)'."""
    if not flag:
        return "–"
    import re

    share = re.search(r"for (\d+(?:\.\d+)?%) of samples", flag)
    return "completeness fails" + (f" ({share.group(1)})" if share else "") if "completeness" in flag else "flagged"


def _maps(result: AuditResult, kind: str, caption: str) -> str:
    """Per model, the first samples' maps (clean and each adversarial set), folded away in a <details>:
    images as maps with a colour bar per row, 1-D (tabular) inputs as bars per named feature."""
    out = []
    for model in facts.models(result):
        prefix = f"explain|{kind}|{model}|"
        keys = [k[len(prefix):] for k in result.examples if k.startswith(prefix)]
        if "clean" not in keys:
            continue
        columns = ["clean"] + [k for k in keys if k != "clean"]
        stacks = [_as_maps(result.examples[prefix + k]) for k in columns]
        count = min(MAX_MAPS, *(len(m) for m in stacks))
        if count == 0:
            continue
        ids = result.examples.get(f"sample|{model}")
        labels = [f"#{int(ids[i])}" if ids is not None and i < len(ids) else f"sample {i + 1}" for i in range(count)]
        titles = [_key_label(k) for k in columns]
        if stacks[0].ndim == 2:  # (n, features): tabular
            figure = figures.attribution_bars(
                [{"title": labels[i], "values": [m[i] for m in stacks]} for i in range(min(count, MAX_BARS))],
                titles, _feature_names(result, model, stacks[0].shape[1]))
            note = ("Bars: the features with the largest attribution in any column, per sample; right of 0: evidence "
                    "for the true class, left: against.")
        elif stacks[0].ndim == 3:
            images = result.examples.get(f"clean|{model}")
            low, high = _bounds(result, model)
            figure = figures.attribution_maps(
                [{"label": labels[i], "maps": [m[i] for m in stacks],
                  "image": images[i] if images is not None and i < len(images) and _is_image(images[i]) else None}
                 for i in range(count)], titles, low=low, high=high)
            note = "Red: evidence for the true class, blue: against; one colour scale per row (its bar on the right)."
        else:
            continue
        out.append(f'<details class="maps"><summary>{esc(caption)}: {esc(model)} ({count} samples)</summary>'
                   f'<figure class="attribution"><img src="{figure}" alt="{esc(kind)} maps for {esc(model)}">'
                   f"<figcaption>{esc(note)}</figcaption></figure></details>")
    return "".join(out)


def _feature_names(result: AuditResult, model: str, count: int) -> list[str]:
    names = facts.feature_names(result, model)
    return names if len(names) == count else [f"x[{i}]" for i in range(count)]


def _as_maps(array: np.ndarray) -> np.ndarray:
    """(n, C, H, W) -> (n, H, W) summed over channels; (n, k, C, H, W) SHAP -> its first class; (n, d) stays:
    1-D (tabular) maps, drawn as bars."""
    a = np.asarray(array, dtype=float)
    if a.ndim == 5:
        a = a[:, 0]
    if a.ndim == 4:
        a = a.sum(axis=1)
    return a


def _is_image(x: np.ndarray) -> bool:
    return np.asarray(x).ndim in (2, 3) and np.asarray(x).shape[-1] > 1 and np.asarray(x).shape[-2] > 1


def _bounds(result: AuditResult, model: str) -> tuple[float, float]:
    b = ((result.metadata or {}).get("models", {}).get(model, {}) or {}).get("bounds", {}) or {}
    low, high = b.get("low", 0.0), b.get("high", 1.0)
    low = float(np.min(low)) if isinstance(low, list) else float(low)
    high = float(np.max(high)) if isinstance(high, list) else float(high)
    return low, high


# ---------------------------------------------------------------------------- sanity check
def _sanity(result: AuditResult) -> str:
    frame = result.tables.get("explain_sanity")
    if frame is None or frame.empty:
        return ""
    rows, reflect = [], 0
    for (model, method), block in frame.groupby(["model", "method"], sort=False):
        block = block.sort_values("step")
        last = block.iloc[-1]
        verdict = str(last.get("verdict", ""))
        reflect += verdict.startswith("reflects")
        rows.append("<tr>" + "".join([
            cell(model, cls="l"), cell(method, cls="l"), cell(int(last["step"])),
            cell(_num(last.get("spearman_median"))), cell(_num(last.get("ssim_median"))),
            cell(verdict, cls="l " + ("ok" if verdict.startswith("reflects") else "bad"))]) + "</tr>")
    headline = (f"<b>Sanity check</b>: do the maps depend on the model? · {reflect} of {len(rows)} "
                f"(model, method) pairs reflect the model")
    # Open when a method fails it: its maps would not reflect what the model learned.
    return fold(headline, table(["model", "method", "layers randomised", "Spearman vs trained", "SSIM vs trained",
                                 "verdict"], rows, text=2, cls="compact")
            + '<p class="note">Cascading parameter randomisation (Adebayo et al. 2018): layers are re-initialised from '
              'the output down and the maps recomputed. A method whose maps stay similar (Spearman on the informative '
              'region) does not reflect what the model learned.</p>', open=reflect < len(rows))


# ---------------------------------------------------------------------------- SHAP
def _shap(result: AuditResult, info: dict) -> str:
    shift = result.tables.get("explain_shap_shift")
    samples = result.tables.get("explain_shap_samples")
    if shift is None or shift.empty:
        return ""
    html = ""
    explainers = ", ".join(f"{esc(m)}: {esc(i.get('shap_explainer'))}" + (
        f" (fallback: {esc(i['shap_fallback'])})" if i.get("shap_fallback") else "")
        for m, i in info.items() if isinstance(i, dict) and i.get("shap_explainer"))
    if explainers:
        html += f'<p class="note">Explainer per model: {explainers}.</p>'
    rows, firsts = [], []
    for (model, key), block in shift.groupby(["model", "key"], sort=False):
        top = block.sort_values("rank").head(5)
        grid = _shap_grid(result, model)
        if len(top):
            firsts.append(facts.feature_label(result, str(model), top["feature"].iloc[0], grid))
        features = ", ".join(f"{esc(facts.feature_label(result, model, f, grid))} ({_num(c, '+.2g')})"
                             for f, c in zip(top["feature"], top["mean_change"]))
        rho = None
        if samples is not None and not samples.empty:
            s = samples[(samples["model"] == model) & (samples["key"] == key)]
            rho = float(s["spearman"].median()) if len(s) and s["spearman"].notna().any() else None
        rows.append("<tr>" + "".join([cell(model, cls="l"), cell(_key_label(key), cls="l"),
                                      cell(_num(rho)), cell(features, cls="l")]) + "</tr>")
    html += table(["model", "inputs", "Spearman clean vs adv", "most changed features (mean change of the true "
                   "class's SHAP)"], rows, text=2, cls="compact")
    html += _maps(result, "shap", "SHAP values of the true class")
    common = max(dict.fromkeys(firsts), key=firsts.count) if firsts else None
    headline = ("<b>SHAP</b>: which features the attack exploited"
                + (f" · most changed: {esc(common)} (first in {firsts.count(common)} of {len(firsts)} attacks)"
                   if common is not None else ""))
    return fold(headline, html)


def _shap_grid(result: AuditResult, model: Hashable) -> tuple[int, ...] | None:
    """The (rows, cols) of the model's SHAP maps (pooled from the image when it is large), if saved."""
    maps = result.examples.get(f"explain|shap|{model}|clean")
    return tuple(int(d) for d in np.asarray(maps).shape[1:]) if maps is not None else None


# ---------------------------------------------------------------------------- probes
def _probes(result: AuditResult) -> str:
    layers = result.tables.get("explain_probe_layers")
    adversarial = result.tables.get("explain_probe_adversarial")
    if layers is None or layers.empty:
        return ""
    html = ""
    for model, block in layers.groupby("model", sort=False):
        adv = adversarial[adversarial["model"] == model] if adversarial is not None else pd.DataFrame()
        keys = list(dict.fromkeys(adv["key"])) if len(adv) else []
        rows = []
        for _, r in block.iterrows():
            cells = [cell(r["layer"], cls="l"), cell(int(r["dim"])), cell(facts.pct(r["label_accuracy"])),
                     cell(facts.pct(r["control_accuracy"])), cell(_num(r["selectivity"], "+.2f"))]
            for k in keys:
                hit = adv[(adv["key"] == k) & (adv["layer"] == r["layer"])]
                acc = float(hit["accuracy"].iloc[0]) if len(hit) else None
                auc = float(hit["detect_auc"].iloc[0]) if len(hit) else None
                cells.append(cell(f"{facts.pct(acc)} · {_num(auc, '.2f')}"))
            rows.append("<tr>" + "".join(cells) + "</tr>")
        headers = ["layer", "dim", "label probe", "control task", "selectivity",
                   *[f"{_key_label(k)}: accuracy · AUC" for k in keys]]
        html += f"<h4>{esc(model)}</h4>" + table(headers, rows, text=1, cls="compact")
    html += ('<p class="note"><b>label probe</b>: held-out accuracy of a logistic regression predicting the label from '
             'the layer; <b>control task</b>: the same probe on random labels tied to input clusters (Hewitt and Liang '
             '2019); <b>selectivity</b> = label − control. Per attack: <b>accuracy</b> of the clean-trained probe on '
             'adversarial activations (true label), and <b>AUC</b> of a probe separating clean from adversarial '
             'activations (0.5 = indistinguishable).</p>')
    crossing = result.tables.get("explain_probe_crossing")
    crossed: list[str] = []
    if crossing is not None and not crossing.empty:
        items = []
        for _, r in crossing.iterrows():
            where = r.get("layer_not_true")
            if isinstance(where, str) and where:
                crossed.append(where)
            where = where if isinstance(where, str) and where else "no layer (fewer than half cross)"
            items.append(f"<li>{esc(r['model'])}, {esc(_key_label(r['key']))}: {esc(where)}</li>")
        html += "<p>First layer where the probes no longer see the true class (successful attacks):</p><ul>"
        html += "".join(items) + "</ul>"
    common = max(dict.fromkeys(crossed), key=crossed.count) if crossed else None
    headline = ("<b>Layer probes</b>: where the representation was pushed over"
                + (f" · first layer without the true class: {esc(common)} ({crossed.count(common)} of "
                   f"{len(crossing)} attacks)" if common is not None and crossing is not None else ""))
    return fold(headline, html)


def _skipped(info: dict) -> str:
    items = []
    for model, i in info.items():
        if not isinstance(i, dict):
            continue
        for stage, why in (i.get("skipped") or {}).items():
            items.append(f"<li>{esc(model)}: {esc(stage)} not run: {esc(why)}</li>")
    return f"<h3>Notes</h3><ul>{''.join(items)}</ul>" if items else ""


# ---------------------------------------------------------------------------- helpers
def _key_label(key) -> str:
    if key == "clean":
        return "clean"
    attack, _, eps = str(key).partition("|")
    return f"{attack} eps={eps}" if eps else str(key)


def _num(value, spec: str = ".3f") -> str:
    v = _v(value)
    return "–" if v is None else format(v, spec)


def _v(value):
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v
