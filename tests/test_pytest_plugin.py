"""The pytest plugin (robustlab.pytest_plugin) and the gates under it (robustlab.gates).

Plugin tests run small pytest sessions with pytester, in process except the xdist one. The inner
sessions audit a linear model trained for 5 epochs on digits (about 0.1 s) on 32 test samples,
with PGD at few steps: 78% clean accuracy, about 72% robust at eps 0.01 and 41% at eps 0.1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import robustlab
import robustlab.reports
from robustlab import gates
from robustlab.errors import InputError
from robustlab.pytest_plugin import QUICK, _dir_name

pytest_plugins = ["pytester"]

CONFTEST = """
import pytest
import torch
from robustlab.data import load_data
from robustlab.zoo import linear_classifier


@pytest.fixture(scope="session", autouse=True)
def one_thread():  # tiny tensors: OpenMP's thread pool costs more than it saves
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def model():
    net = linear_classifier(64, 10)
    net.load_state_dict(torch.load({weights!r}, weights_only=True))
    return net.eval()


@pytest.fixture(scope="session")
def data():
    return load_data({data!r}).head(32)


@pytest.fixture(scope="session")
def more_data():
    return load_data({data!r}).head(100)
"""

PASSING = """
import pytest

@pytest.mark.robustness(attack="pgd", eps=0.01, min_accuracy=0.5, steps=5, name="linear")
def test_small_eps_is_robust(robustlab, model, data):
    robustlab.check(model, data)
"""

FAILING = """
import pytest

@pytest.mark.robustness(attack="pgd", eps=0.1, min_accuracy=0.9, steps=5, name="linear")
def test_large_eps(robustlab, model, data):
    robustlab.check(model, data)

@pytest.mark.robustness(attack="pgd", eps=0.2, min_accuracy=0.95, targeted="next", steps=5, name="linear")
def test_targeted(robustlab, model, data):
    robustlab.check(model, data)
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    """The inner sessions' model and data, made once: a linear model trained 5 epochs, 100 test samples.

    Building them here also imports, in this process, every module an audit imports lazily
    (torch._dynamo...): pytester's in-process runs drop modules first imported during the run, and
    torch cannot import some of them twice (operator libraries register once per process).
    """
    import numpy as np
    import torch

    from robustlab.data import digits_split
    from robustlab.training import seeded_init, train_classifier
    from robustlab.zoo import linear_classifier

    folder = tmp_path_factory.mktemp("plugin-assets")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = train_classifier(seeded_init(lambda: linear_classifier(64, 10), 0), digits_split("train"), epochs=5,
                               seed=0)
        test = digits_split("test").head(100)
        robustlab.audit(net, test.head(8), attacks=["fgsm", "pgd", "cw"], suite="none", eps=0.05, steps=2,
                        targeted=["none", "next"], progress=False)
    finally:
        torch.set_num_threads(threads)
    torch.save(net.state_dict(), folder / "linear.pt")
    np.savez(folder / "digits.npz", x=test.x.numpy(), y=test.y.numpy())
    return {"weights": str(folder / "linear.pt"), "data": str(folder / "digits.npz")}


@pytest.fixture
def project(pytester: pytest.Pytester, assets) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST.format(**assets))
    return pytester


def _summary_row(results_dir: Path, attack: str, eps: float, targeted: str = "none") -> dict:
    document = json.loads((results_dir / "results.json").read_text())
    rows = [r for r in document["summary"]
            if r["attack"] == attack and r["eps"] == eps and r["targeted"] == targeted]
    assert len(rows) == 1, rows
    return rows[0]


# ---------------------------------------------------------------------------- import cost
@pytest.mark.parametrize("module, absent", [
    ("robustlab.pytest_plugin", ("torch", "pandas", "numpy", "robustlab.harness", "robustlab.gates")),
    ("robustlab.gates", ("torch",)),
])
def test_import_is_light(module, absent):
    code = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {module} loaded {out.strip()}"


# ---------------------------------------------------------------------------- gates (no pytest session)
def _frame(**robust) -> pd.DataFrame:
    rows = []
    for key, value in robust.items():
        attack, eps = key.rsplit("_", 1)
        rows.append({"model": "m", "attack": attack.replace("worst", "worst-case"), "norm": "linf",
                     "eps": float(eps) / 100, "targeted": "none", "n": 100, "clean_accuracy": 0.9,
                     "robust_accuracy": value, "success_rate": 1 - value, "median_l2": 1.0, "median_linf": 0.1})
    return pd.DataFrame(rows)


