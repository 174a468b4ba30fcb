"""The CLI's integrity checks: evaluation status printed, and no requirement (--fail-under, --require) is
judged on a model whose evaluation is not established, however high or low its measured robust accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustlab import gates, load
from robustlab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
ZOO = str(Path(__file__).parent / "integrity_zoo.py")
ARGS = ["--attack", "fgsm,pgd", "--suite", "none", "--eps", "0.05", "--n", "80", "--quiet", "--fail-under", "robust_accuracy=0.5@0.05"]


def test_gradient_killer_threshold_cannot_be_judged(tmp_path, capsys):
    out = tmp_path / "killer"
    assert main(["audit", "--model", f"{ZOO}:gradient_killer", "--out", str(out), *ARGS]) == 1
    printed = capsys.readouterr().out
    assert "not established (failed checks: " in printed and "FAILED gradients" in printed
    line = next(x for x in printed.splitlines() if x.startswith("FAIL  robust_accuracy >= 0.5 at eps=0.05:"))
    assert "gradient_killer worst-case eps=0.05 (untargeted)" in line and "not established (failed checks: " in line
    assert line.endswith("; cannot be judged")
    doc = json.loads((out / "results.json").read_text())
    pgd = next(r for r in doc["summary"] if r["attack"] == "pgd" and r["eps"] == 0.05)
    assert pgd["robust_accuracy"] > 0.9  # the blind attack's figure would have passed
    [judged] = doc["metadata"]["requirements"]
    assert not judged["passed"] and judged["outcome"] == "cannot be judged" and "gradients" in judged["reason"]
    assert any(r["attack"] == "pgd-bpda" for r in doc["summary"])
    # whatever the threshold: the saved results re-judged without a re-run
    for threshold in ("0", "0.01", "0.5", "0.99", "100%"):
        [judged] = gates.judge_requirements(load(out), [f"robust_accuracy>={threshold}@0.05"])
        assert judged["outcome"] == "cannot be judged" and not judged["passed"], judged


def test_honest_model_meets_and_checks_can_be_turned_off(tmp_path, capsys):
    assert main(["audit", "--model", f"{ZOO}:plain", "--out", str(tmp_path / "plain"), *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "pass  robust_accuracy >= 0.5 at eps=0.05" in printed and "; meets" in printed
    doc = json.loads((tmp_path / "plain" / "results.json").read_text())
    # --suite none: no check failed, but without the standard cascade the evaluation is weaker than standard;
    # the requirement is judged on the figure (an upper bound) and says so
    assert [(v["status"], v["reasons"]) for v in doc["metadata"]["evaluation"]] == [("weaker than standard",
                                                                                     ["no attack suite"])]
    [judged] = doc["metadata"]["requirements"]
    assert judged["outcome"] == "meets" and judged["evaluation"] == "weaker than standard (no attack suite)"
    out = tmp_path / "unchecked"
    assert main(["audit", "--model", f"{ZOO}:gradient_killer", "--out", str(out), "--checks", "none", *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "Integrity checks: not run" in printed and "integrity checks not run" in printed
    meta = json.loads((out / "results.json").read_text())["metadata"]
    assert "verdict" not in meta and meta["evaluation"][0]["status"] == "weaker than standard"
