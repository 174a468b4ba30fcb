"""Verdicts: what was measured, whether it can be trusted, whether it meets the requirement.

Ground floor (see DESIGN.md): pandas and the standard library, no torch, nothing above it. The
harness writes these records, gates and the faces judge requirements with them, and reports read
them from saved results alone.

A verdict on one threat model (model, norm, eps, targeted mode) answers three questions, always
shown in this order:

1. **The figure**: the worst-case robust accuracy over every attack the audit ran (adaptive attacks
   and probes included), with a Wilson confidence interval over its n samples (`CONFIDENCE`).
2. **The evaluation status** (`evaluate`): can that figure be trusted?
   - `established`: the standard attack suite (row `cascade`) ran at that threat model, the
     integrity checks ran, and every check that applies passed;
   - `weaker than standard`: no check failed, but the evaluation was reduced (a quick suite or none,
     or the integrity checks were not run): the figure is an upper bound from a weaker evaluation;
   - `not established`: a check failed, so the attacks may be blind: the figure must not be relied on.
3. **The requirement** (`judge`): set by the user, never by robustlab (`--require`, `--fail-under`,
   a pytest marker's thresholds, `[tool.robustlab]`): `meets`, `does not meet`, or `cannot be
   judged` (the evaluation is not established, or there is no figure); without one, `no requirement
   set`. No word here says "robust": only a requirement can say the model is robust enough.

A requirement on robust accuracy is judged on the measured figure; the interval is shown beside it,
and a requirement inside the interval is noted as within sampling noise.

**Certificates** (an audit with `certify=`, robustlab.certify) add a lower bound beside that upper bound:
each evaluation record of the untargeted threat model then carries `certified_accuracy` (the best
certificate row at that model, norm and eps), its interval, count and method. Where the certified
figure itself meets a robust-accuracy requirement the outcome is `meets` on the basis `certified`
("meets: certified"): proven, so it holds whatever the evaluation status of the attacks. A
requirement on `certified_accuracy` is judged on the certificate rows; an audit without them cannot
judge it (the faces refuse such a requirement before work: `check_certified_requirements`).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from robustlab.errors import InputError

WORST_CASE = "worst-case"  # robustlab.results.WORST_CASE (results imports this module to migrate old files)
CERTIFIED = "certified:"  # robustlab.results.CERTIFIED: the prefix of certificate rows ("certified:crown")

# ---------------------------------------------------------------------------- vocabulary
ESTABLISHED = "established"
WEAKER = "weaker than standard"
NOT_ESTABLISHED = "not established"
STATUSES = (ESTABLISHED, WEAKER, NOT_ESTABLISHED)

MEETS = "meets"
DOES_NOT_MEET = "does not meet"
CANNOT_JUDGE = "cannot be judged"
NO_REQUIREMENT = "no requirement set"
OUTCOMES = (MEETS, DOES_NOT_MEET, CANNOT_JUDGE)
CERTIFIED_BASIS = "certified"      # a judgement's basis: the certified lower bound met the requirement
ATTACKED_BASIS = "attacked"        # ... or the attacked (upper-bound) figure was judged

STATUS_TEXT = {
    ESTABLISHED: "the standard attack suite ran and every applicable integrity check passed",
    WEAKER: "no check failed, but the evaluation was weaker than the standard one; the figure is an upper bound",
    NOT_ESTABLISHED: "an integrity check failed: the attacks may be blind, so the figure cannot be relied on",
}
OUTCOME_TEXT = {
    MEETS: "the measured figure meets the requirement",
    f"{MEETS}: {CERTIFIED_BASIS}": "the certified lower bound itself meets the requirement: proven, not only unbroken",
    DOES_NOT_MEET: "the measured figure is below the requirement",
    CANNOT_JUDGE: "the figure cannot be trusted (evaluation not established) or is missing",
    NO_REQUIREMENT: "no requirement was set: the figure is a measurement, not a pass",
}

STANDARD_SUITE_ROW = "cascade"        # the standard cascade's row (robustlab.attacks.Cascade().label)
SUITE_ROWS = {"cascade": "standard", "cascade-quick": "quick"}
SUITE_REASONS = {"quick": "quick attack suite", "none": "no attack suite"}  # why a suite is weaker than standard
CHECKS_REASON = "integrity checks not run"
CONFIDENCE = 0.95
_Z = 1.959963984540054               # two-sided 95% normal quantile
_EPS_TOLERANCE = 1e-9
_TOLERANCE = 1e-9                    # float noise allowed on top of every requirement

REQUIREMENT_METRICS = ("robust_accuracy", "certified_accuracy", "clean_accuracy", "median_l2", "median_linf")
FRACTION_METRICS = ("robust_accuracy", "certified_accuracy", "clean_accuracy")
INTERVAL_METRICS = ("robust_accuracy", "certified_accuracy")  # figures over n samples judged with a noise note


# ---------------------------------------------------------------------------- statistics
def wilson(successes: int, n: int, z: float = _Z) -> tuple[float, float]:
    """Wilson score interval of a binomial rate (default: 95% two-sided). Sound at 0 and 1."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def interval(rate: float | None, n: int | None) -> tuple[float, float] | None:
    """The CONFIDENCE Wilson interval of a rate measured over n samples (None without a figure)."""
    if rate is None or n is None or not _finite(rate) or int(n) <= 0:
        return None
    return wilson(int(round(float(rate) * int(n))), int(n))