def test_margin_percent_is_relative_and_plain_number_is_absolute():
    relative = gates.parse_margin("robust_accuracy:2%")
    absolute = gates.parse_margin("robust_accuracy:0.02")
    assert (relative.relative, relative.amount) == (True, pytest.approx(0.02))
    assert (absolute.relative, absolute.amount) == (False, pytest.approx(0.02))
    assert relative.allowed(0.5) == pytest.approx(0.01) and absolute.allowed(0.5) == pytest.approx(0.02)
    baseline = _frame(pgd_10=0.50)
    # 0.485: a drop of 0.015, over 2% of 0.5 (0.01) but within 0.02 absolute
    current = _frame(pgd_10=0.485)
    [rel] = gates.evaluate_regression(current, baseline, margin="robust_accuracy:2%")
    [abs_] = gates.evaluate_regression(current, baseline, margin="robust_accuracy:0.02")
    assert not rel.passed and rel.required == pytest.approx(0.49)
    assert abs_.passed and abs_.required == pytest.approx(0.48)
    # success_rate: higher is worse
    [rate] = gates.evaluate_regression(current, baseline, margin="success_rate:0.01")
    assert not rate.passed and rate.required == pytest.approx(0.51)
    for bad in ("robust_accuracy", "accuracy:2%", "robust_accuracy:-1", "robust_accuracy:2%%"):
        with pytest.raises(InputError, match="margin"):
            gates.parse_margin(bad)


def test_gates_are_exported_lazily_and_fail_with_assertion_errors():
    assert robustlab.assert_robust is gates.assert_robust
    assert robustlab.assert_no_regression is gates.assert_no_regression
    summary = _frame(pgd_5=0.8, pgd_10=0.4)
    result = robustlab.AuditResult(summary=summary, samples=pd.DataFrame())
    checks = robustlab.assert_robust(result, attack="pgd", eps=0.05, min_accuracy=0.5)
    assert [c.passed for c in checks] == [True]
    with pytest.raises(AssertionError) as info:
        robustlab.assert_robust(result, attack="pgd", eps=[0.05, 0.1], min_accuracy=0.5, results_dir="out/")
    message = str(info.value)
    assert "1 of 2 checks failed" in message
    assert "FAIL model 'm', attack pgd at linf eps=0.1 (untargeted): robust_accuracy measured 0.4, " \
           "required >= 0.5" in message
    assert "clean accuracy of 'm': 0.9 (n=100)" in message
    # a bare summary has no checks and no suite row: weaker than standard, judged on its figure
    assert "evaluation: weaker than standard (no attack suite; integrity checks not run)" in message
    assert "robust_accuracy measured 0.4, required >= 0.5 (min_accuracy): does not meet" in message
    assert "results: out/" in message
    with pytest.raises(InputError, match="eps 0.05, 0.1"):
        robustlab.assert_robust(result, attack="pgd", eps=0.3, min_accuracy=0.5)
    with pytest.raises(InputError, match="no rows for attack 'cw'"):
        robustlab.assert_robust(result, attack="cw", eps=0.1, min_accuracy=0.5)
    with pytest.raises(InputError, match="no .* row of the result is in the baseline"):
        robustlab.assert_no_regression(result, _frame(fgsm_10=0.5))
    # a failed integrity check: no threshold can pass, however low
    result.metadata["checks"] = {"level": "default", "results": [
        {"check": "gradients", "model": "m", "norm": None, "eps": None, "targeted": None, "status": "fail"}]}
    with pytest.raises(AssertionError, match="cannot be judged; not established \\(failed checks: gradients"):
        robustlab.assert_robust(result, attack="pgd", eps=0.05, min_accuracy=0.0)


def test_report_directory_names_are_safe_and_distinct():
    assert _dir_name("tests/test_m.py::test_a") == "tests_test_m.py__test_a"
    a, b = _dir_name("t.py::test[0.1-pgd]"), _dir_name("t.py::test[0.1/pgd]")
    assert a != b and all(c.isalnum() or c in "._=+-" for c in a + b)


# ---------------------------------------------------------------------------- gates in a session
def test_passing_gate_and_summary_table(project):
    project.makepyfile(test_gate=PASSING)
    run = project.runpytest_inprocess("-p", "no:cacheprovider")
    run.assert_outcomes(passed=1)
    run.stdout.fnmatch_lines([
        "*robustlab robustness gates*",
        # the figure (with its interval), the evaluation, then the requirement and its outcome
        "test * model * attack * eps * clean * robust ?95% CI? * evaluation * requirement * baseline * result",
        # the standard suite ran and the integrity checks found nothing wrong with the linear model at eps 0.01:
        # established; the gate reads the worst case over every attack the audit ran, not the marker's attack alone
        "test_gate.py::test_small_eps_is_robust * linear * worst-case * linf 0.01 * 0.781 * 0.* ?0.*, 0.*? * "
        "established * >= 0.500: meets * - * PASS",
        "1 gates, 0 failed",
    ])


