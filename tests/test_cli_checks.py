"""The CLI's integrity checks: verdicts printed, and no --fail-under threshold passes on a model whose
robustness is not established, however high its measured robust accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustlab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
ZOO = str(Path(__file__).parent / "integrity_zoo.py")
ARGS = ["--attack", "fgsm,pgd", "--suite", "none", "--eps", "0.05", "--n", "80", "--quiet", "--fail-under", "robust_accuracy=0.5@0.05"]


def test_gradient_killer_threshold_cannot_pass(tmp_path, capsys):
    out = tmp_path / "killer"
    assert main(["audit", "--model", f"{ZOO}:gradient_killer", "--out", str(out), *ARGS]) == 1
    printed = capsys.readouterr().out
    assert "ROBUSTNESS NOT ESTABLISHED" in printed and "FAILED gradients" in printed
    doc = json.loads((out / "results.json").read_text())
    pgd = next(r for r in doc["summary"] if r["attack"] == "pgd" and r["eps"] == 0.05)
    assert pgd["robust_accuracy"] > 0.9  # the blind attack's figure would have passed
    gate = doc["metadata"]["thresholds"][0]
    assert not gate["passed"] and "not established" in gate["blocked"]
    assert any(r["attack"] == "pgd-bpda" for r in doc["summary"])


def test_honest_model_passes_and_checks_can_be_turned_off(tmp_path, capsys):
    assert main(["audit", "--model", f"{ZOO}:plain", "--out", str(tmp_path / "plain"), *ARGS]) == 0
    assert "pass  robust_accuracy >= 0.5 at eps=0.05" in capsys.readouterr().out
    verdicts = json.loads((tmp_path / "plain" / "results.json").read_text())["metadata"]["verdict"]
    # --suite none: the attacks failed and no check did, but without the standard cascade the verdict
    # can only be "not established"; that alone does not block the threshold
    assert [(v["verdict"], v["reasons"]) for v in verdicts] == [("robustness not established",
                                                                 ["attack suite weaker than standard"])]
    out = tmp_path / "unchecked"
    assert main(["audit", "--model", f"{ZOO}:gradient_killer", "--out", str(out), "--checks", "none", *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "Integrity checks: not run" in printed
    assert "verdict" not in json.loads((out / "results.json").read_text())["metadata"]