# ---------------------------------------------------------------------------- evaluation status
def same_eps(a: Any, b: Any) -> bool:
    return a is not None and b is not None and abs(float(a) - float(b)) <= _EPS_TOLERANCE * max(1.0, abs(float(a)))


def applies(check: Mapping, model: str, norm: str | None, eps: float | None, targeted: str | None) -> bool:
    """Does this check result bear on the threat model? Null fields are model-wide (or every eps)."""
    if str(check.get("model")) != str(model):
        return False
    if check.get("norm") is not None and norm is not None and str(check["norm"]) != str(norm):
        return False
    if check.get("targeted") is not None and targeted is not None and str(check["targeted"]) != str(targeted):
        return False
    if check.get("eps") is not None and eps is not None and not same_eps(check["eps"], eps):
        return False
    return True


def evaluate(summary: pd.DataFrame, checks: Iterable[Mapping], *, level: str | None,
             norm: str | None = None) -> list[dict]:
    """One evaluation record per (model, norm, eps, targeted) of the budgeted rows (in `norm`, or every norm).

    level: the integrity-check level of the run ("default", "strict"; "none" or None: not run).
    """
    checks = list(checks)
    ran = level not in (None, "none")
    out: list[dict] = []
    if not len(summary):
        return out
    rows = summary[summary["eps"].notna()]
    if norm is not None:
        rows = rows[rows["norm"] == norm]
    certified = rows[rows["attack"].map(is_certificate)]
    rows = rows[~rows["attack"].map(is_certificate)]
    for (model, norm_, targeted, eps), block in rows.groupby(["model", "norm", "targeted", "eps"], sort=False):
        worst = block[block["attack"] == WORST_CASE]
        use = worst if len(worst) else block
        robust = float(use["robust_accuracy"].min())
        n = int(block["n"].iloc[0])
        attacks = [a for a in dict.fromkeys(block["attack"]) if a != WORST_CASE]
        suite = next((row for row in SUITE_ROWS if row in attacks), None)
        failed = sorted({str(c["check"]) for c in checks if c.get("status") == "fail"
                         and applies(c, str(model), str(norm_), float(eps), str(targeted))})
        suite_name = SUITE_ROWS.get(suite or "", "none")
        reductions = ([SUITE_REASONS[suite_name]] if suite_name in SUITE_REASONS else []) + \
            ([] if ran else [CHECKS_REASON])
        status = NOT_ESTABLISHED if failed else (WEAKER if reductions else ESTABLISHED)
        low_high = interval(robust, n)
        out.append({
            "model": str(model), "norm": str(norm_), "eps": float(eps), "targeted": str(targeted), "n": n,
            "clean_accuracy": float(block["clean_accuracy"].iloc[0]), "robust_accuracy": robust,
            "robust_count": int(round(robust * n)), "interval": list(low_high) if low_high else None,
            "confidence": CONFIDENCE, "status": status, "failed_checks": failed, "reductions": reductions,
            "reasons": failed + reductions, "suite": suite_name,
            "checks": level if ran else "none", "attacks": attacks, "meaning": STATUS_TEXT[status]})
        out[-1].update(certificate(certified, str(model), str(norm_), float(eps), str(targeted)))
    return out