def test_failing_gate_names_model_attack_eps_and_values(project):
    project.makepyfile(test_gate=FAILING)
    run = project.runpytest_inprocess("-p", "no:cacheprovider", "--robustlab-report", "rep")
    run.assert_outcomes(failed=2)
    out = run.stdout.str()
    rep = project.path / "rep"
    untargeted = _summary_row(rep / "test_gate.py__test_large_eps", "worst-case", 0.1)
    targeted = _summary_row(rep / "test_gate.py__test_targeted", "worst-case", 0.2, "next")
    assert untargeted["robust_accuracy"] < 0.9 and targeted["robust_accuracy"] < 0.95
    assert ("FAIL model 'linear', attack worst-case at linf eps=0.1 (untargeted): robust_accuracy measured "
            f"{untargeted['robust_accuracy']:.4g}, required >= 0.9 (min_accuracy)") in out
    assert ("FAIL model 'linear', attack worst-case at linf eps=0.2 (targeted: next): robust_accuracy measured "
            f"{targeted['robust_accuracy']:.4g}, required >= 0.95 (min_accuracy)") in out
    assert f"clean accuracy of 'linear': {untargeted['clean_accuracy']:.4g} (n=32)" in out
    saved = robustlab.load(rep / "test_gate.py__test_large_eps")
    evaluation = gates.evaluation(saved, model="linear", targeted="none", eps=0.1)
    assert evaluation and f"evaluation: {evaluation}" in out
    # the gate's requirement and outcome are saved with the results, and its report shows them
    [judged] = saved.metadata["requirements"]
    assert (judged["requirement"], judged["outcome"], judged["source"]) == (
        "robust_accuracy >= 0.9 at eps=0.1", "does not meet", "@pytest.mark.robustness")
    assert f"results: {rep / 'test_gate.py__test_large_eps'}" in out
    if callable(getattr(robustlab.reports, "render", None)):  # the HTML report, once its renderer exists
        html = rep / "test_gate.py__test_large_eps" / "report.html"
        assert html.is_file() and f"(report: {html})" in out
        assert "does not meet" in html.read_text() and "no requirement set" not in html.read_text()
    run.stdout.fnmatch_lines(["*test_gate.py::test_large_eps * linear * worst-case * linf 0.1 * >= 0.900: does not meet * FAIL",
                              "*test_gate.py::test_targeted * linear * worst-case (targeted: next) * linf 0.2 * FAIL",
                              "2 gates, 2 failed"])


def test_the_marker_gates_the_worst_case_not_the_attack_it_runs(project):
    """The marker's `attack` (default "pgd") says what runs; the gate must read the worst case over every
    row the audit wrote (the checks' margin-loss PGD and probes included). Before: the PGD row was gated
    (0.625 and 0.406 at eps 0.05 and 0.1, where the worst case is 0.594 and 0.375). After: the worst case."""
    project.makepyfile(test_gate="""
import pytest

@pytest.mark.robustness(eps=[0.05, 0.1], min_accuracy=0.0, steps=5, name="linear")
def test_default_attack(robustlab, model, data):
    robustlab.check(model, data, suite="none")
""")
    run = project.runpytest_inprocess("-p", "no:cacheprovider", "--robustlab-report", "rep")
    run.assert_outcomes(passed=1)
    session = json.loads((project.path / "rep" / "session.json").read_text())
    saved = project.path / "rep" / "test_gate.py__test_default_attack"
    assert sorted(g["eps"] for g in session["gates"]) == [0.05, 0.1]
    lower = 0
    for g in session["gates"]:
        assert g["attack"] == "worst-case", g
        worst = _summary_row(saved, "worst-case", g["eps"])
        pgd = _summary_row(saved, "pgd", g["eps"])
        assert g["robust_accuracy"] == worst["robust_accuracy"] <= pgd["robust_accuracy"]
        lower += worst["robust_accuracy"] < pgd["robust_accuracy"]
    assert lower, "the scenario lost the rows where the worst case is below PGD's"


def test_unknown_marker_argument_is_a_clear_error(project):
    project.makepyfile(test_gate="""
        import pytest

        @pytest.mark.robustness(attack="pgd", epsilon=0.1, min_accuracy=0.5)
        def test_typo(robustlab, model, data):
            robustlab.check(model, data)

        @pytest.mark.robustness(attack="pgd", eps=0.1, min_accuracy=0.5)
        def test_no_fixture(model, data):
            pass

        @pytest.mark.robustness(attack="pgd", eps=0.1, min_accuracy=50)
        def test_percent_not_fraction(robustlab, model, data):
            robustlab.check(model, data)
    """)
    run = project.runpytest_inprocess("-p", "no:cacheprovider")
    run.assert_outcomes(errors=2, failed=1)
    assert "InputError: min_accuracy: must be a fraction in [0, 1] (0.5 means 50%), got 50" in run.stdout.str()
    run.stdout.fnmatch_lines([
        "*@pytest.mark.robustness on test_gate.py::test_typo: unknown argument 'epsilon'; allowed: attack, eps, "
        "min_accuracy, norm, targeted, n, steps, restarts, min_clean_accuracy, name",
        "*test_no_fixture: the test does not use the `robustlab` fixture*",
    ])


