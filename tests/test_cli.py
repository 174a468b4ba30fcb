"""The command line: demo, audit of user models, thresholds, exit codes, nothing half-written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
import torch

from robustlab.cli import main
from support import Softmaxed, digits_model, digits_test

QUICK = ["--attack", "fgsm,pgd", "--suite", "none", "--eps", "0.05,0.1", "--steps", "5", "--n", "30", "--quiet"]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "digits-net.pt"
    torch.jit.trace(digits_model(), digits_test().x[:2]).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """One cache for the demo CNN (trained once) across this module's demo runs."""
    return tmp_path_factory.mktemp("demo-cache")


def test_demo_writes_results_and_prints_table(tmp_path, monkeypatch, capsys, demo_cache):
    monkeypatch.setenv("ROBUSTLAB_CACHE", str(demo_cache))
    out = tmp_path / "demo"
    # one requirement far below the demo CNN's figure at eps 0.1, one far above: exit 1
    assert main(["demo", "--out", str(out), "--n", "20", "--quiet", "--defend", "none", "--explain", "none",
                 "--suite", "quick", "--require", "robust_accuracy>=0.05@0.1", "--require",
                 "robust_accuracy>=95%@0.1"]) == 1
    printed = capsys.readouterr().out
    assert "worst-case" in printed and "eps=0.05" in printed and "eps=0.2" in printed
    # the verdict table: the figure with its interval, the evaluation, the requirement, per threat model
    row = next(line for line in printed.splitlines() if line.startswith("  digits-cnn  linf eps=0.1 (untargeted)"))
    assert re.search(r"\d+\.\d% \[\d+\.\d%, \d+\.\d%\] n=20  +weaker than standard \(quick attack suite\)  +"
                     r"meets robust_accuracy >= 0.05 at eps=0.1; does not meet robust_accuracy >= 0.95 at eps=0.1$",
                     row), row
    assert "pass  robust_accuracy >= 0.05 at eps=0.1: digits-cnn worst-case eps=0.1 (untargeted): " in printed
    assert "FAIL  robust_accuracy >= 0.95 at eps=0.1: digits-cnn worst-case" in printed
    assert not re.search(r"\brobust\b(?![ _]accuracy)", printed, re.IGNORECASE)
    judged = json.loads((out / "results.json").read_text())["metadata"]["requirements"]
    assert [(j["requirement"], j["outcome"]) for j in judged] == [("robust_accuracy >= 0.05 at eps=0.1", "meets"),
                                                                  ("robust_accuracy >= 0.95 at eps=0.1",
                                                                   "does not meet")]
    summary = json.loads((out / "results.json").read_text())["summary"]
    # pgd-margin: the integrity checks' margin-loss PGD, always run with checks on; cascade-quick:
    # the --suite (the default, standard, is the "cascade" row; too slow for this test)
    assert {r["attack"] for r in summary} == {"fgsm", "pgd", "cw", "cascade-quick", "pgd-margin", "worst-case"}
    assert {r["eps"] for r in summary if r["eps"] is not None} == {0.05, 0.1, 0.2}
    cached = demo_cache / "digits-cnn-v2.safetensors"
    first = json.loads((out / "results.json").read_text())["metadata"]["models"]["digits-cnn"]["sha256"]
    stamp = cached.stat().st_mtime_ns
    # the second run reuses the cached model: same file, same hash, no retraining
    assert main(["demo", "--out", str(out), "--n", "5", "--quiet", "--defend", "none", "--explain", "none",
                 "--suite", "none"]) == 0
    again = json.loads((out / "results.json").read_text())["metadata"]["models"]["digits-cnn"]["sha256"]
    assert again == first and cached.stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["summary"][0]["n"] == 5