def is_certificate(attack: Any) -> bool:
    """A certificate row ("certified:crown"): a lower bound in certified_accuracy, never an attack."""
    return isinstance(attack, str) and attack.startswith(CERTIFIED)


def certificate(certified: pd.DataFrame, model: str, norm: str, eps: float, targeted: str) -> dict:
    """The certified lower bound of one threat model: the highest certificate row of the model at
    (norm, eps); certificates are of the untargeted threat model only. {} when there is none.

    Every certificate is a lower bound of the same robust accuracy, so the highest is the tightest."""
    if targeted != "none" or not len(certified):
        return {}
    mine = certified[(certified["model"].astype(str) == model) & (certified["norm"].astype(str) == norm)
                     & (certified["targeted"].astype(str) == "none")
                     & certified["eps"].map(lambda e: same_eps(e, eps))]
    mine = mine[mine["certified_accuracy"].map(_finite)] if "certified_accuracy" in mine else mine.iloc[0:0]
    if not len(mine):
        return {}
    best = mine.loc[mine["certified_accuracy"].astype(float).idxmax()]
    rate, n = float(best["certified_accuracy"]), int(best["n"])
    low_high = interval(rate, n)
    return {"certified_accuracy": rate, "certified_count": int(round(rate * n)),
            "certified_interval": list(low_high) if low_high else None,
            "certified_method": str(best["attack"])[len(CERTIFIED):]}


def status_label(record: Mapping | None) -> str:
    """'established', 'weaker than standard (integrity checks not run)', 'not established (failed checks: ...)'."""
    if not record:
        return "not evaluated"
    status = str(record.get("status"))
    failed = [str(c) for c in record.get("failed_checks") or []]
    reductions = [str(r) for r in record.get("reductions") or []]
    parts = ([f"failed checks: {', '.join(failed)}"] if failed else []) + reductions
    return status + (f" ({'; '.join(parts)})" if parts else "")


# ---------------------------------------------------------------------------- lookups
def records(metadata: Mapping | None, summary: pd.DataFrame | None = None) -> list[dict]:
    """The evaluation records of a result; computed from its summary and checks when it carries none
    (a result built by hand)."""
    found = (metadata or {}).get("evaluation")
    if isinstance(found, list):
        return [dict(v) for v in found if isinstance(v, Mapping)]
    if summary is None or not len(summary):
        return []
    return evaluate(summary, check_results(metadata), level=checks_level(metadata))


def check_results(metadata: Mapping | None) -> list[dict]:
    node = (metadata or {}).get("checks")
    results = node.get("results") if isinstance(node, Mapping) else None
    return [dict(c) for c in results if isinstance(c, Mapping)] if isinstance(results, list) else []


def checks_level(metadata: Mapping | None) -> str | None:
    node = (metadata or {}).get("checks")
    return str(node.get("level")) if isinstance(node, Mapping) and node.get("level") else None


def find(evaluations: Sequence[Mapping], model: str, norm: str | None, eps: Any, targeted: str = "none") -> dict | None:
    """The evaluation record of one threat model, or None."""
    if not _finite(eps):
        return None
    for v in evaluations:
        if (str(v.get("model")) == str(model) and str(v.get("targeted")) == str(targeted)
                and (norm is None or str(v.get("norm")) == str(norm)) and same_eps(v.get("eps"), eps)):
            return dict(v)
    return None


def judgements(metadata: Mapping | None) -> list[dict]:
    """The requirement judgements a result carries (empty: no requirement set)."""
    found = (metadata or {}).get("requirements")
    return [dict(j) for j in found if isinstance(j, Mapping)] if isinstance(found, list) else []