def test_report_files_session_json_and_markdown(project, monkeypatch):
    rendered = []

    def render(results_dir, out=None):  # stands in for robustlab.reports.render while it is being written
        rendered.append(Path(results_dir))
        from robustlab.results import write_file  # as the real one writes: its digest joins results.json

        return write_file(out, "<html>report</html>")

    monkeypatch.setattr(robustlab.reports, "render", render, raising=False)
    project.makepyfile(test_gate=PASSING + FAILING + """
import robustlab as rl

def test_explicit(robustlab, model, data):
    result = robustlab.audit(model, data, attacks=["fgsm", "pgd"], suite="none", eps=[0.01, 0.05], steps=5, name="linear")
    saved = rl.load(robustlab.settings.report / "test_gate.py__test_explicit")
    assert len(saved.summary) == len(result.summary) == 8  # (fgsm, pgd, pgd-margin, worst-case) x 2 eps
    robustlab.assert_robust(result, attack="worst-case", eps=0.05, min_accuracy=0.3)
""")
    run = project.runpytest_inprocess("-p", "no:cacheprovider", "--robustlab-report", "rep",
                                      "--robustlab-json", "gates.json")
    run.assert_outcomes(passed=2, failed=2)
    rep = project.path / "rep"
    names = ["test_gate.py__test_small_eps_is_robust", "test_gate.py__test_large_eps", "test_gate.py__test_targeted",
             "test_gate.py__test_explicit"]
    for name in names:
        assert {"results.json", "samples.csv", "report.html"} <= {p.name for p in (rep / name).iterdir()}
        assert len(robustlab.load(rep / name).summary) >= 1
    assert sorted(set(rendered)) == sorted(rep / name for name in names)
    # an audit() result is rendered when audited, and again once a gate has judged its requirement
    assert rendered.count(rep / "test_gate.py__test_explicit") == 2
    assert rendered.count(rep / "test_gate.py__test_large_eps") == 1
    assert robustlab.load(rep / "test_gate.py__test_explicit").metadata["requirements"][0]["outcome"] == "meets"
    session = json.loads((rep / "session.json").read_text())
    assert session == json.loads((project.path / "gates.json").read_text()) | {"created": session["created"]}
    assert session["schema"] == "robustlab.pytest-session/2" and session["passed"] is False
    by_test = {g["test"]: g for g in session["gates"]}
    assert set(by_test) == {f"test_gate.py::{n.split('__')[1]}" for n in names}
    assert by_test["test_gate.py::test_explicit"]["attack"] == "worst-case"
    assert by_test["test_gate.py::test_large_eps"]["passed"] is False
    assert by_test["test_gate.py::test_large_eps"]["required"] == 0.9
    assert by_test["test_gate.py::test_large_eps"]["results_dir"] == str(rep / "test_gate.py__test_large_eps")
    assert by_test["test_gate.py::test_small_eps_is_robust"]["passed"] is True
    small = by_test["test_gate.py::test_small_eps_is_robust"]
    assert (small["evaluation"], small["outcome"]) == ("established", "meets")
    assert small["interval"][0] < small["robust_accuracy"] < small["interval"][1]
    assert by_test["test_gate.py::test_large_eps"]["outcome"] == "does not meet"
    markdown = (rep / "summary.md").read_text()
    assert "4 gates, 2 failed." in markdown
    assert "| `test_gate.py::test_large_eps` | linear | worst-case | linf 0.1 |" in markdown and "❌ **FAIL**" in markdown
    run.stdout.fnmatch_lines([f"robustlab: wrote {rep / 'session.json'}", f"robustlab: wrote {rep / 'summary.md'}",
                              f"robustlab: wrote {project.path / 'gates.json'}"])


