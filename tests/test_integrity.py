"""Integrity checks (robustlab.integrity) and the evaluation status they decide (robustlab.verdicts),
on a zoo of models with known answers.

Flagged models (tests/integrity_zoo.py) must never have an established figure (nor can a requirement
be judged on it), the check that names their flaw must fail, and the adaptive attack must bring their robust accuracy to at most the undefended
CNN's + ADAPTIVE_SLACK. Honest models (plain CNN, PGD-trained CNN) must fail no check, on three
disjoint slices of the test data with three seeds.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap
import warnings
from types import SimpleNamespace

import pytest
import torch

import robustlab
from robustlab import gates
from robustlab.data import Dataset, digits_split
from robustlab.errors import InputError
from robustlab.model import RobustlabWarning
from robustlab import verdicts as V
from robustlab.integrity import format_checks
from robustlab.integrity.base import ModeEvidence
from robustlab.integrity.comparisons import eps_monotonic
from robustlab.integrity.stats import sign_test_p, wilson
import integrity_zoo as zoo

pytestmark = pytest.mark.usefixtures("one_thread")

N = 100
EPS = (0.05, 0.1)
ADAPTIVE_SLACK = 0.05  # adaptive robust accuracy of a flagged model <= undefended CNN's + 5 points


def _slice(seed: int) -> Dataset:
    data = digits_split("test")
    a, b = N * seed, N * (seed + 1)
    return Dataset(data.x[a:b], data.y[a:b], data.source, data.classes, data.indices[a:b])


@functools.lru_cache(maxsize=None)
def audited(name: str, seed: int = 0, checks: str = "default"):
    builder = {**zoo.FLAGGED, **zoo.HONEST}[name]
    options = dict(output="probs") if name == "softmax" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RobustlabWarning)  # random-noise: "forward pass is not deterministic"
        return robustlab.audit(builder(), _slice(seed), attacks=("fgsm", "pgd", "cw"), suite="none", eps=EPS, seed=seed, name=name,
                               checks=checks, progress=False, **options)


def failed(result) -> set[str]:
    return {c["check"] for c in result.metadata["checks"]["results"] if c["status"] == "fail"}


# ---------------------------------------------------------------------------- statistics
def test_statistics_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(0, 0), (3, 0), (10, 0), (12, 3), (5, 9), (40, 25)]:
        expected = stats.binomtest(b, b + c, 0.5, alternative="greater").pvalue if b + c else 1.0
        assert sign_test_p(b, c) == pytest.approx(expected, rel=1e-9)
    for k, n in [(0, 64), (5, 64), (64, 64), (30, 100)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.99, method="wilson")
        assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=2e-4)
        # the verdicts' interval is the 95% one
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert V.wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-6)


# ---------------------------------------------------------------------------- check 1 on synthetic results
def _evidence(robust_by_eps: dict[float, float], n: int = 200) -> ModeEvidence:
    """One attack ('pgd') whose per-sample robust set at each eps is the first share * n samples."""
    ev = ModeEvidence(mode="none", target_sets=[], masks=torch.ones(1, n, dtype=torch.bool))
    for eps, share in robust_by_eps.items():
        robust = (torch.arange(n) < int(share * n)).reshape(1, n)
        ev.robust[("pgd", eps)] = robust
        ev.success[("pgd", eps)] = ~robust
    return ev


def test_eps_monotonic_fires_when_robust_accuracy_rises_with_eps():
    ctx = SimpleNamespace(mut=SimpleNamespace(name="m"), eps=[0.1, 0.2], norm="linf", via_transfer=False)
    rising = eps_monotonic(ctx, _evidence({0.1: 0.3, 0.2: 0.8}), ["pgd"])
    assert rising.status == "fail" and rising.eps is None and rising.targeted == "none"
    assert rising.evidence["smallest_p"] < rising.evidence["alpha"]
    assert eps_monotonic(ctx, _evidence({0.1: 0.8, 0.2: 0.3}), ["pgd"]).status == "pass"
    # a rise within noise (2 samples of 200) does not fire
    assert eps_monotonic(ctx, _evidence({0.1: 0.50, 0.2: 0.51}), ["pgd"]).status == "pass"
    # the evaluation: the check fired: not established at both eps, whatever the figures
    import pandas as pd

    summary = pd.DataFrame([{"model": "m", "attack": "pgd", "norm": "linf", "eps": e, "targeted": "none", "n": 200,
                             "clean_accuracy": 0.9, "robust_accuracy": r} for e, r in ((0.1, 0.5), (0.2, 0.8))])
    evaluations = V.evaluate(summary, [rising.to_dict()], level="default", norm="linf")
    assert [v["status"] for v in evaluations] == [V.NOT_ESTABLISHED, V.NOT_ESTABLISHED]
    assert evaluations[0]["failed_checks"] == ["eps-monotonic"]
    assert evaluations[0]["reasons"] == ["eps-monotonic", V.SUITE_REASONS["none"]]
    assert evaluations[0]["interval"] == pytest.approx(list(V.wilson(100, 200)))
    # with the standard cascade's row and no failed check: established (a figure, never a "robust")
    with_suite = pd.concat([summary, summary.assign(attack="cascade")], ignore_index=True)
    assert [v["status"] for v in V.evaluate(with_suite, [], level="default")] == [V.ESTABLISHED, V.ESTABLISHED]
    assert [v["reasons"] for v in V.evaluate(with_suite, [rising.to_dict()], level="default")][0] == ["eps-monotonic"]
    # the quick suite, or no checks: weaker than standard, with the reason
    quick = V.evaluate(summary.assign(attack="cascade-quick"), [], level="default")[0]
    assert quick["status"] == V.WEAKER and quick["reasons"] == [V.SUITE_REASONS["quick"]]
    unchecked = V.evaluate(with_suite, [], level="none")[0]
    assert unchecked["status"] == V.WEAKER and unchecked["reasons"] == [V.CHECKS_REASON]
    # however low the figure, a failed check leaves it not established (no "not robust" short cut)
    summary.loc[0, "robust_accuracy"] = 0.1
    assert V.evaluate(summary, [rising.to_dict()], level="default")[0]["status"] == V.NOT_ESTABLISHED


# ---------------------------------------------------------------------------- the zoo
EXPECTED = {  # the check that names each flaw, and the adaptive attack that must have run
    "quantised": ("gradients", "pgd-bpda"),
    "gradient-killer": ("gradients", "pgd-bpda"),
    "random-noise": ("determinism", "pgd-eot"),
    "softmax": ("logits", "pgd-margin"),
    "distilled": ("margin-vs-ce", "pgd-margin"),
}


@pytest.mark.parametrize("name", list(zoo.FLAGGED))
def test_flagged_models_are_never_called_robust(name):
    result = audited(name)
    check, attack = EXPECTED[name]
    assert check in failed(result), result.metadata["checks"]["results"]
    evaluations = result.metadata["evaluation"]
    assert {v["eps"] for v in evaluations} == set(EPS)
    assert all(v["status"] == V.NOT_ESTABLISHED for v in evaluations), evaluations
    assert all(check in v["failed_checks"] for v in evaluations)
    # so no requirement can be judged on them, however low
    for judged in gates.judge_requirements(result, ["robust_accuracy>=0", "robust_accuracy>=0.99"]):
        assert judged["outcome"] == V.CANNOT_JUDGE and not judged["passed"], judged
    assert attack in set(result.summary["attack"])
    # the adaptive attack's rows are in the worst case, which is no better than the undefended CNN's
    undefended = audited("plain").robust_accuracy(eps=0.1)
    adaptive = result.robust_accuracy(eps=0.1)
    assert adaptive <= undefended + ADAPTIVE_SLACK, (adaptive, undefended)
    for v in evaluations:
        assert v["robust_accuracy"] == pytest.approx(result.robust_accuracy(eps=v["eps"]))


@pytest.mark.parametrize("name", ["quantised", "gradient-killer"])
def test_masked_gradients_inflate_plain_attacks_and_bpda_undoes_it(name):
    result = audited(name)
    s = result.summary
    plain = s[s["attack"].isin(["fgsm", "pgd", "cw"]) & (s["eps"] == 0.1)]["robust_accuracy"]
    assert plain.min() > 0.9  # the gradient attacks are blind ...
    bpda = s[(s["attack"] == "pgd-bpda") & (s["eps"] == 0.1)]["robust_accuracy"].item()
    assert bpda < 0.7  # ... BPDA is not
    unbounded = next(c for c in result.metadata["checks"]["results"] if c["check"] == "unbounded")
    assert unbounded["status"] == "fail" and unbounded["evidence"]["pgd_success_rate"] < 0.5
    adaptive = [a for a in result.metadata["checks"]["adaptive"] if a["attack"] == "pgd-bpda"]
    assert adaptive and adaptive[0]["evaluated_by"] == "transfer to the audited model"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(zoo.HONEST))
def test_honest_models_fail_no_check(name, seed):
    result = audited(name, seed)
    assert not failed(result), [c for c in result.metadata["checks"]["results"] if c["status"] == "fail"]
    for v in result.metadata["evaluation"]:
        # suite="none" (to keep this fast): weaker than standard, whatever the figure;
        # test_standard_suite_establishes_an_honest_models_figure covers "established".
        assert v["failed_checks"] == [] and v["status"] == V.WEAKER and v["reasons"] == [V.SUITE_REASONS["none"]]
    ran = {c["check"] for c in result.metadata["checks"]["results"] if c["status"] == "pass"}
    assert {"gradients", "logits", "determinism", "unbounded", "eps-monotonic", "iterative-vs-single-step",
            "margin-vs-ce", "convergence"} <= ran
    # the black-box probe ran at every eps, but a 300-query Square finding little is no evidence, and without
    # the standard cascade no published Square covered the rows: inconclusive, never a pass
    black_box = [c for c in result.metadata["checks"]["results"] if c["check"] == "black-box"]
    assert {c["eps"] for c in black_box} == set(EPS)
    for c in black_box:
        assert c["status"] == "skipped" and c["explanation"].startswith("Inconclusive"), c
        assert c["evidence"]["probed"] > 0 and c["evidence"]["square_queries"] == 300


def test_standard_suite_establishes_an_honest_models_figure():
    """"established" needs the standard cascade at that threat model; the same audit without it is weaker."""
    data = _slice(0).head(30)
    kwargs = dict(attacks=("fgsm", "pgd"), eps=(0.05,), progress=False, name="pgd-trained")
    standard = robustlab.audit(zoo.pgd_trained(), data, suite="standard", **kwargs)
    [v] = standard.metadata["evaluation"]
    assert "cascade" in v["attacks"] and v["status"] == V.ESTABLISHED and v["reasons"] == [], v
    weaker = robustlab.audit(zoo.pgd_trained(), data, suite="quick", **kwargs)
    [w] = weaker.metadata["evaluation"]
    assert w["status"] == V.WEAKER and w["reasons"] == [V.SUITE_REASONS["quick"]]
    # the weaker suite's figure may still be gated (it is an upper bound), and the gate says so
    [check] = robustlab.assert_robust(weaker, eps=0.05, min_accuracy=0.1)
    assert check.outcome == V.MEETS and check.evaluation == "weaker than standard (quick attack suite)"


def test_strict_runs_the_costly_checks_in_full():
    model = zoo.plain()
    result = robustlab.audit(model, _slice(0).head(40), attacks=("fgsm", "pgd", "cw"), suite="none", eps=(0.05,), checks="strict",
                             surrogate=zoo.pgd_trained(), progress=False)
    assert result.metadata["checks"]["level"] == "strict"
    black_box = next(c for c in result.metadata["checks"]["results"] if c["check"] == "black-box")
    assert black_box["status"] == "pass"
    assert black_box["evidence"]["probed"] == black_box["evidence"]["robust_rows"]  # every robust row, not a subset
    assert "transfer_broken" in black_box["evidence"]


# ---------------------------------------------------------------------------- switches, persistence, faces
def test_checks_none_is_weaker_than_standard():
    result = robustlab.audit(zoo.plain(), _slice(0).head(20), attacks=("fgsm",), suite="none", eps=(0.1,), checks="none",
                             progress=False)
    assert result.metadata["checks"] == {"level": "none"} and "verdict" not in result.metadata
    assert set(result.summary["attack"]) == {"fgsm"}
    [v] = result.metadata["evaluation"]
    assert v["status"] == V.WEAKER and v["reasons"] == [V.SUITE_REASONS["none"], V.CHECKS_REASON]
    assert gates.evaluation(result) == "weaker than standard (no attack suite; integrity checks not run)"
    assert "not run" in format_checks(result)
    with pytest.raises(InputError, match="checks"):
        robustlab.audit(zoo.plain(), _slice(0).head(20), attacks=("fgsm",), suite="none", eps=(0.1,), checks="sometimes")


def test_evaluation_and_checks_survive_save_and_load_and_render_without_torch(tmp_path):
    result = audited("quantised")
    result.save(tmp_path / "q")
    loaded = robustlab.load(tmp_path / "q")
    assert loaded.metadata["evaluation"] == json.loads(json.dumps(result.metadata["evaluation"]))
    assert loaded.metadata["checks"]["results"] == json.loads(json.dumps(result.metadata["checks"]["results"]))
    [judged] = gates.judge_requirements(loaded, ["robust_accuracy>=0.1@0.05"])
    assert judged["outcome"] == V.CANNOT_JUDGE and "gradients" in judged["reason"]
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any torch import now fails
        from robustlab.reports import render, write_summary
        html = render({str(tmp_path / 'q')!r}).read_text()
        md = write_summary({str(tmp_path / 'q')!r}).read_text()
        print("HTML-ESTABLISHED", "not established" in html, "Loss gradients are usable" in html,
              "Integrity checks: not run" in html)
        print("MD-ESTABLISHED", "not established" in md, "Verdict per threat model" in md, "pgd-bpda" in md)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "HTML-ESTABLISHED True True False" in out and "MD-ESTABLISHED True True True" in out


def test_gates_never_pass_where_the_evaluation_is_not_established():
    quantised = audited("quantised")
    at_005 = next(v for v in quantised.metadata["evaluation"] if v["eps"] == 0.05)
    assert at_005["status"] == V.NOT_ESTABLISHED and at_005["robust_accuracy"] > 0.9
    with pytest.raises(gates.RobustnessGateError, match="cannot be judged") as caught:
        robustlab.assert_robust(quantised, eps=0.05, min_accuracy=0.1)
    assert "evaluation: not established (failed checks:" in str(caught.value) and "gradients" in str(caught.value)
    # a per-attack gate on a model whose check failed cannot be judged either
    distilled = audited("distilled")
    pgd = distilled.robust_accuracy(attack="pgd", eps=0.1)
    with pytest.raises(gates.RobustnessGateError, match="cannot be judged.*margin-vs-ce"):
        robustlab.assert_robust(distilled, attack="pgd", eps=0.1, min_accuracy=min(pgd, 0.3))
    # an honest model is judged where no check failed (its evaluation: weaker, the suite of this fast audit)
    plain = audited("plain")
    [check] = robustlab.assert_robust(plain, eps=0.05, min_accuracy=0.5)
    assert check.outcome == V.MEETS
    assert gates.evaluation(plain, eps=0.05) == "weaker than standard (no attack suite)"
    with pytest.raises(gates.RobustnessGateError, match="does not meet"):
        robustlab.assert_robust(plain, eps=0.05, min_accuracy=0.999)


def test_format_checks_names_each_failed_check_with_evidence_and_next_step():
    result = audited("gradient-killer")
    text = format_checks(result)
    assert "Integrity checks (default):" in text
    assert "FAILED gradients" in text and "evidence: " in text and "next: Attack with BPDA" in text
    table = V.format_verdicts(result.metadata["evaluation"], [])
    assert "gradient-killer  linf eps=0.05 (untargeted)" in table and "not established (failed checks: " in table
    assert "no requirement set" in table
