"""The audit's explanation stage: saliency, SHAP and probes on clean and adversarial inputs.

The harness hands over, per model, the correctly classified samples it attacked and, for each
budget, the adversarial inputs of PGD (or the first attack when PGD did not run) on those same
samples: untargeted, or, when the audit ran targeted modes only, the first mode's first target. This module picks the samples each method runs on, calls `robustlab.explain`, and returns
tidy frames (one per kind, with a `model` column) plus the few maps the report draws.

Samples: saliency and SHAP explain the first `n_explain` (default 100) attacked samples; probes
need more to fit and held-out accuracy, so they use every attacked sample up to `n_probe` (500),
capped so activations stay small. A model without gradients (a vote ensemble) gets probes only;
the reason is recorded.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from robustlab import progress as bars
from robustlab.errors import InputError
from robustlab.model import ModelUnderTest

STAGES = ("saliency", "shap", "probes")
TABLES = {  # table name -> (stage, report attribute)
    "explain_saliency": ("saliency", "per_sample"),
    "explain_saliency_summary": ("saliency", "summary"),
    "explain_sanity": ("saliency", "sanity"),
    "explain_shap_features": ("shap", "per_feature"),
    "explain_shap_shift": ("shap", "shift"),
    "explain_shap_samples": ("shap", "per_sample"),
    "explain_probe_layers": ("probes", "layers"),
    "explain_probe_adversarial": ("probes", "adversarial"),
    "explain_probe_crossing": ("probes", "crossing"),
}
N_EXPLAIN = 100
N_PROBE = 500
PROBE_VALUES = 20_000_000  # input values kept for probes per set (500 digits, ~6 ImageNet images x 1000)
N_SANITY = 16
N_BACKGROUND = 50

Progress = Callable[[str], None]


def parse_stages(value: str | Sequence[str] | None) -> list[str]:
    """'saliency,shap,probes' / a list / None -> checked stage names ('all' = every stage)."""
    if value is None:
        return []
    names = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    if names in (["none"], []):
        return []
    if names == ["all"]:
        return list(STAGES)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise InputError("explain", f"unknown explanation {', '.join(unknown)}; expected a comma-separated list of "
                                    f"{', '.join(STAGES)} (or all, none)")
    return list(dict.fromkeys(names))


@dataclass
class Explained:
    """What the stage produced for one model."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def explain_model(mut: ModelUnderTest, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor,
                  adversarial: dict[str, tuple[torch.Tensor, torch.Tensor]], stages: Sequence[str], *,
                  background: torch.Tensor, seed: int, batch_size: int | None, differentiable: bool,
                  say: Progress) -> Explained:
    """Run the chosen stages on one model. x, y, ids: the attacked samples; adversarial: key -> (x_adv, pred)."""
    from robustlab.explain import probe_report, saliency_report, shap_report
    from robustlab.explain.sanity import cascading_randomization
    from robustlab.explain.shap_values import background_from

    out = Explained(info={"stages": list(stages), "seconds": {}, "samples": {}, "keys": list(adversarial),
                          "skipped": {}, "flags": []})
    if len(x) == 0:
        out.info["skipped"] = {s: "no correctly classified samples to explain" for s in stages}
        return out
    k = min(N_EXPLAIN, len(x))
    head = {key: (xa[:k], pred[:k]) for key, (xa, pred) in adversarial.items()}
    for stage in bars.steps(stages, f"{mut.name}: explanations", unit="stage"):
        if stage in ("saliency", "shap") and not differentiable:
            out.info["skipped"][stage] = ("the model has no gradient (it is attacked by transfer); gradient "
                                          "explanations of its surrogate would not describe it")
            continue
        started = time.perf_counter()
        if stage == "saliency":
            report = saliency_report(mut, x[:k], y[:k], head, sample_ids=ids[:k], seed=seed, batch_size=batch_size)
            m = min(N_SANITY, k)
            sanity = cascading_randomization(mut, x[:m], y[:m], sample_ids=ids[:m], seed=seed, batch_size=batch_size)
            _put(out, "explain_saliency", report.per_sample)
            _put(out, "explain_saliency_summary", report.summary)
            _put(out, "explain_sanity", sanity)
            out.info["flags"] += report.flags
            out.info["method"] = report.method
            out.info["sanity_verdicts"] = dict(sanity.attrs.get("verdicts", {}))
            for key, maps in report.maps.items():
                out.arrays[f"saliency|{key}"] = maps
            out.info["samples"]["saliency"] = int(k)
        elif stage == "shap":
            bg = background_from(background, min(N_BACKGROUND, len(background)), seed=seed)
            shapley = shap_report(mut, x[:k], y[:k], head, background=bg, seed=seed, sample_ids=ids[:k])
            _put(out, "explain_shap_features", shapley.per_feature)
            _put(out, "explain_shap_shift", shapley.shift)
            _put(out, "explain_shap_samples", shapley.per_sample)
            out.info["shap_explainer"] = shapley.explainer
            if shapley.fallback:
                out.info["shap_fallback"] = shapley.fallback
            for key, maps in shapley.maps.items():
                out.arrays[f"shap|{key}"] = np.asarray(maps, dtype=np.float32)
            out.info["samples"]["shap"] = int(k)
        else:
            m = min(N_PROBE, len(x), max(20, PROBE_VALUES // max(1, x[0].numel())))
            if m < 20:
                out.info["skipped"][stage] = f"only {m} attacked samples; probes need at least 20"
                continue
            probes = probe_report(mut, x[:m], y[:m], {key: (xa[:m], p[:m]) for key, (xa, p) in adversarial.items()},
                                  seed=seed, batch_size=batch_size)
            _put(out, "explain_probe_layers", probes.layers)
            _put(out, "explain_probe_adversarial", probes.adversarial)
            _put(out, "explain_probe_crossing", probes.crossing)
            out.info["samples"]["probes"] = int(m)
            if probes.note:  # layers the model's format hides (an opaque TorchScript module, say)
                out.info.setdefault("notes", {})["probes"] = probes.note
        seconds = time.perf_counter() - started
        out.info["seconds"][stage] = round(seconds, 3)
        say(f"{mut.name}: {stage} explanations done in {seconds:.1f}s")
    return out


def _put(out: Explained, name: str, frame: pd.DataFrame | None) -> None:
    if frame is None or not isinstance(frame, pd.DataFrame):
        return
    frame = frame.copy()
    frame.attrs = {}
    out.tables[name] = frame


def merge(per_model: dict[str, Explained]) -> tuple[dict[str, pd.DataFrame], dict[str, np.ndarray], dict]:
    """Tables with a leading `model` column, arrays keyed `explain|KIND|MODEL|KEY`, and metadata."""
    tables: dict[str, pd.DataFrame] = {}
    for name in TABLES:
        frames = [t.tables[name].assign(model=model) for model, t in per_model.items() if name in t.tables]
        if frames:
            frame = pd.concat(frames, ignore_index=True)
            tables[name] = frame[["model"] + [c for c in frame.columns if c != "model"]]
    arrays = {}
    for model, t in per_model.items():
        for key, value in t.arrays.items():
            kind, rest = key.split("|", 1)
            arrays[f"explain|{kind}|{model}|{rest}"] = value
    info = {model: _jsonable(t.info) for model, t in per_model.items()}
    return tables, arrays, info


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


__all__ = ["STAGES", "Explained", "explain_model", "merge", "parse_stages"]
