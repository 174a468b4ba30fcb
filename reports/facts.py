"""Figures derived from saved results, shared by every output format (HTML, markdown, comparisons).

Everything here reads an `AuditResult` (summary, samples, metadata) and returns plain Python or
pandas values; nothing renders. Imports: pandas, numpy and robustlab's results types and verdict
vocabulary (robustlab.results, robustlab.verdicts) only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Hashable, cast

import numpy as np
import pandas as pd

from robustlab import verdicts as V
from robustlab.results import WORST_CASE, AuditResult, is_certified

UNTARGETED = "none"


@dataclass
class ThreatModel:
    """One verdict card: a model under one norm and one targeted mode, with a verdict per eps."""

    model: str
    norm: str
    targeted: str
    n: int
    clean: float
    worst: dict[float, float]            # eps -> worst-case robust accuracy over attacks
    attacks: list[str]                   # attacks that ran with a budget
    requirements: list[dict] = field(default_factory=list)     # judgements on this card (robustlab.verdicts)
    evaluations: dict[float, dict] = field(default_factory=dict)  # eps -> evaluation record (figure, status)
    checks: list[dict] = field(default_factory=list)           # integrity checks that bear on this threat model
    checks_level: str | None = None                            # None / "none": the checks were not run

    @property
    def checked(self) -> bool:
        return self.checks_level not in (None, "none")

    @property
    def mode_label(self) -> str:
        return mode_label(self.targeted)

    @property
    def outcome(self) -> str:
        """The card's requirement outcome: 'does not meet' or 'cannot be judged' if any requirement
        was not met, 'meets' if all were, else 'no requirement set'."""
        outcomes = [str(r.get("outcome")) for r in self.requirements]
        for worst in (V.DOES_NOT_MEET, V.CANNOT_JUDGE, V.MEETS):
            if worst in outcomes:
                return worst
        return V.NO_REQUIREMENT

    def at(self, eps: float) -> list[dict]:
        """The robust-accuracy judgements at one eps."""
        return [r for r in self.requirements if r.get("metric") == "robust_accuracy" and V.same_eps(r.get("eps"), eps)]

    @property
    def headline(self) -> float | None:
        """The eps the card leads with: that of the first requirement with the card's outcome (so the
        badge and the headline agree), else the largest audited."""
        ranked = sorted(self.requirements, key=lambda r: r.get("outcome") != self.outcome)  # stable
        for r in ranked:
            if r.get("metric") == "robust_accuracy" and is_num(r.get("eps")):
                found = [e for e in self.evaluations if V.same_eps(e, r["eps"])]
                if found:
                    return found[0]
        return max(self.evaluations) if self.evaluations else (max(self.worst) if self.worst else None)


def mode_label(targeted: Hashable) -> str:
    return "untargeted" if targeted == UNTARGETED else f"targeted ({targeted})"


def is_num(value: Any) -> bool:
    try:
        return value is not None and not pd.isna(value) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def bounded(summary: pd.DataFrame) -> pd.DataFrame:
    return summary[summary["eps"].notna()] if len(summary) else summary


def attack_order(attacks) -> list[str]:
    """The attacks of a block, worst case last; certificate rows (`certified_order`) are not attacks."""
    seen = [a for a in dict.fromkeys(attacks) if not is_certified(a)]
    return [a for a in seen if a != WORST_CASE] + ([WORST_CASE] if WORST_CASE in seen else [])


def certified_order(attacks) -> list[str]:
    """The certificate rows of a block ("certified:crown", ...), in order."""
    return [a for a in dict.fromkeys(attacks) if is_certified(a)]


def certified(block: pd.DataFrame) -> dict[float, tuple[str, float]]:
    """eps -> (method, certified accuracy) on the worst-case rows of one (model, targeted) block: the lower
    end of the bracket [certified, robust] (IBP/CROWN; smoothing certifies another classifier)."""
    if "certified_accuracy" not in block or not len(block):
        return {}
    rows = bounded(block)
    worst = rows[(rows["attack"] == WORST_CASE) & rows["certified_accuracy"].notna()]
    methods = [a.split(":", 1)[1] for a in certified_order(rows["attack"]) if "smoothing" not in a]
    method = methods[0] if methods else "certified"
    return {float(e): (method, float(v)) for e, v in zip(worst["eps"], worst["certified_accuracy"])}


def eps_values(summary: pd.DataFrame) -> list[float]:
    rows = bounded(summary)
    return sorted(float(e) for e in rows["eps"].unique()) if len(rows) else []


def worst_case(block: pd.DataFrame) -> dict[float, float]:
    """eps -> worst-case robust accuracy of one (model, targeted) block.

    The audit writes a `worst-case` row when two or more attacks ran at an eps; with a single
    attack that attack's row is the worst case.
    """
    out: dict[float, float] = {}
    rows = bounded(block)
    for eps, at_eps in rows.groupby("eps", sort=True):
        worst = at_eps[at_eps["attack"] == WORST_CASE]
        use = worst if len(worst) else at_eps
        out[float(cast(float, eps))] = float(use["robust_accuracy"].min())  # a groupby key: typed as any scalar
    return out


def requirements(metadata: dict) -> list[dict]:
    """Requirement judgements recorded in metadata["requirements"] (by the CLI or a CI gate), if any."""
    return V.judgements(metadata)


def checks_level(metadata: dict) -> str | None:
    """The integrity-check level of the run ("default", "strict", "none"), or None (results predating them)."""
    node = metadata.get("checks")
    return str(node.get("level")) if isinstance(node, dict) and node.get("level") else None


def check_results(metadata: dict) -> list[dict]:
    node = metadata.get("checks")
    results = node.get("results") if isinstance(node, dict) else None
    return [c for c in results if isinstance(c, dict)] if isinstance(results, list) else []


def adaptive_runs(metadata: dict) -> list[dict]:
    node = metadata.get("checks")
    runs = node.get("adaptive") if isinstance(node, dict) else None
    return [a for a in runs if isinstance(a, dict)] if isinstance(runs, list) else []


def evaluation_records(result: AuditResult) -> list[dict]:
    """Per (model, norm, eps, targeted): the figure with its interval and the evaluation status."""
    return V.records(result.metadata, result.summary)


def evidence_text(evidence: Any, limit: int = 8) -> str:
    """Scalar evidence as `key=value` (nested values are left to results.json)."""
    if not isinstance(evidence, dict):
        return ""
    items = []
    for key, value in evidence.items():
        if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
            items.append(f"{key}={value}")
        elif isinstance(value, float):
            items.append(f"{key}={value:.4g}")
        if len(items) >= limit:
            break
    return ", ".join(items)


def _bears_on(check: dict, model: str, norm: str, targeted: str) -> bool:
    return (str(check.get("model")) == model and check.get("targeted") in (None, targeted)
            and (check.get("norm") is None or str(check.get("norm")) in norm.split(", ")))


def threat_models(result: AuditResult) -> list[ThreatModel]:
    summary = result.summary
    if summary.empty:
        return []
    level = checks_level(result.metadata)
    all_checks = check_results(result.metadata)
    evaluations = evaluation_records(result)
    judged = requirements(result.metadata)
    out = []
    for (model, targeted), block in summary.groupby(["model", "targeted"], sort=False):
        rows = bounded(block)
        norms = list(dict.fromkeys(rows["norm"])) or list(dict.fromkeys(block["norm"]))
        # this card's judgements: its mode's figures, the model's clean accuracy, and requirements with no row
        mine = [j for j in judged if j.get("model") in (None, model) and j.get("targeted") in (None, targeted)]
        out.append(ThreatModel(
            model=str(model), norm=", ".join(map(str, norms)), targeted=str(targeted), n=int(block["n"].iloc[0]),
            clean=float(block["clean_accuracy"].iloc[0]), worst=worst_case(block),
            attacks=[a for a in attack_order(rows["attack"]) if a != WORST_CASE], requirements=mine,
            evaluations={float(v["eps"]): v for v in evaluations
                         if v.get("model") == model and v.get("targeted") == targeted and is_num(v.get("eps"))},
            checks=[c for c in all_checks if _bears_on(c, str(model), ", ".join(map(str, norms)), str(targeted))],
            checks_level=level))
    return out


def models(result: AuditResult) -> list[str]:
    names = list(dict.fromkeys(result.summary["model"])) if len(result.summary) else []
    for name in (result.metadata.get("models") or {}):
        if name not in names:
            names.append(name)
    return names


def class_names(result: AuditResult, model: str) -> list[str]:
    info = (result.metadata.get("models") or {}).get(model) or {}
    names = info.get("classes")
    count = info.get("num_classes")
    if not names:
        labels = result.samples["label"] if len(result.samples) else pd.Series([], dtype="int64")
        count = count or (int(labels.max()) + 1 if len(labels) else 0)
        names = [str(i) for i in range(int(count))]
    return [str(n) for n in names]


def input_shape(result: AuditResult, model: Hashable) -> tuple[int, ...]:
    info = (result.metadata.get("models") or {}).get(model) or {}
    shape = info.get("input_shape") or ((result.metadata.get("data") or {}).get("input_shape")) or []
    return tuple(int(d) for d in shape)


def feature_names(result: AuditResult, model: Hashable) -> list[str]:
    """Names of a 1-D input's features: the data's (metadata["data"]["features"]), else x[0], x[1], ..."""
    names = (result.metadata.get("data") or {}).get("features")
    shape = input_shape(result, model)
    count = shape[0] if len(shape) == 1 else 0
    if isinstance(names, list) and names and (not count or len(names) == count):
        return [str(n) for n in names]
    return [f"x[{i}]" for i in range(count)]


def feature_label(result: AuditResult, model: Hashable, feature: Any, grid: tuple[int, ...] | None = None) -> str:
    """A SHAP feature as a reader knows it: its name (tabular), or pixel (row, col) of an image; for SHAP
    grids pooled from a larger image, the cell's pixel range. `grid`: the SHAP map's (rows, cols)."""
    if isinstance(feature, str) and not feature.lstrip("-").isdigit():
        try:
            float(feature)
        except ValueError:
            return feature  # already a name
    try:
        index = int(float(feature))
    except (TypeError, ValueError):
        return str(feature)
    shape = input_shape(result, model)
    if len(shape) == 1:
        names = feature_names(result, model)
        return names[index] if 0 <= index < len(names) else f"x[{index}]"
    image = shape[-2:] if len(shape) in (2, 3) else ()
    if not image:
        return f"x[{index}]"
    if grid and len(grid) == 1 and grid[0] != image[0] * image[1]:
        return f"pixel group {index}"  # a large 2-D input's SHAP summed over flat groups
    rows, cols = grid if grid and len(grid) == 2 else image
    if rows * cols == 0 or not 0 <= index < rows * cols:
        return f"x[{index}]"
    r, c = divmod(index, cols)
    if (rows, cols) == tuple(image):
        return f"pixel ({r}, {c})"
    factor = next((f for f in range(1, max(image) + 1)
                   if -(-image[0] // f) == rows and -(-image[1] // f) == cols), None)
    if factor is None:
        return f"cell ({r}, {c})"
    return (f"pixels ({r * factor}–{min(image[0], (r + 1) * factor) - 1}, "
            f"{c * factor}–{min(image[1], (c + 1) * factor) - 1})")


def minimal_rows(result: AuditResult) -> pd.DataFrame:
    """Sample rows of unbounded (minimal-perturbation) runs: eps is NaN."""
    s = result.samples
    return s[s["eps"].isna()] if len(s) else s


def targeted_rows(result: AuditResult) -> pd.DataFrame:
    s = result.samples
    return s[(s["targeted"] != UNTARGETED) & s["eps"].notna()] if len(s) else s


def per_class(result: AuditResult, model: str, targeted: str) -> pd.DataFrame:
    """Per true class: n, clean accuracy and worst-case robust accuracy at each eps.

    A sample is robust at an eps when it stayed correct under every attack and every target.
    """
    s = result.samples
    rows = s[(s["model"] == model) & (s["targeted"] == targeted) & s["eps"].notna()]
    rows = rows[~rows["attack"].map(is_certified)]  # certificates are lower bounds, not attacks
    if rows.empty:
        return pd.DataFrame()
    per_sample = rows.groupby(["eps", "sample"]).agg(robust=("robust", "all"), label=("label", "first"),
                                                     clean=("clean_correct", "first")).reset_index()
    first_eps = per_sample["eps"].min()
    base = per_sample[per_sample["eps"] == first_eps].groupby("label").agg(n=("sample", "size"),
                                                                          clean=("clean", "mean"))
    table = per_sample.pivot_table(index="label", columns="eps", values="robust", aggfunc="mean")
    table.columns = [float(c) for c in table.columns]
    return base.join(table)


def success_matrix(result: AuditResult, model: str, targeted: str, eps: float, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(rate, count): targeted success over any attack, true class x target class, at one eps."""
    rows = targeted_rows(result)
    rows = rows[(rows["model"] == model) & (rows["targeted"] == targeted) & rows["attacked"]
                & ((rows["eps"] - eps).abs() <= 1e-12)]
    rate = np.full((num_classes, num_classes), np.nan)
    count = np.zeros((num_classes, num_classes), dtype=int)
    if rows.empty:
        return rate, count
    pairs = rows.groupby(["sample", "target"]).agg(success=("success", "any"), label=("label", "first")).reset_index()
    grouped = pairs.groupby(["label", "target"])["success"].agg(["mean", "size"]).reset_index()
    for _, r in grouped.iterrows():
        i, j = int(r["label"]), int(r["target"])
        if 0 <= i < num_classes and 0 <= j < num_classes:
            rate[i, j], count[i, j] = float(r["mean"]), int(r["size"])
    return rate, count


def interval_text(record: dict | None) -> str:
    """'95% CI 46.3–55.5%, n=450' (empty without an interval)."""
    if not record or not record.get("interval"):
        return ""
    low, high = record["interval"]
    return f"{V.CONFIDENCE:.0%} CI {float(low) * 100:.1f}–{float(high) * 100:.1f}%, n={record.get('n')}"


def pct(value: Any, digits: int = 1) -> str:
    return f"{float(value) * 100:.{digits}f}%" if is_num(value) else "–"


def num(value: Any, spec: str = ".3g") -> str:
    return format(float(value), spec) if is_num(value) else "–"


def eps_label(eps: Any) -> str:
    return "no budget" if not is_num(eps) else f"{float(eps):g}"
