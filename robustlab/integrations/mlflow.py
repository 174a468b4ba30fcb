"""Send an audit to MLflow: configuration as params, figures as metrics, verdicts as tags, files as artifacts.

    from robustlab.integrations.mlflow import log_result
    run_id = log_result(result)                      # the active tracking URI and experiment "robustlab"
    run_id = log_result("audit/", tracking_uri="http://127.0.0.1:5000", experiment="release-7")

Names are stable so that runs compare across audits in MLflow's UI:
- metrics `METRIC/MODEL/ATTACK/NORM/eps_EPS/TARGETED` for every summary record and every metric in
  METRICS that is not NaN (e.g. `robust_accuracy/digits-cnn/worst-case/linf/eps_0.1/none`);
- tags `evaluation/MODEL/NORM/eps_EPS/TARGETED` (the evaluation status, robustlab.verdicts) and
  `requirement/METRIC/MODEL/NORM/eps_EPS/TARGETED` (meets / does not meet / cannot be judged);
- params: the audit's configuration (`config.*`), seed, device and each model's sha256;
- artifacts: results.json, samples.csv, summary.md and report.html (rendered from the saved files,
  as `robustlab report` does) under `robustlab/`.
MLflow is an optional extra (`pip install 'robustlab[mlflow]'`); it is imported only here.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Hashable, Mapping

from robustlab import verdicts
from robustlab.errors import InputError
from robustlab.results import SCHEMA, AuditResult, load

METRICS = ("clean_accuracy", "robust_accuracy", "certified_accuracy", "success_rate", "median_l2", "median_linf",
           "seconds")
ARTIFACTS = ("results.json", "samples.csv", "summary.md", "report.html")
PARAM_LIMIT = 6000  # MLflow refuses longer parameter values
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /:]")  # characters MLflow accepts in metric, param and tag names


def log_result(result: AuditResult | str | os.PathLike, *, tracking_uri: str | None = None,
               experiment: str = "robustlab", run_name: str | None = None) -> str:
    """Log one audit as one MLflow run; return the run id.

    result: an AuditResult (saved to a temporary directory for the artifacts) or a results
    directory written by `robustlab audit --out` / `AuditResult.save`.
    """
    client = _mlflow()
    if isinstance(result, AuditResult):
        with tempfile.TemporaryDirectory(prefix="robustlab-mlflow-") as tmp:
            result.save(tmp)
            return _log(client, result, Path(tmp), tracking_uri, experiment, run_name)
    directory = Path(result)
    return _log(client, load(directory), directory, tracking_uri, experiment, run_name)


def metric_name(metric: str, row: Mapping[Hashable, Any]) -> str:
    """`METRIC/MODEL/ATTACK/NORM/eps_EPS/TARGETED`, with characters MLflow refuses replaced by '_'."""
    return _safe("/".join([metric, str(row.get("model")), str(row.get("attack")), str(row.get("norm")),
                           f"eps_{_eps(row.get('eps'))}", str(row.get("targeted", "none"))]))


def params(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Flat parameters of an audit: its configuration, seed, device and the models' hashes."""
    out: dict[str, str] = {}
    for key, value in sorted((metadata.get("config") or {}).items()):
        out[_safe(f"config.{key}")] = _param_value(value)
    for key in ("seed", "device", "robustlab"):
        if metadata.get(key) is not None:
            out[key] = _param_value(metadata[key])
    models = metadata.get("models") or {}
    for name, model in (models.items() if isinstance(models, Mapping) else enumerate(models)):
        if isinstance(model, Mapping) and model.get("sha256"):
            out[_safe(f"model.{model.get('name', name)}.sha256")] = str(model["sha256"])
    return out


def metrics(result: AuditResult) -> dict[str, float]:
    out: dict[str, float] = {}
    for row in result.summary.to_dict("records"):
        for metric in METRICS:
            value = row.get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[metric_name(metric, row)] = float(value)
    return out


def tags(result: AuditResult) -> dict[str, str]:
    """The evaluation status per threat model and the outcome of every requirement."""
    out = {"robustlab.schema": SCHEMA}
    for record in verdicts.records(result.metadata, result.summary):
        key = "/".join(["evaluation", str(record.get("model")), str(record.get("norm")),
                        f"eps_{_eps(record.get('eps'))}", str(record.get("targeted", "none"))])
        out[_safe(key)] = str(record.get("status"))
    for judged in verdicts.judgements(result.metadata):
        key = "/".join(["requirement", str(judged.get("metric")), str(judged.get("model")), str(judged.get("norm")),
                        f"eps_{_eps(judged.get('eps'))}", str(judged.get("targeted", "none"))])
        out[_safe(key)] = str(judged.get("outcome"))
    return out


# ---------------------------------------------------------------------------- internals
def _log(mlflow: Any, result: AuditResult, directory: Path, tracking_uri: str | None, experiment: str,
         run_name: str | None) -> str:
    _render(directory)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name or _default_run_name(result)) as run:
        mlflow.log_params(params(result.metadata))
        mlflow.log_metrics(metrics(result))
        mlflow.set_tags(tags(result))
        for name in ARTIFACTS:
            if (directory / name).is_file():
                mlflow.log_artifact(str(directory / name), artifact_path="robustlab")
        return str(run.info.run_id)


def _render(directory: Path) -> None:
    """report.html and summary.md from the saved files, if they are not there yet."""
    if (directory / "report.html").is_file() and (directory / "summary.md").is_file():
        return
    from robustlab.reports import render, write_summary

    render(directory)
    write_summary(directory)


def require_mlflow() -> None:
    """Raise InputError (how to install it) unless mlflow imports: call before work starts."""
    _mlflow()


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise InputError("mlflow", "is not installed; install it with: pip install 'robustlab[mlflow]'") from None
    return mlflow


def _default_run_name(result: AuditResult) -> str:
    models = sorted({str(m) for m in result.summary.get("model", [])})
    return "robustlab audit: " + (", ".join(models) or "no models")


def _eps(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "none"
    return f"{float(value):g}"


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name)


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= PARAM_LIMIT else text[:PARAM_LIMIT - 3] + "..."
