"""Robustness gates: pass/fail assertions on audit results, for CI.

    result = robustlab.audit(model, data, attacks=["pgd"], eps=0.1)
    robustlab.assert_robust(result, attack="pgd", eps=0.1, min_accuracy=0.5)
    robustlab.assert_no_regression(result, "baseline-results/", margin="robust_accuracy:2%")

This module needs pandas and the standard library only, never torch: gates run on saved results
(`robustlab.load(dir)`) as well as on fresh ones. The pytest plugin (`robustlab.pytest_plugin`)
is a thin face over it.

A threshold is a requirement (robustlab.verdicts): `min_accuracy=0.5` at eps 0.1 is
`robust_accuracy>=0.5@0.1`. Each gated row is judged `meets`, `does not meet`, or `cannot be judged`
(its evaluation is not established: an integrity check failed, so no threshold passes on it, however
high the figure). A weaker-than-standard evaluation (quick suite, no checks) is judged on its
figure, an upper bound, and says so.

Certificates (an audit with `certify=`): `min_certified_accuracy=0.4` at eps 0.1 is
`certified_accuracy>=0.4@0.1`, judged on the certificate row of each gated threat model (untargeted
only: certificates are of the untargeted threat model). A result without certificate rows is an
`InputError`; a requirement on certified_accuracy in a run that will write none is refused before
any work by `check_certify` (the faces call it with their `certify` option). A robust-accuracy
threshold the certified lower bound itself meets is met on the basis "certified" ("meets: certified").

A failed gate raises `RobustnessGateError` (an `AssertionError`, so `pytest.raises(AssertionError)`
and plain `assert`-style handling work) whose message names the model, attack, norm, eps, targeted
mode, the measured figure and its interval, the required value and the outcome, the clean accuracy,
the evaluation status and where the results are.

Requirements files (`requirements_file`): `robustlab.toml` (`require = [...]` at the top level) or
`pyproject.toml` (`[tool.robustlab]`, `require = [...]`), each entry as `--require` takes it.

Regression margins (`parse_margin`), the same syntax as `--robustlab-compare-fail`:

- `robust_accuracy:2%`   relative: the metric may fall by at most 2% *of the baseline value*
                          (baseline 0.80 -> at least 0.784);
- `robust_accuracy:0.02` absolute: the metric may fall by at most 0.02 in its own units
                          (accuracies are fractions, so 2 percentage points: 0.80 -> at least 0.78).

"Fall" means getting worse: lower for robust_accuracy, clean_accuracy, median_l2 and median_linf
(a larger perturbation needed is more robust), higher for success_rate.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from robustlab import verdicts
from robustlab.errors import InputError
from robustlab.results import WORST_CASE, AuditResult, load
from robustlab.verdicts import Requirement, parse_requirement

__all__ = ["GateCheck", "Margin", "Requirement", "RobustnessGateError", "assert_no_regression", "assert_robust",
           "check_certify", "evaluate_regression", "evaluate_robust", "evaluation", "judge_requirements",
           "parse_margin", "parse_requirement", "record_requirements", "requirements_file"]

HIGHER_IS_BETTER = ("robust_accuracy", "certified_accuracy", "clean_accuracy", "median_l2", "median_linf")
LOWER_IS_BETTER = ("success_rate",)
MARGIN_METRICS = HIGHER_IS_BETTER + LOWER_IS_BETTER
DEFAULT_MARGIN = "robust_accuracy:0.02"
BASELINE_SCHEMA = "robustlab.baseline/1"
NOT_RUN = "not run"
_TOLERANCE = 1e-9  # float noise allowed on top of every threshold and margin


class RobustnessGateError(AssertionError):
    """A robustness gate failed; `checks` holds every check of the gate (passed and failed)."""

    def __init__(self, message: str, checks: Sequence["GateCheck"]) -> None:
        super().__init__(message)
        self.checks = list(checks)


@dataclass(frozen=True)
class Margin:
    """How far `metric` may get worse than its baseline: `amount` absolute, or relative if `relative`."""

    metric: str
    amount: float
    relative: bool

    def allowed(self, baseline: float) -> float:
        return self.amount * abs(baseline) if self.relative else self.amount

    def __str__(self) -> str:
        return f"{self.metric}:{self.amount * 100:g}%" if self.relative else f"{self.metric}:{self.amount:g}"

    def describe(self, baseline: float) -> str:
        allowed = self.allowed(baseline)
        if self.relative:
            return f"allowed {self.amount * 100:g}% of baseline ({allowed:.4g})"
        return f"allowed {allowed:.4g} absolute"


@dataclass(frozen=True)
class GateCheck:
    """One comparison of one summary row against a threshold or a baseline."""

    kind: str  # "min_accuracy", "min_certified_accuracy", "min_clean_accuracy" or "regression"
    model: str
    attack: str
    norm: str
    eps: float | None  # None: an attack without a budget (CW's minimal-perturbation row)
    targeted: str
    metric: str
    measured: float
    required: float  # the bound the measured value had to meet (>= for higher-is-better metrics)
    passed: bool
    clean_accuracy: float
    n: int
    baseline: float | None = None
    margin: str | None = None
    note: str = ""
    outcome: str = ""                  # thresholds: meets / does not meet / cannot be judged
    evaluation: str = ""               # the gated threat model's evaluation status, with its reasons
    interval: tuple[float, float] | None = None  # the 95% Wilson interval of an accuracy over n
    basis: str = ""                    # thresholds on accuracies: "certified" (the lower bound met it) or "attacked"

    @property
    def key(self) -> tuple:
        return (self.model, self.attack, self.norm, self.eps, self.targeted)

    def where(self) -> str:
        budget = "without a budget" if self.eps is None else f"at {self.norm} eps={self.eps:g}"
        mode = "untargeted" if self.targeted == "none" else f"targeted: {self.targeted}"
        return f"model {self.model!r}, attack {self.attack} {budget} ({mode})"

    def line(self) -> str:
        status = "ok  " if self.passed else "FAIL"
        relation = "<=" if self.metric in LOWER_IS_BETTER else ">="
        if self.kind == "regression":
            delta = self.measured - (self.baseline or 0.0)
            text = (f"{self.metric} {self.measured:.4g} vs baseline {self.baseline:.4g} ({delta:+.4g}); "
                    f"required {relation} {self.required:.4g} ({self.note})")
        else:
            text = f"{self.metric} measured {self.measured:.4g}, required {relation} {self.required:.4g} ({self.kind})"
            if self.outcome:
                text += f": {self.outcome}" + (f": {verdicts.CERTIFIED_BASIS}" if self.proven else "")
            if self.note:
                text += f"; {self.note}"
            if self.interval:
                text += f"; {verdicts.CONFIDENCE:.0%} CI [{self.interval[0]:.3f}, {self.interval[1]:.3f}], n={self.n}"
            if self.evaluation and self.kind == "min_accuracy" and self.evaluation != self.note:
                text += f"; evaluation: {self.evaluation}"
        return f"{status} {self.where()}: {text}"

    @property
    def proven(self) -> bool:
        """A robust-accuracy threshold met by the certified lower bound itself ("meets: certified")."""
        return self.kind == "min_accuracy" and self.passed and self.basis == verdicts.CERTIFIED_BASIS

    def judgement(self, source: str = "robustlab.assert_robust") -> dict:
        """This threshold check as a requirement judgement (metadata["requirements"], robustlab.verdicts)."""
        clean = self.kind == "min_clean_accuracy"
        req = Requirement(self.metric, self.required, None if clean else self.eps, source=source)
        return {"requirement": req.describe(), "metric": self.metric, "value": self.required,
                "required_eps": req.eps, "source": source, "model": self.model,
                "attack": None if clean else self.attack, "norm": None if clean else self.norm,
                "eps": None if clean else self.eps, "targeted": None if clean else self.targeted,
                "observed": _finite(self.measured), "n": self.n,
                "interval": list(self.interval) if self.interval else None,
                "status": None, "evaluation": None if clean else self.evaluation, "outcome": self.outcome,
                "passed": self.passed, "reason": self.note if self.outcome == verdicts.CANNOT_JUDGE else "",
                "note": "" if self.outcome == verdicts.CANNOT_JUDGE else self.note, "basis": self.basis or None}

    def to_dict(self) -> dict:
        return {k: _finite(v) for k, v in asdict(self).items()}


# ---------------------------------------------------------------------------- thresholds
def evaluate_robust(result: AuditResult | pd.DataFrame, *, attack: str | Sequence[str] = WORST_CASE,
                    eps: float | Sequence[float] | None = None, min_accuracy: float | None = None,
                    min_clean_accuracy: float | None = None, norm: str | None = None, targeted: Any = "none",
                    model: str | None = None, min_certified_accuracy: float | None = None) -> list[GateCheck]:
    """The checks of a robustness gate, without raising. See `assert_robust`."""
    summary = _summary(result)
    check_fraction("min_accuracy", min_accuracy)
    check_fraction("min_clean_accuracy", min_clean_accuracy)
    check_fraction("min_certified_accuracy", min_certified_accuracy)
    if min_accuracy is None and min_clean_accuracy is None and min_certified_accuracy is None:
        raise InputError("min_accuracy", "give min_accuracy, min_certified_accuracy and/or min_clean_accuracy "
                                         "(the gate's thresholds)")
    rows = select_rows(summary, attack=attack, eps=eps, norm=norm, targeted=targeted, model=model)
    certificates = _certificate_rows(summary, rows) if min_certified_accuracy is not None else {}
    evaluations = _evaluations(result)
    checks: list[GateCheck] = []
    for _, row in rows.iterrows():
        base = _row_fields(row)
        if min_accuracy is not None:
            checks.append(_threshold("min_accuracy", "robust_accuracy", float(min_accuracy), row, base, evaluations))
        if min_certified_accuracy is not None:
            checks.append(_certified_threshold(float(min_certified_accuracy), row, base, certificates, evaluations))
        if min_clean_accuracy is not None:
            checks.append(_threshold("min_clean_accuracy", "clean_accuracy", float(min_clean_accuracy), row, base,
                                     evaluations))
    return checks


def _threshold(kind: str, metric: str, required: float, row: Mapping | pd.Series, base: dict,
               evaluations: list[dict]) -> GateCheck:
    judged = verdicts.judge_row(metric, required, row, evaluations)
    measured = float(row[metric])
    note = judged["reason"] or judged["note"]
    low_high = judged.get("interval")
    return GateCheck(kind=kind, metric=metric, measured=measured, required=required, passed=judged["passed"],
                     note=note, outcome=judged["outcome"], evaluation=judged.get("evaluation") or "",
                     interval=tuple(low_high) if low_high else None, basis=judged.get("basis") or "", **base)


def _certificate_rows(summary: pd.DataFrame, gated: pd.DataFrame) -> dict[tuple, pd.Series]:
    """The certificate row of every gated threat model (model, norm, eps; untargeted), the highest where
    several methods certified it. InputError when the result has none at all, or the gate is targeted."""
    certified = summary[summary["attack"].map(verdicts.is_certificate)] if len(summary) else summary
    if not len(certified):
        raise InputError("min_certified_accuracy", "the result has no certificate rows: audit with "
                                                   "certify='ibp', 'crown' or 'smoothing[:SIGMA]' (--certify)")
    if any(str(t) != "none" for t in gated["targeted"]):
        raise InputError("min_certified_accuracy", "certificates are of the untargeted threat model: gate "
                                                   "certified accuracy with targeted='none'")
    out: dict[tuple, pd.Series] = {}
    for _, row in certified.sort_values("certified_accuracy", na_position="first").iterrows():
        out[_threat_key(row)] = row  # ascending: the highest certificate of a threat model wins
    return out


def _threat_key(row: Mapping | pd.Series) -> tuple:
    eps = _number(row.get("eps"))
    return str(row.get("model")), str(row.get("norm")), None if eps is None else round(eps, 12)


def _certified_threshold(required: float, row: Mapping | pd.Series, base: dict, certificates: dict[tuple, pd.Series],
                         evaluations: list[dict]) -> GateCheck:
    """certified_accuracy >= required on the certificate row of `row`'s threat model; a model the audit
    could not certify (no row: e.g. a layer the bounds do not support) cannot be judged."""
    found = certificates.get(_threat_key(row))
    if found is None:
        return GateCheck(kind="min_certified_accuracy", metric="certified_accuracy", measured=float("nan"),
                         required=required, passed=False, outcome=verdicts.CANNOT_JUDGE,
                         note="no certificate of this threat model (was the model skipped? see "
                              "metadata['certify'])", basis=verdicts.CERTIFIED_BASIS, **base)
    judged = verdicts.judge_row("certified_accuracy", required, found, evaluations)
    low_high = judged.get("interval")
    fields = base | {"attack": str(found["attack"])}
    return GateCheck(kind="min_certified_accuracy", metric="certified_accuracy",
                     measured=float(found["certified_accuracy"]), required=required, passed=judged["passed"],
                     note=judged["reason"] or judged["note"], outcome=judged["outcome"],
                     evaluation=judged.get("evaluation") or "", interval=tuple(low_high) if low_high else None,
                     basis=verdicts.CERTIFIED_BASIS, **fields)


def check_certify(*, certify: Any, requirements: Iterable[Requirement | str] = (),
                  min_certified_accuracy: float | None = None, argument: str = "--certify") -> None:
    """Refuse before any work a certified-accuracy requirement (a `--require`/[tool.robustlab] entry, or
    a gate's `min_certified_accuracy`) in an audit without certificates (`certify` None or "none"):
    InputError naming the requirement. The faces call it with their certify option; `argument` is how
    the user turns certificates on there ("--certify", "certify=")."""
    parsed = [r if isinstance(r, Requirement) else parse_requirement(r) for r in requirements]
    verdicts.check_certified_requirements(parsed, certify, argument=argument)
    if min_certified_accuracy is not None and certify in (None, "", "none"):
        raise InputError("min_certified_accuracy", f"min_certified_accuracy={min_certified_accuracy!r} needs "
                                                   f"certificates: add {verdicts.certify_hint(argument)}")


def _evaluations(result: AuditResult | pd.DataFrame) -> list[dict]:
    """The evaluation records of a result (computed from its summary and checks when it carries none;
    a bare summary frame has no checks: weaker than standard)."""
    if isinstance(result, AuditResult):
        return verdicts.records(result.metadata, result.summary)
    return verdicts.evaluate(result, [], level=None) if isinstance(result, pd.DataFrame) else []


def judge_requirements(result: AuditResult, requirements: Iterable[Requirement | str]) -> list[dict]:
    """Judge requirements (Requirement objects or '--require' strings) on a result: one judgement per
    requirement and summary row it reads (robustlab.verdicts.judge_requirements)."""
    parsed = [r if isinstance(r, Requirement) else parse_requirement(r) for r in requirements]
    return verdicts.judge_requirements(_summary(result), _evaluations(result), parsed)


def record_requirements(result: AuditResult, judged: Iterable[Mapping]) -> list[dict]:
    """Add judgements to result.metadata["requirements"] (what reports and summaries show); returns them all."""
    kept = [dict(j) for j in result.metadata.get("requirements") or [] if isinstance(j, Mapping)]
    for j in judged:
        if dict(j) not in kept:
            kept.append(dict(j))
    result.metadata["requirements"] = kept
    return kept


def assert_robust(result: AuditResult, *, attack: str | Sequence[str] = WORST_CASE,
                  eps: float | Sequence[float] | None = None, min_accuracy: float | None = None,
                  min_clean_accuracy: float | None = None, norm: str | None = None, targeted: Any = "none",
                  model: str | None = None, results_dir: str | os.PathLike | None = None,
                  min_certified_accuracy: float | None = None) -> list[GateCheck]:
    """Fail unless robust accuracy under `attack` is at least `min_accuracy` at every `eps`.

    attack: an attack name as in the summary ("pgd", "cw", "foolbox:..."), "worst-case" (default:
        the per-sample worst case over the audited attacks), or several names (their worst case).
    eps: one budget or several (each must pass); None: every budgeted eps of that attack.
    min_clean_accuracy: also require this clean accuracy. min_certified_accuracy: also require this
        certified accuracy (the audit's certificate row at each gated eps; an audit with certify=).
        model: one model of a multi-model audit
        (default: every model must pass). results_dir: named in the failure message.
    Returns the checks when all pass; raises `RobustnessGateError` (an AssertionError) otherwise,
    and `InputError` when the result has no matching rows.
    """
    __tracebackhide__ = True
    checks = evaluate_robust(result, attack=attack, eps=eps, min_accuracy=min_accuracy,
                             min_clean_accuracy=min_clean_accuracy, norm=norm, targeted=targeted, model=model,
                             min_certified_accuracy=min_certified_accuracy)
    raise_if_failed(checks, result=result, results_dir=results_dir)
    return checks


# ---------------------------------------------------------------------------- regressions
def parse_margin(text: str | Margin) -> Margin:
    """'robust_accuracy:2%' (relative to the baseline) or 'robust_accuracy:0.02' (absolute)."""
    if isinstance(text, Margin):
        return text
    match = re.fullmatch(r"\s*([a-z_]+)\s*:\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)\s*", str(text))
    if not match:
        raise InputError("margin", f"expected METRIC:AMOUNT or METRIC:PERCENT%, e.g. robust_accuracy:2% or "
                                   f"robust_accuracy:0.02, got {text!r}")
    metric, amount, percent = match.groups()
    if metric not in MARGIN_METRICS:
        raise InputError("margin", f"unknown metric {metric!r} in {text!r}; expected one of: {', '.join(MARGIN_METRICS)}")
    value = float(amount) / (100.0 if percent else 1.0)
    return Margin(metric=metric, amount=value, relative=bool(percent))


def evaluate_regression(result: AuditResult | pd.DataFrame, baseline: Any, *,
                        margin: str | Margin | Iterable[str | Margin] = DEFAULT_MARGIN,
                        test: str | None = None) -> list[GateCheck]:
    """Compare every (model, attack, norm, eps, targeted) row present in both result and baseline."""
    current = _summary(result)
    before = baseline_summary(baseline, test=test)
    margins = [parse_margin(m) for m in ([margin] if isinstance(margin, (str, Margin)) else list(margin))]
    if not margins:
        raise InputError("margin", "give at least one margin, e.g. robust_accuracy:2%")
    old = {_row_key(row): row for _, row in before.iterrows()}
    checks: list[GateCheck] = []
    matched = 0
    for _, row in current.iterrows():
        previous = old.get(_row_key(row))
        if previous is None:
            continue
        matched += 1
        base = _row_fields(row)
        for m in margins:
            now, then = _number(row.get(m.metric)), _number(previous.get(m.metric))
            if now is None or then is None:
                continue  # e.g. no successful attack: no median perturbation to compare
            allowed = m.allowed(then)
            lower_better = m.metric in LOWER_IS_BETTER
            required = then + allowed if lower_better else then - allowed
            passed = now <= required + _TOLERANCE if lower_better else now >= required - _TOLERANCE
            note = m.describe(then)
            n_before = _number(previous.get("n"))
            if n_before is not None and int(n_before) != base["n"]:
                note += f"; baseline n={int(n_before)}, now n={base['n']}"
            checks.append(GateCheck(kind="regression", metric=m.metric, measured=now, required=required,
                                    passed=passed, baseline=then, margin=str(m), note=note, **base))
    if matched == 0:
        have = sorted({_key_text(_row_key(r)) for _, r in current.iterrows()})
        had = sorted({_key_text(_row_key(r)) for _, r in before.iterrows()})
        raise InputError("baseline", "no (model, attack, norm, eps, targeted) row of the result is in the baseline; "
                                     f"result has {have[:6]}, baseline has {had[:6]}. Re-save the baseline if the "
                                     "gate's configuration changed on purpose")
    return checks


def assert_no_regression(result: AuditResult, baseline: Any, *,
                         margin: str | Margin | Iterable[str | Margin] = DEFAULT_MARGIN, test: str | None = None,
                         results_dir: str | os.PathLike | None = None) -> list[GateCheck]:
    """Fail if a metric got worse than in `baseline` by more than `margin` (default robust_accuracy:0.02).

    baseline: an AuditResult, a summary DataFrame or records, a results directory (`result.save`),
        or a baseline file written by `--robustlab-save-baseline` (then `test` names the test's
        node id unless the file holds exactly one test).
    margin: one or several of 'METRIC:AMOUNT' (absolute) / 'METRIC:PERCENT%' (relative to the
        baseline value); see the module docstring.
    Rows are matched on (model, attack, norm, eps, targeted); rows in only one of the two are ignored,
    but a result sharing no row with the baseline is an `InputError`.
    """
    __tracebackhide__ = True
    checks = evaluate_regression(result, baseline, margin=margin, test=test)
    raise_if_failed(checks, result=result, results_dir=results_dir, title="robustness regression")
    return checks


def baseline_summary(baseline: Any, *, test: str | None = None) -> pd.DataFrame:
    """The summary frame held by any of the baseline forms `assert_no_regression` accepts."""
    if isinstance(baseline, AuditResult):
        return baseline.summary
    if isinstance(baseline, pd.DataFrame):
        return baseline
    if isinstance(baseline, (list, tuple)):
        return _frame(list(baseline))
    if isinstance(baseline, (str, os.PathLike)):
        path = Path(baseline)
        if path.is_dir():
            return load(path).summary
        if not path.is_file():
            raise InputError("baseline", f"{path} does not exist (expected a results directory or a baseline file)")
        try:
            document = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise InputError("baseline", f"cannot read {path}: {error}") from None
        if isinstance(document, dict) and document.get("schema") == BASELINE_SCHEMA:
            tests = document.get("tests", {})
            if test is None:
                if len(tests) != 1:
                    raise InputError("test", f"{path} holds {len(tests)} tests; name one with test=NODEID")
                test = next(iter(tests))
            if test not in tests:
                raise InputError("test", f"{path} has no baseline for {test!r}")
            return _frame(tests[test]["summary"])
        if isinstance(document, dict) and "summary" in document:
            return _frame(document["summary"])
        raise InputError("baseline", f"{path} is neither a robustlab baseline nor a results.json")
    raise InputError("baseline", f"expected an AuditResult, a summary DataFrame, records or a path, "
                                 f"got {type(baseline).__name__}")


# ---------------------------------------------------------------------------- requirements files
REQUIREMENTS_KEYS = ("require",)


def find_requirements_file(directory: str | os.PathLike = ".") -> Path | None:
    """robustlab.toml in `directory`, else its pyproject.toml if that has a [tool.robustlab] table."""
    folder = Path(directory)
    if (folder / "robustlab.toml").is_file():
        return folder / "robustlab.toml"
    pyproject = folder / "pyproject.toml"
    if pyproject.is_file():
        try:
            table = _toml(pyproject, "requirements").get("tool", {})
        except InputError:
            return pyproject  # a broken pyproject.toml: reading it again says why
        if isinstance(table, dict) and "robustlab" in table:
            return pyproject
    return None


def requirements_file(path: str | os.PathLike, *, argument: str = "--requirements") -> list[Requirement]:
    """The requirements of a robustlab.toml (`require = [...]` at the top level) or a pyproject.toml
    (`[tool.robustlab]` with `require = [...]`); every entry as `--require` takes it."""
    file = Path(path)
    if not file.is_file():
        raise InputError(argument, f"{file} does not exist (expected a robustlab.toml or a pyproject.toml)")
    document = _toml(file, argument)
    if file.name == "pyproject.toml" or "tool" in document:
        table = document.get("tool", {}).get("robustlab") if isinstance(document.get("tool"), dict) else None
        if table is None:
            raise InputError(argument, f"{file} has no [tool.robustlab] table")
        where = f"{file} [tool.robustlab]"
    else:
        table, where = document, str(file)
    if not isinstance(table, dict):
        raise InputError(argument, f"{where} must be a table")
    unknown = sorted(k for k in table if k not in REQUIREMENTS_KEYS)
    if unknown:
        raise InputError(argument, f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                                   f"{', '.join(map(repr, unknown))}; allowed: {', '.join(REQUIREMENTS_KEYS)}")
    entries = table.get("require", [])
    entries = [entries] if isinstance(entries, str) else entries
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise InputError(argument, f"{where}: require must be a list of strings such as "
                                   f"\"robust_accuracy>=0.6@8/255\", got {entries!r}")
    return [parse_requirement(e, argument=f"{where} require", source=where) for e in entries]


def _toml(file: Path, argument: str) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise InputError(argument, f"reading {file} needs Python 3.11+ or the tomli package "
                                       "(pip install tomli)") from None
    try:
        with file.open("rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise InputError(argument, f"cannot read {file}: {error}") from None


# ---------------------------------------------------------------------------- selection, messages
def select_rows(summary: pd.DataFrame, *, attack: str | Sequence[str] = WORST_CASE,
                eps: float | Sequence[float] | None = None, norm: str | None = None, targeted: Any = "none",
                model: str | None = None) -> pd.DataFrame:
    """The summary rows a gate looks at; InputError naming what exists when none (or an eps) is missing."""
    label = gated_attack(attack)
    mode = normalise_mode(targeted)
    rows = summary[(summary["attack"] == label) & (summary["targeted"].astype(str) == mode)]
    if label == WORST_CASE:
        rows = _worst_case_rows(summary, mode)
    if model is not None:
        rows = rows[rows["model"] == model]
    if norm is not None:
        rows = rows[rows["norm"] == str(norm).lower()]
    if len(rows) == 0:
        available = sorted({f"{r.attack} ({r.targeted})" for r in summary[["attack", "targeted"]].itertuples()})
        raise InputError("attack", f"the result has no rows for attack {label!r}, targeted={mode!r}"
                                   f"{'' if model is None else f', model {model!r}'}; it has: {', '.join(available)}")
    if eps is None:
        chosen = rows[rows["eps"].notna()]
        if len(chosen) == 0:
            raise InputError("eps", f"attack {label!r} has no budgeted rows; name an eps")
        return chosen
    wanted = [eps] if isinstance(eps, (int, float)) else list(eps)
    picked = []
    for e in wanted:
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e):
            raise InputError("eps", f"must be finite numbers, got {e!r}")
        hit = rows[(rows["eps"] - float(e)).abs() <= 1e-9 * max(1.0, abs(float(e)))]
        if len(hit) == 0:
            have = ", ".join(f"{v:g}" for v in sorted(rows["eps"].dropna().unique()))
            raise InputError("eps", f"the result has no rows for attack {label!r} at eps={e:g}; it has eps {have}")
        picked.append(hit)
    return pd.concat(picked)


def _worst_case_rows(summary: pd.DataFrame, mode: str) -> pd.DataFrame:
    """The worst-case row of every (model, norm, eps) of `mode`; where the audit wrote none (a single
    attack at a single eps: its row is the worst case), that attack's row (robustlab.verdicts)."""
    return verdicts.worst_case_rows(summary[summary["targeted"].astype(str) == mode])


def gated_attack(attack: str | Sequence[str]) -> str:
    """The summary label a gate reads: the attack itself, or the worst case over several."""
    if isinstance(attack, str):
        return attack.strip().lower() if not attack.lower().startswith("foolbox:") else attack.strip()
    if hasattr(attack, "attack_class"):  # a configured foolbox adapter, labelled as the audit labels it
        return f"foolbox:{attack.attack_class}"
    if hasattr(attack, "name") and not isinstance(attack, (list, tuple)):  # a configured Attack object
        return str(attack.name)
    names = list(attack)
    if not names:
        raise InputError("attack", "give at least one attack")
    return gated_attack(names[0]) if len(names) == 1 else WORST_CASE


def normalise_mode(targeted: Any) -> str:
    """'none' for untargeted; modes as the audit writes them (a fixed class index as a string)."""
    if targeted is None or targeted is False:
        return "none"
    if isinstance(targeted, int) and not isinstance(targeted, bool):
        return str(targeted)
    text = str(targeted).strip().lower().replace("_", "-")
    return {"untargeted": "none", "ll": "least-likely", "leastlikely": "least-likely", "every": "all"}.get(text, text)


def evaluation(result: AuditResult | None, *, model: str | None = None, norm: str | None = None,
               eps: float | None = None, targeted: str | None = None) -> str | None:
    """The evaluation status of the selected threat models, in one line: one status when all agree,
    else "eps=0.05: established; eps=0.1: not established (failed checks: ...)". None without results."""
    if result is None:
        return None
    chosen = [v for v in _evaluations(result)
              if (model is None or str(v.get("model")) == str(model))
              and (norm is None or str(v.get("norm")) == str(norm))
              and (targeted is None or str(v.get("targeted")) == str(targeted))
              and (eps is None or verdicts.same_eps(v.get("eps"), eps))]
    if not chosen:
        return None
    labels = list(dict.fromkeys(verdicts.status_label(v) for v in chosen))
    if len(labels) == 1:
        return labels[0]
    models = len({v["model"] for v in chosen}) > 1
    modes = len({v["targeted"] for v in chosen}) > 1
    parts = []
    for v in chosen:
        where = (f"{v['model']} " if models else "") + (f"{v['targeted']} " if modes else "") + f"eps={float(v['eps']):g}"
        parts.append(f"{where}: {verdicts.status_label(v)}")
    return "; ".join(parts)


def failure_message(checks: Sequence[GateCheck], *, result: AuditResult | None = None,
                    results_dir: str | os.PathLike | None = None, title: str = "robustness gate failed",
                    context: str = "") -> str:
    """A multi-line message: failed checks first, then the passed ones, clean accuracy, verdict, results."""
    failed = [c for c in checks if not c.passed]
    passed = [c for c in checks if c.passed]
    head = f"{title}: {len(failed)} of {len(checks)} checks failed" + (f" ({context})" if context else "")
    lines = [head]
    lines += ["  " + c.line() for c in failed] + ["  " + c.line() for c in passed]
    seen: dict[str, tuple[float, int]] = {}
    for c in checks:
        seen.setdefault(c.model, (c.clean_accuracy, c.n))
    for model, (clean, n) in seen.items():
        lines.append(f"  clean accuracy of {model!r}: {clean:.4g} (n={n})")
    models = {c.model for c in checks}
    modes = {c.targeted for c in checks}
    epsilons = {c.eps for c in checks if c.eps is not None}
    found = evaluation(result, model=next(iter(models)) if len(models) == 1 else None,
                       targeted=next(iter(modes)) if len(modes) == 1 else None,
                       eps=next(iter(epsilons)) if len(epsilons) == 1 else None)
    lines.append(f"  evaluation: {found if found else NOT_RUN}")
    lines.append(f"  results: {results_dir}" if results_dir else
                 "  results: not saved (pass --robustlab-report DIR, or result.save(DIR), to keep them)")
    return "\n".join(lines)


def raise_if_failed(checks: Sequence[GateCheck], *, result: AuditResult | None = None,
                    results_dir: str | os.PathLike | None = None, title: str = "robustness gate failed",
                    context: str = "") -> None:
    __tracebackhide__ = True
    if any(not c.passed for c in checks):
        raise RobustnessGateError(failure_message(checks, result=result, results_dir=results_dir, title=title,
                                                  context=context), checks)


# ---------------------------------------------------------------------------- helpers
def _summary(result: AuditResult | pd.DataFrame) -> pd.DataFrame:
    if isinstance(result, AuditResult):
        return result.summary
    if isinstance(result, pd.DataFrame):
        return result
    raise InputError("result", f"expected an AuditResult (from robustlab.audit or robustlab.load), "
                               f"got {type(result).__name__}")


def _frame(records: list) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records)
    if "eps" in frame:
        frame["eps"] = pd.to_numeric(frame["eps"], errors="coerce").astype("float64")
    return frame


def _row_key(row: Mapping | pd.Series) -> tuple:
    eps = _number(row.get("eps"))
    return (str(row.get("model")), str(row.get("attack")), str(row.get("norm")),
            None if eps is None else round(eps, 12), str(row.get("targeted")))


def _key_text(key: tuple) -> str:
    model, attack, norm, eps, targeted = key
    return f"{model}/{attack}/{norm}/eps={'none' if eps is None else format(eps, 'g')}/{targeted}"


def _row_fields(row: Mapping | pd.Series) -> dict:
    eps = _number(row.get("eps"))
    return dict(model=str(row["model"]), attack=str(row["attack"]), norm=str(row["norm"]), eps=eps,
                targeted=str(row["targeted"]), clean_accuracy=float(row["clean_accuracy"]), n=int(row["n"]))


def _number(value: Any) -> float | None:
    if value is None or value is pd.NA:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def check_fraction(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise InputError(name, f"must be a fraction in [0, 1] (0.5 means 50%), got {value!r}")