# ---------------------------------------------------------------------------- requirements
@dataclass(frozen=True)
class Requirement:
    """`metric >= value` at `eps` (None: at every budgeted eps), from `source`."""

    metric: str
    value: float
    eps: float | None = None
    source: str = "--require"

    def describe(self) -> str:
        where = f" at eps={self.eps:g}" if self.eps is not None else ""
        return f"{self.metric} >= {self.value:g}{where}"

    def to_dict(self) -> dict:
        return asdict(self)


_REQUIREMENT = re.compile(r"\s*([A-Za-z_][A-Za-z_0-9]*)\s*(>=|=>|==|<=|=|>|<)\s*([^@]*?)\s*(?:@\s*(.*?)\s*)?")


def parse_requirement(text: Any, *, argument: str = "--require", source: str | None = None) -> Requirement:
    """'robust_accuracy>=0.6@8/255', 'robust_accuracy >= 60% @ 0.1', 'clean_accuracy>=0.9'.

    `--fail-under`'s 'METRIC=VALUE[@EPS]' means the same (=, as in "fail under"). Accuracies are
    fractions (0.6 or 60%). Raises InputError naming `argument`.
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError(argument, f"expected METRIC>=VALUE[@EPS], e.g. robust_accuracy>=0.6@8/255, got {text!r}")
    match = _REQUIREMENT.fullmatch(text)
    if not match:
        raise InputError(argument, f"expected METRIC>=VALUE[@EPS], e.g. robust_accuracy>=0.6@8/255, got {text!r}")
    metric, op, value_text, eps_text = match.groups()
    if metric not in REQUIREMENT_METRICS:
        raise InputError(argument, f"unknown metric {metric!r} in {text!r}; expected one of "
                                   f"{', '.join(REQUIREMENT_METRICS)}")
    if op not in (">=", "=>", "="):
        raise InputError(argument, f"{text!r}: a requirement is a floor, METRIC>=VALUE (every metric here is "
                                   f"better when higher), not {op!r}")
    percent = value_text.endswith("%")
    value = _number(value_text[:-1] if percent else value_text, argument, text, "value")
    if percent:
        value /= 100.0
    if metric in FRACTION_METRICS and not 0.0 <= value <= 1.0:
        raise InputError(argument, f"{text!r}: {metric} is a fraction in [0, 1] (0.6 or 60% means 60%), "
                                   f"got {value_text}")
    if value < 0:
        raise InputError(argument, f"{text!r}: the value must not be negative, got {value_text}")
    eps = None
    if eps_text is not None:
        if not eps_text:
            raise InputError(argument, f"{text!r}: nothing after '@' (expected an eps, e.g. @8/255)")
        eps = _number(eps_text, argument, text, "eps")
        if eps <= 0:
            raise InputError(argument, f"{text!r}: eps must be positive, got {eps_text}")
    return Requirement(metric=metric, value=value, eps=eps, source=source or argument)


def _number(text: str, argument: str, whole: str, what: str) -> float:
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text.strip())
    except (ValueError, ZeroDivisionError):
        raise InputError(argument, f"{whole!r}: the {what} {text!r} is not a number (fractions like 8/255 are "
                                   f"allowed)") from None
    if not math.isfinite(value):
        raise InputError(argument, f"{whole!r}: the {what} must be finite, got {text!r}")
    return value


def judge(metric: str, observed: Any, required: float, evaluation: Mapping | None = None) -> tuple[str, str]:
    """(outcome, reason) of `observed >= required`. A robust-accuracy figure whose evaluation is not
    established cannot be judged, whatever the requirement; without an evaluation record the figure
    is judged as measured. A certified figure is a proof: no evaluation status bears on it."""
    if not _finite(observed):
        return CANNOT_JUDGE, "no figure to compare"
    if metric == "robust_accuracy" and evaluation is not None and evaluation.get("status") == NOT_ESTABLISHED:
        return CANNOT_JUDGE, status_label(evaluation)
    if float(observed) >= float(required) - _TOLERANCE:
        return MEETS, ""
    return DOES_NOT_MEET, ""


def noise_note(metric: str, required: float, low_high: Sequence[float] | None) -> str:
    """A note when the requirement lies strictly inside the figure's interval: the outcome is within noise."""
    if metric not in INTERVAL_METRICS or not low_high or not low_high[0] < required < low_high[1]:
        return ""
    return f"the requirement lies inside the figure's {CONFIDENCE:.0%} interval: the outcome is within sampling noise"


