"""Two runs side by side: what got better or worse, by how much, per model, attack and eps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from robustlab.results import WORST_CASE, AuditResult

from . import facts

KEYS = ["model", "attack", "norm", "eps", "targeted"]
# metric -> True when larger is better
METRICS = {"robust_accuracy": True, "clean_accuracy": True, "median_l2": True}


@dataclass
class Comparison:
    a: AuditResult
    b: AuditResult
    label_a: str
    label_b: str
    rows: pd.DataFrame                      # model, threat, attack, eps, metric, a, b, delta, change
    pairing: dict[str, str] = field(default_factory=dict)   # model in A -> model in B
    warnings: list[str] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {c: int((self.rows["change"] == c).sum()) for c in ("better", "worse", "same")} if len(self.rows) \
            else {"better": 0, "worse": 0, "same": 0}


def _describe(key: tuple) -> str:
    model, attack, norm, eps, targeted = key
    return f"{model} · {attack} · {norm} · eps={facts.eps_label(eps)} · {facts.mode_label(targeted)}"


def _key(row: pd.Series, model: str) -> tuple:
    eps = round(float(row["eps"]), 12) if facts.is_num(row["eps"]) else None
    return (model, str(row["attack"]), str(row["norm"]), eps, str(row["targeted"]))


def build(a: AuditResult, b: AuditResult, label_a: str, label_b: str) -> Comparison:
    models_a, models_b = facts.models(a), facts.models(b)
    pairing = {m: m for m in models_a if m in models_b}
    warnings = []
    if not pairing and len(models_a) == 1 and len(models_b) == 1:
        pairing = {models_a[0]: models_b[0]}
        warnings.append(f"Different model names; comparing {models_a[0]!r} (A) with {models_b[0]!r} (B).")
    data_a, data_b = a.metadata.get("data") or {}, b.metadata.get("data") or {}
    if data_a.get("sha256") and data_b.get("sha256") and data_a["sha256"] != data_b["sha256"]:
        warnings.append(f"The runs used different data ({data_a.get('source')}, n={data_a.get('n')} vs "
                        f"{data_b.get('source')}, n={data_b.get('n')}): differences are not like for like.")
    for option in ("attacks", "steps", "restarts", "loss", "seed", "norm"):
        va, vb = (a.metadata.get("config") or {}).get(option), (b.metadata.get("config") or {}).get(option)
        if va != vb:
            warnings.append(f"Configuration differs: {option} = {va!r} (A) vs {vb!r} (B).")
    if (a.metadata.get("attack_configs") or []) != (b.metadata.get("attack_configs") or []) and not any(
            "Configuration differs" in w for w in warnings):
        warnings.append("Attack options differ between the runs (see each run's attack configuration).")

    index_b: dict[tuple, pd.Series] = {}
    for _, r in b.summary.iterrows():
        index_b[_key(r, str(r["model"]))] = r
    reverse = {mb: ma for ma, mb in pairing.items()}
    records, seen_b, only_a = [], set(), []
    clean_done = set()
    for _, ra in a.summary.iterrows():
        model_a = str(ra["model"])
        if model_a not in pairing:
            only_a.append(_describe(_key(ra, model_a)))
            continue
        kb = _key(ra, pairing[model_a])
        rb = index_b.get(kb)
        if rb is None:
            only_a.append(_describe(_key(ra, model_a)))
            continue
        seen_b.add(kb)
        shown = model_a if pairing[model_a] == model_a else f"{model_a} → {pairing[model_a]}"
        base = {"model": shown, "targeted": str(ra["targeted"]), "attack": str(ra["attack"]),
                "norm": str(ra["norm"]), "eps": kb[3]}
        if (model_a, base["targeted"]) not in clean_done:
            clean_done.add((model_a, base["targeted"]))
            records.append(_record(base | {"attack": "(clean)", "eps": 0.0}, "clean_accuracy", ra, rb))
        if kb[3] is not None:
            records.append(_record(base, "robust_accuracy", ra, rb))
        else:
            records.append(_record(base, "median_l2", ra, rb))
    only_b = [_describe(k) for k, r in index_b.items() if k not in seen_b and k[0] in reverse]
    only_b += [f"{m} (model not in A)" for m in models_b if m not in reverse]
    only_a, only_b = _grouped(only_a), _grouped(only_b)
    rows = pd.DataFrame.from_records(records, columns=["model", "targeted", "attack", "norm", "eps", "metric", "a", "b",
                                                       "delta", "change"])
    return Comparison(a=a, b=b, label_a=label_a, label_b=label_b, rows=rows, pairing=pairing, warnings=warnings,
                      only_a=only_a, only_b=only_b)


def _grouped(items: list[str]) -> list[str]:
    """'model · attack · norm · eps · mode' lines -> one line per (model, mode) with the count of records."""
    groups: dict[tuple, list[str]] = {}
    for item in items:
        parts = item.split(" · ")
        key = (parts[0], parts[-1]) if len(parts) == 5 else (item, "")
        groups.setdefault(key, []).append(parts[1] if len(parts) == 5 else "")
    return [f"{m} · {mode}: {len(v)} records ({', '.join(dict.fromkeys(v))})" if mode else m
            for (m, mode), v in groups.items()]


def _record(base: dict, metric: str, ra: pd.Series, rb: pd.Series) -> dict[str, Any]:
    va, vb = ra.get(metric), rb.get(metric)
    va = float(va) if va is not None and facts.is_num(va) else None
    vb = float(vb) if vb is not None and facts.is_num(vb) else None
    delta = None if va is None or vb is None else vb - va
    if delta is None:
        change = "n/a"
    elif abs(delta) <= 1e-12:
        change = "same"
    else:
        change = "better" if (delta > 0) == METRICS[metric] else "worse"
    return base | {"metric": metric, "a": va, "b": vb, "delta": delta, "change": change}


def headline(comparison: Comparison) -> list[str]:
    """The largest moves of worst-case robust accuracy, as sentences."""
    rows = comparison.rows
    worst = rows[(rows["metric"] == "robust_accuracy") & (rows["attack"] == WORST_CASE) & rows["delta"].notna()]
    if worst.empty:
        worst = rows[(rows["metric"] == "robust_accuracy") & rows["delta"].notna()]
    lines = []
    for _, r in worst.iterrows():
        sign = "+" if r["delta"] > 0 else ""
        lines.append(f"{r['model']} ({facts.mode_label(r['targeted'])}, {r['attack']}, eps={facts.eps_label(r['eps'])}): "
                     f"{facts.pct(r['a'])} → {facts.pct(r['b'])} ({sign}{r['delta'] * 100:.1f} pp, {r['change']})")
    return lines
