"""What the plugin records of a gate: one plain record per gated row (session.json, the tables) and
the test's JUnit properties. Records hold plain numbers and strings only, so xdist workers can hand
them to the controller as JSON.
"""

from __future__ import annotations

import math
from typing import Any, Callable


def row_key(row: dict) -> tuple:
    """(model, attack, norm, eps, targeted) of a summary row, a check or a record."""
    eps = num(row.get("eps"))
    return (str(row.get("model")), str(row.get("attack")), str(row.get("norm")), eps, str(row.get("targeted")))


def gate_records(nodeid: str, checks: list, gated: Any, where: str | None,
                 found: Callable[[str, str, Any, str], str | None], start: int, before: dict) -> list:
    """One record per (model, attack, norm, eps, targeted) row that was gated or failed a check.

    `gated`: the summary rows the gate looked at (a DataFrame) or None.
    `before`: this test's baseline robust accuracy per row key (shown even without --robustlab-compare-fail).
    `found(model, norm, eps, targeted)`: the evaluation status of that threat model, or None.
    """
    rows: dict[tuple, dict] = {}

    def record(key: tuple, clean: Any, robust: Any, n: Any) -> dict:
        model, attack, norm, eps, targeted = key
        if key not in rows:
            rows[key] = {"test": nodeid, "order": start + len(rows), "model": model, "attack": attack, "norm": norm,
                         "eps": eps, "targeted": targeted, "n": n, "clean_accuracy": num(clean),
                         "robust_accuracy": num(robust), "interval": interval(robust, n),
                         "evaluation": found(model, norm, eps, targeted) or "not evaluated",
                         "required": None, "required_clean": None, "outcome": None,
                         "baseline": num(before.get(key)), "passed": True, "checks": [],
                         "failures": [], "results_dir": where,
                         "certified_accuracy": None, "basis": None}
        return rows[key]

    if gated is not None:
        for _, row in gated.iterrows():
            key = row_key(row.to_dict())
            entry = record(key, row["clean_accuracy"], row["robust_accuracy"], int(row["n"]))
            if num(row.get("certified_accuracy")) is not None:  # the bracket's lower end, where certified
                entry["certified_accuracy"] = num(row.get("certified_accuracy"))
    for check in checks:
        key = row_key(check.to_dict())
        if check.kind == "regression" and key not in rows and check.passed:
            continue  # regression checks on rows no gate looks at are shown only when they fail
        if check.kind == "min_certified_accuracy" and not key[1].startswith("certified"):
            key = (key[0], "certified", *key[2:])  # no certificate row (model skipped): a row of its own
        entry = record(key, check.clean_accuracy,
                       check.measured if check.metric == "robust_accuracy" else None, check.n)
        if check.kind == "min_accuracy":
            entry["required"] = check.required
            entry["outcome"] = check.outcome
            if getattr(check, "proven", False):  # the certified lower bound itself met it
                entry["basis"] = check.basis
        elif check.kind == "min_certified_accuracy":  # a certificate row (attack "certified:METHOD")
            entry["required"] = check.required
            entry["outcome"] = check.outcome
            entry["certified_accuracy"] = num(check.measured)
            entry["interval"] = list(check.interval) if check.interval else None
        elif check.kind == "min_clean_accuracy":
            entry["required_clean"] = check.required
        elif check.kind == "regression" and check.metric == "robust_accuracy":
            entry["baseline"] = check.baseline
        entry["checks"].append(check.to_dict())
        if not check.passed:
            entry["passed"] = False
            entry["failures"].append(check.line())
    return list(rows.values())


def junit_properties(checks: list, start: int = 0) -> list[tuple[str, object]]:
    """Each gate check as test properties, so `pytest --junitxml` carries the figures CI systems show:
    robustlab.gate.N.{metric, threat_model, measured, interval, required, evaluation, outcome}."""
    out: list[tuple[str, object]] = []
    for number, check in enumerate(checks, start):
        j = check.judgement() if check.kind != "regression" else None
        prefix = f"robustlab.gate.{number}"
        eps = "none" if check.eps is None else f"{check.eps:g}"
        out += [(f"{prefix}.metric", check.metric if check.kind != "regression" else f"{check.metric} (regression)"),
                (f"{prefix}.threat_model", f"model={check.model} attack={check.attack} norm={check.norm} eps={eps} "
                                           f"targeted={check.targeted}"),
                (f"{prefix}.measured", num(check.measured)),
                (f"{prefix}.interval", "" if j is None or not j.get("interval") else
                 "[{:.4f}, {:.4f}]".format(*j["interval"])),
                (f"{prefix}.required", num(check.required)),
                (f"{prefix}.evaluation", (j or {}).get("evaluation") or ""),
                (f"{prefix}.outcome", (j or {}).get("outcome") or ("pass" if check.passed else "fail"))]
    return out


def summary_records(result: Any) -> list[dict]:
    """The result's summary as JSON-ready records (as results.json stores them), for baselines."""
    from robustlab.results import _records

    return _records(result.summary)


def interval(robust: Any, n: Any) -> list | None:
    """The 95% Wilson interval of a robust accuracy over n samples (robustlab.verdicts.interval)."""
    value, count = num(robust), num(n)
    if value is None or count is None:
        return None
    from robustlab.verdicts import interval as wilson

    found = wilson(value, int(count))
    return list(found) if found else None


def num(value: Any) -> float | None:
    """A finite float, or None (NaN, inf, missing, not a number)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def jsonable(value: Any) -> Any:
    """Plain JSON values (non-finite floats as None, anything else as its repr)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return repr(value)