def certified_basis(required: float, evaluation: Mapping | None) -> str:
    """A robust-accuracy requirement met by the certified lower bound itself: the note that says so,
    else "" (no certificate at that threat model, or it is below the requirement)."""
    rate = _float((evaluation or {}).get("certified_accuracy"))
    if rate is None or rate < float(required) - _TOLERANCE:
        return ""
    method = str((evaluation or {}).get("certified_method") or "a certificate")
    bound = ("a lower bound of the smoothed classifier's robust accuracy, with probability 1 - alpha over the noise"
             if method.startswith("smoothing") else "a proven lower bound of robust accuracy")
    return f"certified >= {rate:.1%} ({method}) meets it: {bound}"


def check_certified_requirements(requirements: Iterable[Requirement], certify: Any, *,
                                 argument: str = "--certify") -> None:
    """Refuse, before any work, a requirement on certified_accuracy in a run that writes no
    certificate (InputError naming the requirement's source): it could only be 'cannot be judged'."""
    if certify not in (None, "", "none"):
        return
    for req in requirements:
        if req.metric == "certified_accuracy":
            source = req.source if req.source.startswith("--") else f"{req.source} require"
            raise InputError(source, f"{req.describe()} needs certificates: add {certify_hint(argument)} "
                                     "(without them there are no certified rows to judge)")


def certify_hint(argument: str) -> str:
    """How to turn certificates on: '--certify ibp|crown|smoothing[:SIGMA]' or "certify='crown'"."""
    if argument.endswith("="):
        return f"{argument}'ibp', 'crown' or 'smoothing[:SIGMA]'"
    return f"{argument} ibp|crown|smoothing[:SIGMA]"


def judge_requirements(summary: pd.DataFrame, evaluations: Sequence[Mapping],
                       requirements: Iterable[Requirement]) -> list[dict]:
    """One judgement per (requirement, summary row it reads); a requirement with no row cannot be judged.

    robust_accuracy reads the worst case over every attack of each (model, norm, eps, targeted mode);
    clean_accuracy is read once per model; median_l2/median_linf on every budgeted attack row.
    """
    out: list[dict] = []
    bounded = summary[summary["eps"].notna()] if len(summary) else summary
    for req in requirements:
        base = {"requirement": req.describe(), "metric": req.metric, "value": req.value,
                "required_eps": req.eps, "source": req.source}
        rows = bounded
        if req.eps is not None and len(rows):
            rows = rows[(rows["eps"] - req.eps).abs() <= _EPS_TOLERANCE * max(1.0, req.eps)]
        if len(rows):  # certificate rows hold certified_accuracy only; every other metric reads the attacks'
            certified = rows["attack"].map(is_certificate)
            rows = rows[certified] if req.metric == "certified_accuracy" else rows[~certified]
        if req.metric == "robust_accuracy":
            rows = worst_case_rows(rows)
        elif req.metric == "clean_accuracy" and len(rows):
            rows = rows.drop_duplicates(["model"])
        if not len(rows):
            what = "no certificate rows (audit with certify=ibp, crown or smoothing)" \
                if req.metric == "certified_accuracy" else "no results to check"
            out.append(base | {"model": None, "attack": None, "norm": None, "eps": req.eps, "targeted": None,
                               "observed": None, "n": None, "interval": None, "status": None, "evaluation": None,
                               "outcome": CANNOT_JUDGE, "passed": False, "basis": None,
                               "reason": what + (f" at eps={req.eps:g}" if req.eps is not None else ""),
                               "note": ""})
            continue
        for _, row in rows.iterrows():
            out.append(base | judge_row(req.metric, req.value, row, evaluations))
    return out