def test_regression_against_a_saved_baseline(project):
    project.makepyfile(test_gate=PASSING + """
def test_audit_only(robustlab, model, data):
    robustlab.audit(model, data, attacks=["pgd"], suite="none", eps=0.05, steps=5, name="linear")
""")
    saved = project.runpytest_inprocess("-p", "no:cacheprovider", "--robustlab-save-baseline", "baseline.json")
    saved.assert_outcomes(passed=2)
    path = project.path / "baseline.json"
    baseline = json.loads(path.read_text())
    assert set(baseline["tests"]) == {"test_gate.py::test_small_eps_is_robust", "test_gate.py::test_audit_only"}

    same = project.runpytest_inprocess("-p", "no:cacheprovider", "--robustlab-baseline", "baseline.json",
                                       "--robustlab-compare-fail", "robust_accuracy:0")
    same.assert_outcomes(passed=2)

    # pretend the baseline model was 0.2 more robust on every row
    for entry in baseline["tests"].values():
        for row in entry["summary"]:
            row["robust_accuracy"] += 0.2
    path.write_text(json.dumps(baseline))
    first = baseline["tests"]["test_gate.py::test_small_eps_is_robust"]["summary"][0]["robust_accuracy"]
    gated = next(r["robust_accuracy"] for r in baseline["tests"]["test_gate.py::test_small_eps_is_robust"]["summary"]
                 if r["attack"] == "worst-case")
    worse = project.runpytest_inprocess("-p", "no:cacheprovider", "--robustlab-baseline", "baseline.json",
                                        "--robustlab-compare-fail", "robust_accuracy:2%")
    worse.assert_outcomes(failed=2)
    out = worse.stdout.str()
    assert f"vs baseline {first:.4g} (-0.2); required >= {first * 0.98:.4g} (allowed 2% of baseline" in out
    # pgd, and the pgd-margin and worst-case rows the integrity checks add: each 0.2 worse than the baseline
    assert "robustness regression: 3 of 3 checks failed (test_gate.py::test_audit_only)" in out
    worse.stdout.fnmatch_lines([f"*test_small_eps_is_robust * linear * worst-case * linf 0.01 * >= 0.500: meets * {gated:.3f} *FAIL"])

    quick = project.runpytest_inprocess("-p", "no:cacheprovider", "--robustlab-baseline", "baseline.json",
                                        "--robustlab-compare-fail", "robust_accuracy:50%", "--robustlab-quick")
    quick.assert_outcomes(failed=2)
    quick.stdout.fnmatch_lines(["*was saved without --robustlab-quick and this session runs with --robustlab-quick*"])

    absolute = project.runpytest_inprocess("-p", "no:cacheprovider", "--robustlab-baseline", "baseline.json",
                                           "--robustlab-compare-fail", "robust_accuracy:0.1")
    absolute.assert_outcomes(failed=2)
    # relative margins scale with the baseline: 50% of ~0.9 allows the 0.2 drop; so does 0.25 absolute
    for margin in ("robust_accuracy:50%", "robust_accuracy:0.25"):
        lenient = project.runpytest_inprocess("-p", "no:cacheprovider", "--robustlab-baseline", "baseline.json",
                                              "--robustlab-compare-fail", margin)
        lenient.assert_outcomes(passed=2)
    # a baseline without a fail criterion is shown, never enforced
    shown = project.runpytest_inprocess("-p", "no:cacheprovider", "--robustlab-baseline", "baseline.json")
    shown.assert_outcomes(passed=2)
    shown.stdout.fnmatch_lines([f"*test_small_eps_is_robust * established * >= 0.500: meets * {gated:.3f} * PASS"])


def test_ini_options_and_command_line_override(project):
    project.makeini("""
        [pytest]
        robustlab_seed = 7
        robustlab_quick = true
        robustlab_report = ini-report
    """)
    project.makepyfile(test_gate="""
        import pytest

        @pytest.mark.robustness(attack=["pgd", "cw"], eps=0.05, min_accuracy=0.1, name="linear")
        def test_gate(robustlab, model, more_data):
            result = robustlab.check(model, more_data)
            print("SEED", result.metadata["seed"], "QUICK", robustlab.settings.quick, "N", int(result.summary["n"][0]))
            print("CONFIGS", sorted((c["attack"], c["steps"]) for c in result.metadata["attack_configs"] if "steps" in c))
            print("SUITE", result.metadata["config"]["suite"])
            print("SEARCH", [c["binary_search_steps"] for c in result.metadata["attack_configs"] if c["attack"] == "cw"])
    """)
    run = project.runpytest_inprocess("-p", "no:cacheprovider", "-s")
    run.assert_outcomes(passed=1)
    run.stdout.fnmatch_lines([f"*SEED 7 QUICK True N {QUICK['n']}",
                              f"CONFIGS [('cw', {QUICK['cw_steps']}), ('pgd', {QUICK['pgd_steps']})]",
                              "SUITE quick", f"SEARCH [{QUICK['cw_binary_search_steps']}]",
                              "*test_gate.py::test_gate * linear * worst-case * linf 0.05 *PASS",
                              "1 gates, 0 failed; quick mode"])
    assert (project.path / "ini-report" / "test_gate.py__test_gate" / "results.json").exists()

    run = project.runpytest_inprocess("-p", "no:cacheprovider", "-s", "--robustlab-seed", "3",
                                      "--robustlab-report", "cli-report", "-o", "robustlab_quick=false")
    run.assert_outcomes(passed=1)
    run.stdout.fnmatch_lines(["*SEED 3 QUICK False N 100", "CONFIGS [('cw', 100), ('pgd', 20)]", "SUITE standard",
                              "SEARCH [5]"])
    session = json.loads((project.path / "cli-report" / "session.json").read_text())
    assert session["options"]["seed"] == 3 and session["options"]["quick"] is False


