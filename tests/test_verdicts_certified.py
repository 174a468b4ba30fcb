"""Verdicts, requirements and gates on certified accuracy (issue 16): the certified lower bound beside
the attacked figure at each threat model, "meets: certified" where the bound itself meets a
robust-accuracy requirement, and requirements/gates on certified_accuracy, refused before any work
in a run without certificates. Hand-built summaries: no model, no torch."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from robustlab import gates
from robustlab import verdicts as V
from robustlab.errors import InputError
from robustlab.results import SUMMARY_COLUMNS, WORST_CASE, AuditResult, sample_frame

N = 200
NAN = float("nan")


def row(attack: str, eps: float, robust: float = NAN, certified: float = NAN, model: str = "m",
        targeted: str = "none") -> dict:
    base = dict.fromkeys(SUMMARY_COLUMNS, NAN)
    return base | {"model": model, "attack": attack, "norm": "linf", "eps": eps, "targeted": targeted, "n": N,
                   "clean_accuracy": 0.95, "robust_accuracy": robust, "certified_accuracy": certified}


def summary(*extra: dict) -> pd.DataFrame:
    """pgd and the cascade at eps 0.05 and 0.1, untargeted and targeted; CROWN certificates untargeted."""
    rows = [row("pgd", 0.05, 0.70), row("cascade", 0.05, 0.66), row(WORST_CASE, 0.05, 0.65, 0.52),
            row("certified:crown", 0.05, certified=0.52),
            row("pgd", 0.1, 0.50), row("cascade", 0.1, 0.47), row(WORST_CASE, 0.1, 0.46, 0.30),
            row("certified:crown", 0.1, certified=0.30),
            row("pgd", 0.1, 0.60, targeted="next")] + list(extra)
    return pd.DataFrame.from_records(rows, columns=SUMMARY_COLUMNS)


def result(frame: pd.DataFrame, failed: tuple[str, ...] = ()) -> AuditResult:
    checks = [{"check": c, "model": "m", "norm": None, "eps": None, "targeted": None, "status": "fail"}
              for c in failed]
    metadata = {"checks": {"level": "default", "results": checks}}
    metadata["evaluation"] = V.evaluate(frame, checks, level="default")
    return AuditResult(summary=frame, samples=sample_frame({}), metadata=metadata)


def judged(res: AuditResult, text: str) -> list[dict]:
    return gates.judge_requirements(res, [text])


# ---------------------------------------------------------------------------- evaluation records
def test_each_untargeted_record_carries_its_certified_lower_bound_and_certificates_make_no_record():
    records = V.evaluate(summary(), [], level="default")
    assert [(r["eps"], r["targeted"]) for r in records] == [(0.05, "none"), (0.1, "none"), (0.1, "next")]
    first, second, targeted = records
    assert first["robust_accuracy"] == 0.65 and first["certified_accuracy"] == 0.52
    assert first["certified_count"] == 104 and first["certified_method"] == "crown"
    assert first["certified_interval"] == pytest.approx(list(V.wilson(104, N)))
    assert second["certified_accuracy"] == 0.30
    assert "certified_accuracy" not in targeted  # certificates are of the untargeted threat model
    assert all("certified:crown" not in r["attacks"] for r in records)
    assert first["status"] == V.ESTABLISHED  # a certificate row is not an attack: it changes no status


def test_the_highest_of_several_certificates_is_the_bound_and_other_models_get_none():
    frame = summary(row("certified:ibp", 0.05, certified=0.40), row("certified:ibp", 0.1, certified=0.35),
                    row("pgd", 0.05, 0.9, model="other"))
    records = {(r["model"], r["eps"], r["targeted"]): r for r in V.evaluate(frame, [], level="default")}
    assert records[("m", 0.05, "none")]["certified_method"] == "crown"  # 0.52 > IBP's 0.40
    assert records[("m", 0.1, "none")]["certified_accuracy"] == 0.35
    assert records[("m", 0.1, "none")]["certified_method"] == "ibp"
    assert "certified_accuracy" not in records[("other", 0.05, "none")]


def test_certified_text_shows_the_bound_its_interval_method_and_the_attacked_figure():
    record = V.evaluate(summary(), [], level="default")[0]
    low, high = V.wilson(104, N)
    assert V.certified_text(record) == f"certified >= 52.0% [{low:.1%}, {high:.1%}] (crown) · attacked 65.0%"
    assert V.certified_text({"robust_accuracy": 0.5}) == ""
    table = V.format_verdicts(V.evaluate(summary(), [], level="default"), [])
    assert "certified lower bound [95% CI]" in table
    assert f"certified >= 52.0% [{low:.1%}, {high:.1%}] (crown)" in table
    assert "certified lower bound" not in V.format_verdicts(V.evaluate(summary()[:3], [], level="default"), [])


# ---------------------------------------------------------------------------- robust-accuracy requirements
def test_a_requirement_the_certified_bound_meets_reads_meets_certified():
    res = result(summary())
    (j,) = judged(res, "robust_accuracy>=0.5@0.05")
    assert (j["outcome"], j["basis"], j["passed"]) == (V.MEETS, V.CERTIFIED_BASIS, True)
    assert V.outcome_label(j) == "meets: certified"
    assert "certified >= 52.0% (crown)" in j["note"] and "proven lower bound" in j["note"]
    (j,) = judged(res, "robust_accuracy>=0.6@0.05")  # attacked 0.65 meets it, certified 0.52 does not
    assert (j["outcome"], j["basis"], V.outcome_label(j)) == (V.MEETS, V.ATTACKED_BASIS, "meets")
    (j,) = judged(res, "robust_accuracy>=0.7@0.05")
    assert (j["outcome"], j["basis"]) == (V.DOES_NOT_MEET, V.ATTACKED_BASIS)
    assert "meets: certified robust_accuracy >= 0.5" in V.requirement_text(judged(res, "robust_accuracy>=0.5@0.05"))


def test_a_proof_meets_a_requirement_even_where_the_attacks_are_not_established():
    res = result(summary(), failed=("gradients",))
    assert all(r["status"] == V.NOT_ESTABLISHED for r in res.metadata["evaluation"])
    (proven,) = judged(res, "robust_accuracy>=0.5@0.05")
    assert (proven["outcome"], proven["basis"]) == (V.MEETS, V.CERTIFIED_BASIS)
    (unproven,) = judged(res, "robust_accuracy>=0.6@0.05")  # above the bound: the attacks' figure, not trusted
    assert unproven["outcome"] == V.CANNOT_JUDGE and "gradients" in unproven["reason"]


def test_a_smoothing_certificate_is_said_to_hold_with_probability_1_minus_alpha():
    frame = summary(row("eot-pgd", 0.05, 0.8, model="m+smoothing0.25"),
                    row(WORST_CASE, 0.05, 0.8, 0.7, model="m+smoothing0.25"),
                    row("certified:smoothing(sigma=0.25)", 0.05, certified=0.7, model="m+smoothing0.25"))
    res = result(frame)
    judgements = [j for j in judged(res, "robust_accuracy>=0.6@0.05") if j["model"] == "m+smoothing0.25"]
    assert len(judgements) == 1 and V.outcome_label(judgements[0]) == "meets: certified"
    assert "smoothing(sigma=0.25)" in judgements[0]["note"] and "1 - alpha" in judgements[0]["note"]


# ---------------------------------------------------------------------------- certified-accuracy requirements
@pytest.mark.parametrize("text,value,eps", [("certified_accuracy>=0.4@0.1", 0.4, 0.1),
                                             ("certified_accuracy >= 40% @ 1/10", 0.4, 0.1),
                                             ("certified_accuracy=0.25", 0.25, None)])
def test_certified_accuracy_requirements_parse(text, value, eps):
    req = V.parse_requirement(text)
    assert (req.metric, req.value) == ("certified_accuracy", pytest.approx(value))
    assert req.eps == (None if eps is None else pytest.approx(eps))


def test_a_certified_accuracy_above_one_is_refused_naming_the_argument():
    with pytest.raises(InputError, match="certified_accuracy is a fraction") as error:
        V.parse_requirement("certified_accuracy>=1.5@0.1")
    assert error.value.argument == "--require"


def test_certified_accuracy_requirements_are_judged_on_the_certificate_rows():
    res = result(summary())
    (j,) = judged(res, "certified_accuracy>=0.5@0.05")
    assert (j["attack"], j["observed"], j["outcome"], j["passed"]) == ("certified:crown", 0.52, V.MEETS, True)
    assert j["interval"] == pytest.approx(list(V.wilson(104, N)))
    assert j["evaluation"] == "certificate: crown" and V.outcome_label(j) == "meets"
    assert "within sampling noise" in j["note"]  # 0.5 lies inside 52.0%'s interval over 200 samples
    both = judged(res, "certified_accuracy>=0.4")  # every eps: 0.52 meets, 0.30 does not
    assert [(j["eps"], j["outcome"]) for j in both] == [(0.05, V.MEETS), (0.1, V.DOES_NOT_MEET)]
    # a requirement on certified_accuracy reads no attack row, and the attacks' requirements no certificate row
    assert all(j["attack"] == "certified:crown" for j in both)
    attacked = judged(res, "robust_accuracy>=0.1")
    assert [(j["attack"], j["targeted"]) for j in attacked] == [(WORST_CASE, "none")] * 2 + [("pgd", "next")]
    assert all(j["attack"] != "certified:crown" for j in judged(res, "median_l2>=0.1"))


def test_certified_accuracy_without_certificate_rows_cannot_be_judged():
    frame = summary()
    res = result(frame[~frame["attack"].str.startswith("certified:")].reset_index(drop=True))
    (j,) = judged(res, "certified_accuracy>=0.4@0.1")
    assert j["outcome"] == V.CANNOT_JUDGE and not j["passed"]
    assert "no certificate rows" in j["reason"] and "certify=" in j["reason"]


def test_certified_accuracy_requirements_are_refused_before_work_without_certificates():
    reqs = [V.parse_requirement("robust_accuracy>=0.5@0.1"), V.parse_requirement("certified_accuracy>=0.4@0.1")]
    for certify in (None, "none", ""):
        with pytest.raises(InputError, match="needs certificates: add --certify ibp") as error:
            gates.check_certify(certify=certify, requirements=reqs)
        assert error.value.argument == "--require"
        assert "certified_accuracy >= 0.4 at eps=0.1" in str(error.value)
    gates.check_certify(certify="crown", requirements=reqs)
    gates.check_certify(certify=None, requirements=reqs[:1])  # no certified requirement: nothing to refuse
    with pytest.raises(InputError) as error:
        gates.check_certify(certify=None, min_certified_accuracy=0.4, argument="certify=")
    assert error.value.argument == "min_certified_accuracy" and "certify='ibp'" in str(error.value)
    gates.check_certify(certify="smoothing:0.25", min_certified_accuracy=0.4)


def test_a_pyproject_requirement_on_certified_accuracy_parses_and_names_its_file_when_refused(tmp_path):
    path = tmp_path / "pyproject.toml"
    path.write_text('[tool.robustlab]\nrequire = ["certified_accuracy>=0.4@0.1", "robust_accuracy>=0.5@0.1"]\n')
    reqs = gates.requirements_file(path)
    assert [r.metric for r in reqs] == ["certified_accuracy", "robust_accuracy"]
    with pytest.raises(InputError) as error:
        gates.check_certify(certify=None, requirements=reqs)
    assert error.value.argument == f"{path} [tool.robustlab] require"


# ---------------------------------------------------------------------------- gates (pytest plugin, API)
def test_gate_on_certified_accuracy_reads_the_certificate_row_of_each_gated_eps():
    res = result(summary())
    checks = gates.evaluate_robust(res, eps=(0.05, 0.1), min_certified_accuracy=0.4)
    assert [(c.kind, c.attack, c.eps, c.measured, c.passed) for c in checks] == [
        ("min_certified_accuracy", "certified:crown", 0.05, 0.52, True),
        ("min_certified_accuracy", "certified:crown", 0.1, 0.30, False)]
    with pytest.raises(gates.RobustnessGateError) as error:
        gates.assert_robust(res, eps=0.1, min_accuracy=0.4, min_certified_accuracy=0.4)
    message = str(error.value)
    assert "1 of 2 checks failed" in message
    assert "FAIL model 'm', attack certified:crown at linf eps=0.1 (untargeted): certified_accuracy measured 0.3, " \
           "required >= 0.4 (min_certified_accuracy): does not meet" in message
    passed = gates.assert_robust(res, eps=0.05, min_accuracy=0.5, min_certified_accuracy=0.5)
    assert [c.kind for c in passed] == ["min_accuracy", "min_certified_accuracy"]
    assert passed[0].proven and ": meets: certified" in passed[0].line()  # the bound meets the robust threshold
    assert passed[0].judgement()["basis"] == V.CERTIFIED_BASIS
    assert passed[1].judgement()["metric"] == "certified_accuracy"


def test_gate_on_certified_accuracy_refuses_results_without_certificates_and_targeted_modes():
    frame = summary()
    bare = result(frame[~frame["attack"].str.startswith("certified:")].reset_index(drop=True))
    with pytest.raises(InputError, match="no certificate rows") as error:
        gates.evaluate_robust(bare, eps=0.1, min_certified_accuracy=0.4)
    assert error.value.argument == "min_certified_accuracy"
    with pytest.raises(InputError, match="untargeted"):
        gates.evaluate_robust(result(frame), eps=0.1, min_certified_accuracy=0.4, targeted="next", attack="pgd")
    with pytest.raises(InputError, match="fraction"):
        gates.evaluate_robust(result(frame), eps=0.1, min_certified_accuracy=1.2)


def test_a_model_the_audit_could_not_certify_cannot_pass_a_certified_gate():
    frame = summary(row("pgd", 0.1, 0.9, model="big"), row(WORST_CASE, 0.1, 0.9, model="big"))
    checks = gates.evaluate_robust(result(frame), eps=0.1, min_certified_accuracy=0.2)
    by_model = {c.model: c for c in checks}
    assert by_model["m"].passed and by_model["m"].measured == 0.30
    unproven = by_model["big"]
    assert not unproven.passed and unproven.outcome == V.CANNOT_JUDGE and math.isnan(unproven.measured)
    assert "no certificate of this threat model" in unproven.note