def judge_row(metric: str, required: float, row: Mapping | pd.Series, evaluations: Sequence[Mapping]) -> dict:
    """The judgement of one summary row against `metric >= required`.

    basis: "certified" where a robust-accuracy requirement is met by the certified lower bound at that
    threat model (or the requirement is on certified_accuracy), "attacked" for the attacks' figure,
    None for the other metrics."""
    observed = _float(row.get(metric))
    n = int(row["n"]) if _finite(row.get("n")) else None
    clean = metric == "clean_accuracy"
    evaluation = None if clean else find(evaluations, str(row["model"]), str(row["norm"]), row.get("eps"),
                                         str(row["targeted"]))
    outcome, reason = judge(metric, observed, required, evaluation)
    low_high = interval(observed, n) if metric in FRACTION_METRICS else None
    note = noise_note(metric, required, low_high)
    basis = {"robust_accuracy": ATTACKED_BASIS, "certified_accuracy": CERTIFIED_BASIS}.get(metric)
    proven = certified_basis(required, evaluation) if metric == "robust_accuracy" else ""
    if proven:  # the lower bound meets it: robust accuracy >= certified >= required, whatever the attacks
        outcome, reason, note, basis = MEETS, "", proven, CERTIFIED_BASIS
    described = None if clean else status_label(evaluation)
    if metric == "certified_accuracy":  # a proof: the attacks' evaluation status does not bear on it
        described = f"certificate: {str(row['attack'])[len(CERTIFIED):]}"
    return {"model": str(row["model"]), "attack": None if clean else str(row["attack"]),
            "norm": None if clean else str(row["norm"]), "eps": None if clean else _float(row.get("eps")),
            "targeted": None if clean else str(row["targeted"]), "observed": observed, "n": n,
            "interval": list(low_high) if low_high else None,
            "status": None if evaluation is None else evaluation.get("status"),
            "evaluation": described, "outcome": outcome,
            "passed": outcome == MEETS, "reason": reason, "note": note, "basis": basis}


def worst_case_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The worst-case row of every (model, norm, eps, targeted); where the audit wrote none (one attack
    ran at that eps) the attack rows themselves (each is then the worst case, or must pass)."""
    if not len(rows):
        return rows
    worst = rows[rows["attack"] == WORST_CASE]
    have = {(str(r.model), str(r.norm), str(r.targeted), round(float(r.eps), 12)) for r in worst.itertuples()}
    alone = [block for key, block in rows[rows["attack"] != WORST_CASE].groupby(
        ["model", "norm", "targeted", "eps"], sort=False)
        if (str(key[0]), str(key[1]), str(key[2]), round(float(key[3]), 12)) not in have]
    return pd.concat([worst, *alone]) if alone else worst


def outcome_label(judgement: Mapping) -> str:
    """'meets', 'meets: certified' (the certified lower bound met it), 'does not meet',
    'cannot be judged (not established (failed checks: gradients))'."""
    outcome = str(judgement.get("outcome"))
    if outcome == MEETS and judgement.get("basis") == CERTIFIED_BASIS and judgement.get("metric") == "robust_accuracy":
        return f"{MEETS}: {CERTIFIED_BASIS}"
    return outcome + (f" ({judgement['reason']})" if outcome == CANNOT_JUDGE and judgement.get("reason") else "")


# ---------------------------------------------------------------------------- text
def figure_text(record: Mapping | None) -> str:
    """'50.9% [46.3%, 55.5%] n=450': the figure, its interval and its sample count."""
    if not record or not _finite(record.get("robust_accuracy")):
        return "-"
    text = f"{float(record['robust_accuracy']):.1%}"
    low_high = record.get("interval")
    if low_high:
        text += f" [{float(low_high[0]):.1%}, {float(low_high[1]):.1%}]"
    return text + (f" n={int(record['n'])}" if record.get("n") is not None else "")


def requirement_text(judged: Sequence[Mapping]) -> str:
    """One cell: the outcome of every requirement on one threat model ('-' when none reads it)."""
    if not judged:
        return "-"
    return "; ".join(f"{outcome_label(j)} {j.get('requirement')}" for j in judged)


def certified_text(record: Mapping | None) -> str:
    """'certified >= 41.0% [36.5%, 45.7%] (crown) · attacked 46.9%': the bracket of one threat model,
    or '' without a certificate."""
    if not record or not _finite(record.get("certified_accuracy")):
        return ""
    text = f"certified >= {float(record['certified_accuracy']):.1%}"
    low_high = record.get("certified_interval")
    if low_high:
        text += f" [{float(low_high[0]):.1%}, {float(low_high[1]):.1%}]"
    text += f" ({record.get('certified_method') or 'certificate'})"
    if _finite(record.get("robust_accuracy")):
        text += f" · attacked {float(record['robust_accuracy']):.1%}"
    return text


def for_threat_model(judged: Sequence[Mapping], record: Mapping) -> list[dict]:
    """The robust- and certified-accuracy judgements that read this evaluation record's threat model."""
    return [dict(j) for j in judged if j.get("metric") in INTERVAL_METRICS and j.get("model") == record.get("model")
            and str(j.get("targeted")) == str(record.get("targeted")) and same_eps(j.get("eps"), record.get("eps"))
            and (j.get("norm") is None or str(j.get("norm")) == str(record.get("norm")))]