def test_bad_option_values_are_usage_errors(project):
    project.makepyfile(test_gate=PASSING)
    (project.path / "b.json").write_text(json.dumps({"schema": "robustlab.baseline/1", "tests": {}}))
    for args, message in [(["--robustlab-device", "tpu"], "--robustlab-device: expected auto, cpu, cuda or cuda:N"),
                          (["--robustlab-seed", "x"], "--robustlab-seed: expected a non-negative integer"),
                          (["--robustlab-baseline", "b.json", "--robustlab-compare-fail", "accuracy:2"],
                           "--robustlab-compare-fail: unknown metric 'accuracy'"),
                          (["--robustlab-baseline", "missing.json"], "missing.json does not exist")]:
        run = project.runpytest_inprocess("-p", "no:cacheprovider", *args)
        assert run.ret == pytest.ExitCode.USAGE_ERROR, args
        run.stderr.fnmatch_lines([f"*{message}*"])


def test_help_lists_the_options_and_ini_names(project):
    run = project.runpytest_inprocess("--help")
    assert run.ret == 0
    run.stdout.fnmatch_lines(["robustness gates (robustlab):", "*--robustlab-device=DEVICE*",
                              "*--robustlab-report=DIR*", "*--robustlab-compare-fail=METRIC:AMOUNT*",
                              "*robust_accuracy:2%): fail tests whose metric got worse*", "*--robustlab-quick*",
                              "*robustlab_compare_fail (args)*", "*robustlab_quick (bool)*"])
    markers = project.runpytest_inprocess("--markers")
    markers.stdout.fnmatch_lines(["@pytest.mark.robustness(attack='pgd', eps=..., min_accuracy=...*"])


def test_cuda_requested_without_a_gpu_skips_with_reason(project):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    project.makepyfile(test_gate=PASSING)
    run = project.runpytest_inprocess("-p", "no:cacheprovider", "-rs", "--robustlab-device", "cuda")
    run.assert_outcomes(skipped=1)
    run.stdout.fnmatch_lines(["*SKIPPED*robustlab: device 'cuda' requested (--robustlab-device) but CUDA is not "
                              "available*"])


def test_xdist_workers_write_per_test_reports_and_the_controller_summarises_all(project):
    pytest.importorskip("xdist")
    project.makepyfile(test_gate=PASSING + FAILING + """
import pytest

@pytest.mark.parametrize("eps", [0.01, 0.02])
def test_param(robustlab, model, data, eps):
    robustlab.check(model, data, eps=eps, min_accuracy=0.3, steps=5, name="linear")
""")
    run = project.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--robustlab-report", "rep",
                                       "--robustlab-save-baseline", "baseline.json", timeout=120)
    run.assert_outcomes(passed=3, failed=2)
    rep = project.path / "rep"
    session = json.loads((rep / "session.json").read_text())
    tests = {"test_gate.py::test_small_eps_is_robust", "test_gate.py::test_large_eps", "test_gate.py::test_targeted",
             "test_gate.py::test_param[0.01]", "test_gate.py::test_param[0.02]"}
    assert {g["test"] for g in session["gates"]} == tests
    dirs = {g["results_dir"] for g in session["gates"]}
    assert len(dirs) == 5 and all((Path(d) / "results.json").exists() for d in dirs)
    assert {p.name for p in rep.iterdir() if p.is_dir()} == {Path(d).name for d in dirs}
    assert set(json.loads((project.path / "baseline.json").read_text())["tests"]) == tests
    run.stdout.fnmatch_lines(["*robustlab robustness gates*", "5 gates, 2 failed"])
    for test in tests:
        assert f"{test} " in run.stdout.str()