@pytest.mark.slow
def test_demo_cnn_is_never_called_robust_and_is_judged_against_a_requirement(tmp_path, monkeypatch, capsys,
                                                                             demo_cache):
    """Issue 18: the undefended demo CNN audited as the demo audits it (standard attack suite, default checks; the
    first 150 samples to keep it to minutes). Its figure at Linf eps 0.1 is established and shown with its
    interval, and no word calls it robust; a requirement below the figure is met, one above is not (exit 1).
    (The full demo, 450 samples: 46.9% [42.3%, 51.5%] at eps 0.1, established: robust_accuracy>=0.5@0.1 does
    not meet; the issue's 50.9% predates the stronger worst case of issue 17.)"""
    monkeypatch.setenv("ROBUSTLAB_CACHE", str(demo_cache))
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--n", "150", "--quiet", "--defend", "none", "--explain", "none",
                 "--require", "robust_accuracy>=0.2@0.1", "--require", "robust_accuracy>=0.6@0.1"])
    printed = capsys.readouterr().out
    assert code == 1, printed
    doc = json.loads((out / "results.json").read_text())
    assert {(v["status"], v["suite"]) for v in doc["metadata"]["evaluation"]} == {("established", "standard")}
    at_01 = next(v for v in doc["metadata"]["evaluation"] if v["eps"] == 0.1)
    assert 0.2 < at_01["robust_accuracy"] < 0.6 and at_01["interval"][0] < at_01["robust_accuracy"] < at_01["interval"][1]
    figure = f"{at_01['robust_accuracy']:.1%} [{at_01['interval'][0]:.1%}, {at_01['interval'][1]:.1%}] n=150"
    row = next(line for line in printed.splitlines() if line.startswith("  digits-cnn  linf eps=0.1 (untargeted)"))
    assert re.search(re.escape(figure) + r"  +established  +meets robust_accuracy >= 0.2 at eps=0.1; does not meet "
                     r"robust_accuracy >= 0.6 at eps=0.1$", row), row
    summary = (out / "summary.md").read_text().replace("\\_", "_")  # markdown escapes robust\\_accuracy
    report = (out / "report.html").read_text()
    verdict = re.sub(r"<[^>]+>", " ", report.split('<section id="verdict"')[1].split('<div class="integrity">')[0])
    for text in (printed, summary.split("### Robust accuracy per attack")[0], verdict):
        assert not re.search(r"\brobust\b(?![ _]accuracy)", text, re.IGNORECASE), text
    assert "does not meet" in verdict and "established" in verdict and "95% CI" in verdict