def format_verdicts(evaluations: Sequence[Mapping], judged: Sequence[Mapping]) -> str:
    """The CLI's verdict table: per threat model the figure, the evaluation status, the requirement."""
    if not evaluations:
        return "Verdict: no budgeted results."
    certified = any(_finite(v.get("certified_accuracy")) for v in evaluations)
    header = ["model", "threat model", f"worst-case robust accuracy [{CONFIDENCE:.0%} CI]"] + \
        ([f"certified lower bound [{CONFIDENCE:.0%} CI]"] if certified else []) + ["evaluation", "requirement"]
    body = []
    for v in evaluations:
        mode = "untargeted" if str(v.get("targeted")) == "none" else f"targeted: {v.get('targeted')}"
        bound = [(certified_text({k: x for k, x in v.items() if k != "robust_accuracy"}) or "-")] \
            if certified else []
        body.append([str(v.get("model")), f"{v.get('norm')} eps={float(v['eps']):g} ({mode})", figure_text(v),
                     *bound, status_label(v),
                     requirement_text(for_threat_model(judged, v)) if judged else NO_REQUIREMENT])
    widths = [max(len(header[i]), *(len(r[i]) for r in body)) for i in range(len(header))]
    line = lambda cells: "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    title = "worst case over every attack; " + ("certified lower bound; " if certified else "")
    lines = [f"Verdict ({title}evaluation status; requirement):", line(header)]
    lines += [line(r) for r in body]
    if not judged:
        lines.append(f"  {NO_REQUIREMENT}: these figures are measurements, not a pass; set one with "
                     "--require METRIC>=VALUE[@EPS] or [tool.robustlab] require = [...]")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- migration
def upgrade_metadata(metadata: dict, summary: pd.DataFrame) -> dict:
    """Metadata of a robustlab.results/1 file in the /2 vocabulary: `verdict` (robust / not robust /
    robustness not established) becomes `evaluation`, `thresholds` become `requirements` (re-judged)."""
    meta = dict(metadata)
    old_verdicts = meta.pop("verdict", None)
    thresholds = meta.pop("thresholds", None)
    norms = {str(v.get("norm")) for v in old_verdicts or [] if isinstance(v, Mapping)}
    evaluations = evaluate(summary, check_results(meta), level=checks_level(meta))
    if norms:
        evaluations = [v for v in evaluations if v["norm"] in norms]
    meta["evaluation"] = evaluations
    if isinstance(thresholds, list):
        specs = []
        for t in thresholds:
            if not isinstance(t, Mapping) or t.get("metric") not in REQUIREMENT_METRICS:
                continue
            eps = t.get("eps") if t.get("metric") != "clean_accuracy" else None
            spec = Requirement(str(t["metric"]), float(t["value"]),
                               None if "at eps=" not in str(t.get("description", "")) else _float(eps),
                               source="--fail-under")
            if spec not in specs:
                specs.append(spec)
        meta["requirements"] = judge_requirements(summary, evaluations, specs)
    meta["migrated_from"] = "robustlab.results/1"
    return meta


# ---------------------------------------------------------------------------- helpers
def _finite(value: Any) -> bool:
    try:
        return value is not None and value is not pd.NA and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _float(value: Any) -> float | None:
    return float(value) if _finite(value) else None