# ---------------------------------------------------------------------------- JUnit XML
def test_junit_xml_carries_each_gates_figures(project):
    """`--junitxml`: every gate's metric, threat model, measured figure, interval, requirement,
    evaluation status and outcome are properties of its test case, read back from the XML."""
    import xml.etree.ElementTree as ET

    project.makepyfile(test_gates=PASSING + FAILING.split("import pytest", 1)[1])
    xml_path = project.path / "junit.xml"
    outcome = project.runpytest("-q", "--robustlab-quick", f"--junitxml={xml_path}")
    outcome.assert_outcomes(passed=1, failed=2)
    cases = {case.get("name"): {p.get("name"): p.get("value") for p in case.iter("property")}
             for case in ET.parse(xml_path).getroot().iter("testcase")}
    passing = cases["test_small_eps_is_robust"]
    assert passing["robustlab.gate.0.metric"] == "robust_accuracy"
    assert passing["robustlab.gate.0.threat_model"].startswith("model=linear attack=worst-case norm=linf eps=0.01")
    assert passing["robustlab.gate.0.required"] == "0.5"
    assert float(passing["robustlab.gate.0.measured"]) >= 0.5
    low, high = (float(v) for v in passing["robustlab.gate.0.interval"].strip("[]").split(","))
    assert low <= float(passing["robustlab.gate.0.measured"]) <= high
    assert passing["robustlab.gate.0.outcome"] == "meets"
    assert passing["robustlab.gate.0.evaluation"].startswith("weaker than standard")  # quick suite
    failing = cases["test_large_eps"]
    assert failing["robustlab.gate.0.outcome"] == "does not meet"
    assert float(failing["robustlab.gate.0.measured"]) < 0.9


# ---------------------------------------------------------------------------- certificates (issue 16)
CERTIFIED = """
import pytest

@pytest.mark.robustness(attack="pgd", eps=0.01, min_accuracy=0.5, steps=5, name="linear")
def test_certified(robustlab, model, data):
    robustlab.check(model, data, certify="ibp", min_certified_accuracy=0.5, suite="none")

@pytest.mark.robustness(attack="pgd", eps=0.05, steps=5, name="linear")
def test_certified_too_high(robustlab, model, data):
    robustlab.check(model, data, certify="ibp", min_certified_accuracy=0.9, suite="none")

@pytest.mark.robustness(attack="pgd", eps=0.01, steps=5, name="linear")
def test_no_certificates(robustlab, model, data):
    robustlab.check(model, data, min_certified_accuracy=0.5, suite="none")
"""


def test_check_passes_certify_and_gates_certified_accuracy(project):
    """check(certify=..., min_certified_accuracy=...): the audit certifies (IBP; exact on a linear model),
    the gate reads the certificate row at each eps, and a certified threshold without certify= is refused
    before any audit runs."""
    project.makepyfile(test_gate=CERTIFIED)
    run = project.runpytest_inprocess("-p", "no:cacheprovider", "--robustlab-report", "rep")
    run.assert_outcomes(passed=1, failed=2)
    out = run.stdout.str()
    rep = project.path / "rep"
    assert ("InputError: min_certified_accuracy: min_certified_accuracy=0.5 needs certificates: add "
            "certify='ibp', 'crown' or 'smoothing[:SIGMA]'") in out
    session = json.loads((rep / "session.json").read_text())
    assert "test_gate.py::test_no_certificates" not in {a["test"] for a in session["audits"]}  # refused before work
    assert not (rep / "test_gate.py__test_no_certificates").exists()
    gates_of = {(g["test"], g["attack"]): g for g in session["gates"]}
    passing = gates_of[("test_gate.py::test_certified", "certified:ibp")]
    row = _summary_row(rep / "test_gate.py__test_certified", "certified:ibp", 0.01)
    assert passing["certified_accuracy"] == row["certified_accuracy"] >= 0.5
    assert (passing["required"], passing["outcome"], passing["passed"]) == (0.5, "meets", True)
    assert passing["interval"][0] < passing["certified_accuracy"] < passing["interval"][1]
    worst = gates_of[("test_gate.py::test_certified", "worst-case")]
    assert worst["certified_accuracy"] == row["certified_accuracy"] <= worst["robust_accuracy"]  # the bracket
    assert worst["basis"] == "certified"  # the certified lower bound itself meets min_accuracy=0.5
    failing = gates_of[("test_gate.py::test_certified_too_high", "certified:ibp")]
    high = _summary_row(rep / "test_gate.py__test_certified_too_high", "certified:ibp", 0.05)
    assert failing["certified_accuracy"] == high["certified_accuracy"] < 0.9 and failing["passed"] is False
    assert (f"FAIL model 'linear', attack certified:ibp at linf eps=0.05 (untargeted): certified_accuracy "
            f"measured {high['certified_accuracy']:.4g}, required >= 0.9 (min_certified_accuracy): does not meet") in out
    # the certified judgement travels with the results, into the report
    saved = robustlab.load(rep / "test_gate.py__test_certified")
    assert {(j["metric"], j["outcome"]) for j in saved.metadata["requirements"]} == {
        ("robust_accuracy", "meets"), ("certified_accuracy", "meets")}
    run.stdout.fnmatch_lines([  # the gated worst case, then the certificate row the certified threshold read
        "*test_gate.py::test_certified * linear * worst-case * linf 0.01 * >= 0.500: meets: certified * PASS",
        "*test_gate.py::test_certified * linear * certified:ibp * linf 0.01 * certified 0.* ?0.*, *? * "
        ">= 0.500: meets * PASS",
        "*test_gate.py::test_certified_too_high * certified:ibp * linf 0.05 * >= 0.900: does not meet * FAIL",
    ])