def test_audit_torchscript_with_thresholds(scripted, tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["audit", "--model", scripted, "--data", "digits", "--out", str(out), *QUICK,
                 "--fail-under", "robust_accuracy=0.01", "--fail-under", "clean_accuracy=0.9"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "pass  robust_accuracy >= 0.01" in printed
    meta = json.loads((out / "results.json").read_text())["metadata"]
    assert "digits-net" in meta["models"]
    code = main(["audit", "--model", scripted, "--out", str(out), *QUICK, "--fail-under", "robust_accuracy=0.99@0.1"])
    assert code == 1
    assert "FAIL  robust_accuracy >= 0.99 at eps=0.1" in capsys.readouterr().out


def test_audit_factory_weights_npz_names_and_classes(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in digits_model().state_dict().items()}, str(tmp_path / "w.safetensors"))
    d = digits_test(30)
    np.savez(tmp_path / "d.npz", x=d.x.numpy(), y=d.y.numpy())
    classes = ",".join(f"digit-{i}" for i in range(10))
    out = tmp_path / "r"
    code = main(["audit", "--model", "robustlab.zoo:digits_cnn", "--weights", str(tmp_path / "w.safetensors"),
                 "--data", str(tmp_path / "d.npz"), "--out", str(out), "--name", "mine", "--classes", classes,
                 "--targeted", "next", "--eps", "8/255", "--attack", "pgd", "--steps", "3", "--quiet",
                 "--suite", "quick"])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["metadata"]["models"]["mine"]["classes"][3] == "digit-3"
    assert doc["summary"][0]["eps"] == pytest.approx(8 / 255)
    assert doc["summary"][0]["targeted"] == "next"


@pytest.mark.parametrize("extra, match", [
    (["--eps", "-0.1"], "eps"),
    (["--eps", "8"], "8/255"),
    (["--attack", "deepfool"], "unknown attack"),
    (["--bounds", "1,0"], "bounds"),
    (["--fail-under", "speed=3"], "unknown metric"),
    (["--require", "robust_accuracy>=1.5"], "--require: 'robust_accuracy>=1.5': robust_accuracy is a fraction"),
    (["--require", "robust_accuracy<=0.5"], "--require: 'robust_accuracy<=0.5': a requirement is a floor"),
    (["--require", "robust_accuracy>=0.5@0.3"], "--require: robust_accuracy >= 0.5 at eps=0.3: eps 0.3 is not audited"),
    (["--require", "robust_accuracy>=half"], "the value 'half' is not a number"),
    (["--require", "robust_accuracy>=0.5@"], "nothing after '@'"),
    (["--require", "robust"], "--require: expected METRIC>=VALUE[@EPS]"),
    (["--requirements", "missing.toml"], "--requirements: missing.toml does not exist"),
    (["--targeted", "sideways"], "unknown mode"),
    (["--steps", "0"], "--steps"),
])
def test_bad_usage_exits_2_and_writes_nothing(scripted, tmp_path, capsys, extra, match):
    out = tmp_path / "never"
    code = _run(["audit", "--model", scripted, "--out", str(out), "--n", "10", "--quiet", *extra])
    assert code == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_bad_requirements_files_exit_2_before_any_work(scripted, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = {"robustlab.toml": ('require = ["robust_accuracy>=2"]', "robustlab.toml require: 'robust_accuracy>=2'"),
             "bad.toml": ("require = [", "cannot read bad.toml"),
             "keys.toml": ('required = ["robust_accuracy>=0.5"]', "unknown key 'required'; allowed: require"),
             "list.toml": ("require = [1, 2]", "require must be a list of strings"),
             "pyproject.toml": ("[tool.other]\nx = 1", "pyproject.toml has no [tool.robustlab] table")}
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        args = [] if name == "robustlab.toml" else ["--requirements", name]  # robustlab.toml: found by itself
        code = _run(["audit", "--model", scripted, "--out", str(tmp_path / "never"), "--n", "10", "--quiet", *args])
        err = capsys.readouterr().err
        assert code == 2 and match in err and "Traceback" not in err, (name, err)
        assert not (tmp_path / "never").exists()
        if name == "robustlab.toml":
            (tmp_path / name).unlink()


def test_requirements_from_pyproject_and_robustlab_toml(scripted, tmp_path, capsys, monkeypatch):
    """A team keeps its requirement with the model: [tool.robustlab] in pyproject.toml (or robustlab.toml)
    applies without a flag; --require on the command line replaces it; --requirements none ignores it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "mine"\n\n[tool.robustlab]\n'
                                             'require = ["robust_accuracy>=0.99@0.1", "clean_accuracy>=0.5"]\n')
    assert _run(["audit", "--model", scripted, "--out", "a", *QUICK]) == 1
    printed = capsys.readouterr().out
    assert "FAIL  robust_accuracy >= 0.99 at eps=0.1" in printed and "pass  clean_accuracy >= 0.5" in printed
    judged = json.loads((tmp_path / "a" / "results.json").read_text())["metadata"]["requirements"]
    assert {j["source"] for j in judged} == {str(Path("pyproject.toml")) + " [tool.robustlab]"}
    assert _run(["audit", "--model", scripted, "--out", "b", *QUICK, "--require", "robust_accuracy>=0@0.1"]) == 0
    assert "0.99" not in capsys.readouterr().out
    assert _run(["audit", "--model", scripted, "--out", "c", *QUICK, "--requirements", "none"]) == 0
    assert "no requirement set" in capsys.readouterr().out
    assert "requirements" not in json.loads((tmp_path / "c" / "results.json").read_text())["metadata"]


def test_bad_data_and_models_exit_2(scripted, tmp_path, capsys):
    d = digits_test(10)
    bad = {"nan.npz": (np.where(np.arange(d.x.numel()).reshape(d.x.shape) == 5, np.nan, d.x.numpy()), d.y.numpy()),
           "labels.npz": (d.x.numpy(), d.y.numpy() + 10),
           "range.npz": (d.x.numpy() * 255, d.y.numpy())}
    for name, (x, y) in bad.items():
        np.savez(tmp_path / name, x=x, y=y)
    probs = tmp_path / "probs.pt"
    torch.jit.trace(Softmaxed(digits_model()).eval(), d.x[:2]).save(str(probs))
    pickled = tmp_path / "pickled.pt"
    torch.save(digits_model(), str(pickled))
    cases = [
        (["--model", scripted, "--data", str(tmp_path / "nan.npz")], "NaN"),
        (["--model", scripted, "--data", str(tmp_path / "labels.npz")], "[0, 9]"),
        (["--model", scripted, "--data", str(tmp_path / "range.npz")], "outside the bounds"),
        (["--model", str(probs)], "probabilities"),
        (["--model", str(pickled)], "--trust-pickle"),
        (["--model", str(tmp_path / "missing.pt")], "not found"),
        (["--model", "robustlab.zoo:digits_cnn", "--weights", str(tmp_path / "nan.npz")], "weights"),
    ]
    for args, match in cases:
        out = tmp_path / "never"
        assert _run(["audit", *args, "--out", str(out), "--n", "10", "--quiet"]) == 2, args
        assert match in capsys.readouterr().err, args
        assert not out.exists()


def test_trusted_pickle_is_loaded_when_asked(tmp_path):
    pickled = tmp_path / "pickled.pt"
    torch.save(digits_model(), str(pickled))
    assert _run(["audit", "--model", str(pickled), "--trust-pickle", "--out", str(tmp_path / "r"), *QUICK]) == 0


def test_console_script_help_and_version():
    exe = os.path.join(os.path.dirname(sys.executable), "robustlab")
    done = subprocess.run([exe, "audit", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--fail-under" in done.stdout and "robustlab[onnx]" in done.stdout
    done = subprocess.run([exe, "audit", "--model"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2


def _run(argv) -> int:
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code)
