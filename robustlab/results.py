"""Audit results: tidy frames plus run metadata, saved as results.json + samples.csv.

This module imports pandas and the standard library only, never torch: reports and CI
comparisons read saved results without a model or a re-run.

Contract (documented in README.md):
- results.json: {"schema", "metadata": {...}, "summary": [one record per (model, attack, norm,
  eps, targeted)]}; NaN is written as null. metadata["evaluation"] and metadata["requirements"]
  hold the verdicts (robustlab.verdicts); files of schema /1 are upgraded when loaded.
- samples.csv: one row per (model, sample, attack, eps, target).
- examples.npz: a few clean and adversarial inputs for reports (see `example_key`), and the maps
  of the explanation stage (`explain|KIND|MODEL|KEY`).
- NAME.csv for each extra table (the explanation stage's frames, e.g. explain_saliency.csv),
  listed in metadata["tables"].
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustlab.errors import InputError

SCHEMA = "robustlab.results/2"
SCHEMAS_READ = ("robustlab.results/1", SCHEMA)  # /1 (no evaluation status, verdict "robust") is upgraded on load
WORST_CASE = "worst-case"
CERTIFIED = "certified:"  # prefix of the certificate rows (robustlab.certify): "certified:crown", ...


def is_certified(attack: Any) -> bool:
    """A certificate row ("certified:ibp", "certified:crown", "certified:smoothing(sigma=0.25)"): a lower
    bound in `certified_accuracy`, never an attack (it joins no worst case; its robust_accuracy is NaN)."""
    return isinstance(attack, str) and attack.startswith(CERTIFIED)


def certified_label(method: str, sigma: float | None = None) -> str:
    return f"{CERTIFIED}{method}" + (f"(sigma={sigma:g})" if method == "smoothing" else "")

SUMMARY_COLUMNS = ["model", "attack", "norm", "eps", "targeted", "n", "clean_accuracy", "robust_accuracy",
                   "certified_accuracy", "success_rate", "n_attacked", "median_l2", "median_linf", "gradient_calls",
                   "seconds"]
SAMPLE_COLUMNS = ["model", "sample", "attack", "norm", "eps", "targeted", "target", "label", "clean_pred",
                  "adv_pred", "adv_confidence", "clean_correct", "attacked", "success", "robust", "l2", "linf"]
_SAMPLE_DTYPES = {"model": "string", "sample": "int64", "attack": "string", "norm": "string", "eps": "float64",
                  "targeted": "string", "target": "Int64", "label": "int64", "clean_pred": "int64",
                  "adv_pred": "int64", "adv_confidence": "float64", "clean_correct": "bool", "attacked": "bool",
                  "success": "bool", "robust": "bool", "l2": "float64", "linf": "float64"}


@dataclass
class AuditResult:
    """What an audit found. `summary` and `samples` are pandas DataFrames; `metadata` a dict."""

    summary: pd.DataFrame
    samples: pd.DataFrame
    metadata: dict[str, Any] = field(default_factory=dict)
    examples: dict[str, np.ndarray] = field(default_factory=dict)  # see `example_key`; saved as examples.npz
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # extra tidy frames, saved as NAME.csv

    # ---------------------------------------------------------------- queries
    def robust_accuracy(self, *, attack: str = WORST_CASE, eps: float | None = None, model: str | None = None,
                        targeted: str = "none") -> float:
        """One figure from the summary; raises if the selection is empty or ambiguous."""
        rows = self.summary[(self.summary["attack"] == attack) & (self.summary["targeted"] == targeted)]
        if model is not None:
            rows = rows[rows["model"] == model]
        if eps is not None:
            rows = rows[(rows["eps"] - eps).abs() <= 1e-12 * max(1.0, abs(eps))]
        if len(rows) != 1:
            raise KeyError(f"{len(rows)} summary rows match attack={attack!r}, eps={eps!r}, model={model!r}, "
                           f"targeted={targeted!r}; name them more precisely")
        return float(rows["robust_accuracy"].iloc[0])

    def table(self) -> str:
        """Robust accuracy per model, targeted mode and attack (rows) and eps (columns), as text."""
        return format_table(self.summary)

    def __repr__(self) -> str:
        models = ", ".join(sorted(self.summary["model"].unique())) if len(self.summary) else "-"
        return f"AuditResult(models: {models}; {len(self.summary)} summary rows, {len(self.samples)} sample rows)\n{self.table()}"

    def _repr_html_(self) -> str:
        return self.summary.to_html(index=False, float_format=lambda v: f"{v:.4g}")

    # ---------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write results.json and samples.csv into `directory`, atomically (all or nothing)."""
        target = Path(directory)
        check_output_dir(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            metadata = dict(self.metadata, tables=sorted(self.tables)) if self.tables else self.metadata
            document = {"schema": SCHEMA, "metadata": metadata,
                        "summary": _records(self.summary.reindex(
                            columns=SUMMARY_COLUMNS + _extra(self.summary, SUMMARY_COLUMNS)))}
            (staging / "results.json").write_text(json.dumps(_clean(document), indent=2, allow_nan=False) + "\n")
            self.samples.to_csv(staging / "samples.csv", index=False, float_format="%.9g")
            if self.examples:
                np.savez_compressed(staging / "examples.npz", **self.examples)
            for name, frame in self.tables.items():
                _check_table_name(name)
                frame.to_csv(staging / f"{name}.csv", index=False, float_format="%.9g")
            if not target.exists():
                os.replace(staging, target)
            else:
                for item in staging.iterdir():
                    os.replace(item, target / item.name)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return target


def check_output_dir(directory: str | os.PathLike) -> None:
    """Refuse to write into a file, or into a non-empty directory that holds no robustlab results."""
    path = Path(directory)
    if path.exists():
        if not path.is_dir():
            raise InputError("out", f"{path} exists and is not a directory")
        if any(path.iterdir()) and not (path / "results.json").exists():
            raise InputError("out", f"{path} is not empty and holds no robustlab results; choose a new directory")
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise InputError("out", f"cannot write under {parent}")


def load(directory: str | os.PathLike) -> AuditResult:
    """Read a results directory written by `AuditResult.save`."""
    path = Path(directory)
    results, samples = path / "results.json", path / "samples.csv"
    if not results.exists():
        raise InputError("results", f"{path} has no results.json (not a robustlab results directory)")
    try:
        document = json.loads(results.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError("results", f"cannot read {results}: {error}") from None
    if document.get("schema") not in SCHEMAS_READ:
        raise InputError("results", f"{results} has schema {document.get('schema')!r}; expected {SCHEMA!r}")
    summary = pd.DataFrame.from_records(document["summary"])
    if len(summary):
        summary["eps"] = summary["eps"].astype("float64")
        # files written before certificates (robustlab.certify) have no certified_accuracy: NaN
        summary["certified_accuracy"] = summary.get("certified_accuracy", pd.Series(np.nan, index=summary.index)) \
            .astype("float64")
    frame = pd.read_csv(samples, dtype={k: v for k, v in _SAMPLE_DTYPES.items() if v != "bool"}) \
        if samples.exists() else pd.DataFrame(columns=SAMPLE_COLUMNS)
    for column, dtype in _SAMPLE_DTYPES.items():
        if dtype == "bool" and column in frame:
            frame[column] = frame[column].astype(bool)
    examples: dict[str, np.ndarray] = {}
    if (path / "examples.npz").exists():
        with np.load(path / "examples.npz", allow_pickle=False) as arrays:
            examples = {key: arrays[key] for key in arrays.files}
    metadata = document.get("metadata", {})
    if document["schema"] != SCHEMA:
        from robustlab.verdicts import upgrade_metadata

        metadata = upgrade_metadata(metadata, summary)
    tables = {}
    for name in metadata.get("tables", []) or []:
        _check_table_name(name)
        if (path / f"{name}.csv").exists():
            tables[name] = pd.read_csv(path / f"{name}.csv")
    return AuditResult(summary=summary, samples=frame, metadata=metadata, examples=examples, tables=tables)


def _check_table_name(name: str) -> None:
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum() or name == "samples":
        raise InputError("tables", f"table names are letters, digits, '_' and '-'; got {name!r}")


def example_key(model: str, attack: str, eps: float | None, targeted: str) -> str:
    """Key of one attack's adversarial examples in examples.npz.

    examples.npz holds, per model, `sample|MODEL` (sample ids) and `clean|MODEL` (their clean inputs),
    and per (model, attack, eps, targeted mode) `adv|MODEL|ATTACK|EPS|MODE` (the adversarial inputs of
    the same samples, first target; EPS is `none` for an unbounded run). Predictions and confidences
    for them are in samples.csv.
    """
    return f"adv|{model}|{attack}|{'none' if eps is None else repr(float(eps))}|{targeted}"


def sample_frame(rows: dict[str, list]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=SAMPLE_COLUMNS)
    return frame.astype(_SAMPLE_DTYPES)


# ---------------------------------------------------------------------------- formatting
def format_table(summary: pd.DataFrame) -> str:
    if summary.empty:
        return "(no results)"
    lines = []
    for (model, targeted), block in summary.groupby(["model", "targeted"], sort=False):
        clean = float(block["clean_accuracy"].iloc[0])
        mode = "untargeted" if targeted == "none" else f"targeted: {targeted}"
        norm = ", ".join(dict.fromkeys(block.loc[block["eps"].notna(), "norm"])) or "-"
        lines.append(f"{model}  ({norm}, {mode}; clean accuracy {clean:.1%}, n={int(block['n'].iloc[0])})")
        bounded = block[block["eps"].notna()]
        eps_values = sorted(bounded["eps"].unique())
        attacks = list(dict.fromkeys(bounded["attack"]))
        certified = [a for a in attacks if is_certified(a)]
        attacks = [a for a in attacks if a != WORST_CASE and not is_certified(a)] + \
            ([WORST_CASE] if WORST_CASE in attacks else []) + certified
        width = max([16] + [len(a) + 1 for a in attacks])
        labels = ["eps=" + eps_text(e) for e in eps_values]
        cell = max([11] + [len(label) + 2 for label in labels])  # columns never run together
        header = f"  {'robust accuracy':<{width}}" + "".join(f"{label:>{cell}}" for label in labels)
        lines.append(header)
        for attack in attacks:
            column = "certified_accuracy" if is_certified(attack) else "robust_accuracy"
            cells = []
            for e in eps_values:
                hit = bounded[(bounded["attack"] == attack) & (bounded["eps"] == e)]
                value = float(hit[column].iloc[0]) if len(hit) and column in hit else float("nan")
                cells.append(f"{value:>{cell}.1%}" if math.isfinite(value) else f"{'-':>{cell}}")
            lines.append(f"  {attack:<{width}}" + "".join(cells))
        if certified:
            lines.append(f"  ({', '.join(certified)}: certified accuracy, a lower bound of the attacks' robust "
                         "accuracy; smoothing's is the smoothed classifier's)")
        for _, row in block[block["eps"].isna()].iterrows():
            lines.append(f"  {row['attack']} without a budget: success {row['success_rate']:.1%}, "
                         f"median L2 {row['median_l2']:.3g}, median Linf {row['median_linf']:.3g}")
        lines.append("")
    return "\n".join(lines).rstrip()


def eps_text(eps: float) -> str:
    """eps as people write it: 0.1 stays 0.1, 8/255 is shown as 8/255 (not 0.0313725)."""
    plain = format(eps, "g")
    if len(plain) <= 6:
        return plain
    for denominator in (255, 256, 100, 1000):
        k = round(eps * denominator)
        if k and abs(eps - k / denominator) <= 1e-9 * max(1.0, abs(eps)):
            return f"{k}/{denominator}"
    return plain


def _extra(frame: pd.DataFrame, known: list[str]) -> list[str]:
    return [c for c in frame.columns if c not in known]


def _records(frame: pd.DataFrame) -> list[dict]:
    return [{k: _py(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def _py(value: Any) -> Any:
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return _py(obj)