# ---------------------------------------------------------------------------- terminal reporter (issue 12)
RECORDING_CONFTEST = """

@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    lines, write_line = [], reporter.write_line

    def recording(line, **markup):
        lines.append(str(line))
        write_line(line, **markup)

    reporter.write_line = recording
    config._recorded_lines = lines


def pytest_unconfigure(config):
    import json
    with open("reported.json", "w") as handle:
        json.dump(config._recorded_lines, handle)
"""


def test_summary_goes_through_the_terminal_reporter(project, assets):
    """The gates table and the written paths reach the terminal through pytest's terminal reporter (so
    -q, output capture and plugins that reroute the reporter apply), never through print."""
    project.makeconftest(CONFTEST.format(**assets) + RECORDING_CONFTEST)
    project.makepyfile(test_gate=PASSING)
    run = project.runpytest_inprocess("-p", "no:cacheprovider", "--robustlab-quick", "--robustlab-json", "g.json")
    run.assert_outcomes(passed=1)
    reported = json.loads((project.path / "reported.json").read_text())
    ours = [line for line in run.stdout.lines if "test_small_eps_is_robust" in line or line.startswith(
        ("test  ", "1 gates", "robustlab: wrote"))]
    assert len(ours) == 4, run.stdout.lines  # header, one gate, the count, one written file
    assert all(line in reported for line in ours), (ours, reported)


def test_summary_markdown_keeps_table_cells_intact():
    """summary.md comes from the reports' markdown serializer: a `|` in a test id or a model name
    cannot split a table row, and markdown in names is shown, not interpreted."""
    from robustlab.plugin.session import Session
    from robustlab.plugin.settings import Settings
    from robustlab.plugin.tables import HEADER, markdown_summary

    state = Session(Settings(quick=True))
    state.gates.append({"test": "t.py::test_x[a|b]", "order": 0, "model": "my_net|v2", "attack": "worst-case",
                        "norm": "linf", "eps": 0.1, "targeted": "none", "n": 10, "clean_accuracy": 0.9,
                        "robust_accuracy": 0.4, "interval": [0.2, 0.6], "evaluation": "established",
                        "required": 0.5, "required_clean": None, "outcome": "does not meet", "baseline": None,
                        "passed": False, "checks": [], "failures": ["FAIL robust_accuracy 0.4 < 0.5"],
                        "results_dir": None, "certified_accuracy": None, "basis": None})
    lines = markdown_summary(state).splitlines()
    assert "1 gates, 1 failed (quick mode)." in lines
    [row] = [line for line in lines if line.startswith("| `t.py")]
    assert row.startswith("| `t.py::test_x[a\\|b]` | my\\_net\\|v2 | worst-case | linf 0.1 | 0.900 |")
    assert row.endswith("| ❌ **FAIL** |")
    cells = [c for c in row.replace("\\|", "").split("|")[1:-1]]
    assert len(cells) == len(HEADER)
    assert "- `t.py::test_x[a\\|b]`: FAIL robust\\_accuracy 0.4 &lt; 0.5" in lines


# ---------------------------------------------------------------------------- quick mode (issue 15)
def test_quick_caps_come_from_the_attack_registry():
    """--robustlab-quick caps each attack at the quick budget its registration declares (QUICK only
    repeats PGD's and CW's for the help text, and must agree); a smaller value from the marker is kept."""
    from robustlab.attacks import registry
    from robustlab.plugin.quick import apply_quick

    assert (QUICK["pgd_steps"], QUICK["cw_steps"], QUICK["cw_binary_search_steps"]) == (
        registry.entry("pgd").quick["steps"], registry.entry("cw").quick["steps"],
        registry.entry("cw").quick["binary_search_steps"])
    names = ["pgd", "cw", "mifgsm", "fgsm"]
    for steps, expected in ((None, {"pgd": 10, "cw": 20, "mifgsm": 10}), (500, {"pgd": 10, "cw": 20, "mifgsm": 10}),
                            (5, {"pgd": 5, "cw": 5, "mifgsm": 5})):
        kwargs = apply_quick({"attacks": names, "suite": "standard", "n": 500, "steps": steps, "restarts": None},
                             names, n=500, steps=steps, restarts=None)
        assert (kwargs["n"], kwargs["suite"], kwargs["steps"], kwargs["restarts"]) == (QUICK["n"], "quick", None, None)
        built = {getattr(a, "name", a): a for a in kwargs["attacks"]}
        assert {name: built[name].steps for name in expected} == expected, steps
        assert built["cw"].binary_search_steps == QUICK["cw_binary_search_steps"]
        assert built["fgsm"] == "fgsm"  # no quick budget: left to the audit
