"""2. What was audited: models, data, run and configuration, from the results' metadata."""

from __future__ import annotations

import json
from typing import Any

from robustlab.results import AuditResult


from ..serializers.html import esc, fold, table

ID = "audited"
TITLE = "What was audited"


def applies(result: AuditResult) -> bool:
    return bool(result.metadata)


def _kv(pairs: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in pairs if v not in (None, ""))
    return f'<table class="kv">{rows}</table>'


def _mono(value: Any) -> str:
    return f"<code>{esc(value)}</code>" if value not in (None, "") else ""


def _list(values: Any, limit: int = 20) -> str:
    if not values:
        return ""
    values = [str(v) for v in values]
    shown = ", ".join(esc(v) for v in values[:limit])
    more = f' <span class="muted">… and {len(values) - limit} more</span>' if len(values) > limit else ""
    return f"{shown}{more}"


def _shape(value: Any) -> str:
    return esc(" × ".join(str(v) for v in value)) if isinstance(value, (list, tuple)) else esc(value)


def _bounds(b: Any) -> str:
    if isinstance(b, dict):
        return esc(f"[{_short(b.get('low'))}, {_short(b.get('high'))}]")
    return esc(b)


def _short(v: Any) -> str:
    if isinstance(v, list):
        return f"per feature ({len(v)})" if len(v) > 6 else ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def render(result: AuditResult) -> str:
    # Folded: provenance a reader looks up, not a finding; the headline names models, data and run.
    return fold(_headline(result.metadata), _detail(result.metadata))


def _headline(meta: dict) -> str:
    """'digits-cnn (38,282 parameters, sha256 e13c4991…) · digits:test, n=450 · fgsm, pgd, cw · took 1325.1 s'."""
    described = meta.get("models") or {}
    models = []
    for name, info in described.items():
        info = info or {}
        params = info.get("parameters")
        sha = str(info.get("sha256") or "")
        about = ", ".join(x for x in (f"{params:,} parameters" if isinstance(params, int) else "",
                                      f"sha256 {sha[:8]}…" if sha else "") if x)
        # one model: its size and digest; several: their names only, so the headline stays one line
        models.append(f"<b>{esc(name)}</b>" + (f" ({esc(about)})" if about and len(described) == 1 else ""))
    data = meta.get("data") or {}
    attacks = list(dict.fromkeys(str(c.get("attack")) for c in meta.get("attack_configs") or [] if c.get("attack")))
    seconds = meta.get("seconds")
    parts = [(f"{len(models)} models: " if len(models) > 1 else "") + (", ".join(models) or "no model recorded"),
             esc(f"{data.get('source')}, n={data.get('n')}") if data else "",
             esc(", ".join(attacks)), esc(f"took {seconds:.1f} s") if isinstance(seconds, (int, float)) else ""]
    return " · ".join(p for p in parts if p)


def _detail(meta: dict) -> str:
    parts = []
    for name, info in (meta.get("models") or {}).items():
        info = info or {}
        classes = info.get("classes") or []
        params = info.get("parameters")
        norm = ""
        if info.get("mean") is not None or info.get("std") is not None:
            norm = esc(f"mean {_short(info.get('mean'))}; std {_short(info.get('std'))} (applied inside the wrapper)")
        notes = info.get("notes") or []
        parts.append(f"<div><h3>Model: {esc(name)}</h3>" + _kv([
            ("Source", esc(info.get("source") or "in-memory module")),
            ("sha256", _mono(info.get("sha256"))),
            ("Parameters", esc(f"{params:,}") if isinstance(params, int) else esc(params)),
            ("Input shape", _shape(info.get("input_shape"))),
            ("Classes", (f"{len(classes)}: " + _list(classes)) if classes else esc(info.get("num_classes"))),
            ("Input bounds", _bounds(info.get("bounds"))),
            ("Normalisation", norm),
            ("Output", esc(info.get("output_kind"))),
            ("Deterministic", esc("yes" if info.get("deterministic") else "no") if "deterministic" in info else ""),
            ("Device / dtype", esc(" / ".join(str(x) for x in (info.get("device"), info.get("dtype")) if x))),
            ("Notes", "<br>".join(esc(n) for n in notes)),
        ]) + "</div>")
    data = meta.get("data") or {}
    parts.append("<div><h3>Data</h3>" + _kv([
        ("Source", esc(data.get("source"))),
        ("Samples", esc(data.get("n"))),
        ("Input shape", _shape(data.get("input_shape"))),
        ("sha256", _mono(data.get("sha256"))),
        ("Classes present", _list(data.get("classes_present"), 30)),
    ]) + "</div>")
    versions = ", ".join(f"{k.replace('_version', '')} {meta[k]}" for k in
                         ("robustlab_version", "torch_version", "numpy_version", "pandas_version", "python_version")
                         if meta.get(k))
    seconds = meta.get("seconds")
    parts.append("<div><h3>Run</h3>" + _kv([
        ("Started / finished", esc(" → ".join(str(x) for x in (meta.get("started"), meta.get("finished")) if x))),
        ("Time taken", esc(f"{seconds:.1f} s") if isinstance(seconds, (int, float)) else esc(seconds)),
        ("Seed", esc(meta.get("seed"))),
        ("Device", esc(", ".join(map(str, meta.get("device") or [])) +
                       (f" ({', '.join(map(str, meta.get('device_name') or []))})" if meta.get("device_name") else ""))),
        ("Batch size used", esc(", ".join(f"{k}: {v}" for k, v in (meta.get("batch_size_used") or {}).items()))),
        ("Versions", esc(versions)),
        ("Platform", esc(meta.get("platform"))),
    ]) + "</div>")
    html = f'<div class="grid2">{"".join(parts)}</div>'
    configs = meta.get("attack_configs") or []
    if configs:
        keys = list(dict.fromkeys(k for c in configs for k in c if k != "attack"))
        rows = []
        for c in configs:
            rows.append("<tr>" + f'<td class="l"><b>{esc(c.get("attack"))}</b></td>' +
                        "".join(f"<td>{esc(_fmt(c.get(k)))}</td>" for k in keys) + "</tr>")
        html += "<h3>Attacks</h3>" + table(["attack", *keys], rows)
    if meta.get("config"):
        html += ("<details><summary>Full configuration (the audit call's arguments)</summary><pre>"
                 f"{esc(json.dumps(meta['config'], indent=2, default=str))}</pre></details>")
    if meta.get("definitions"):
        items = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in meta["definitions"].items())
        html += f"<details><summary>Definitions</summary><ul class=\"muted\">{items}</ul></details>"
    return html


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


