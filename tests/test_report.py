"""The HTML report, summary.md and comparisons, rendered from saved results alone."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import time

import pytest

from robustlab.cli import main
from robustlab.reports import compare, render, write_summary
from report_support import XSS, demo_like, hostile

SECTION_IDS = ["verdict", "audited", "accuracy", "targeted", "per-class", "norms", "examples"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return demo_like(tmp_path_factory.mktemp("report") / "demo", checks="default")


@pytest.fixture(scope="module")
def rendered(results):
    started = time.perf_counter()
    path = render(results)
    return path, time.perf_counter() - started


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory):
    return hostile(tmp_path_factory.mktemp("report") / "hostile")


def test_report_sections_in_reading_order(rendered, results):
    path, _ = rendered
    assert path == results / "report.html"
    text = path.read_text()
    positions = [text.find(f'<section id="{sid}"') for sid in SECTION_IDS]
    assert all(p > 0 for p in positions) and positions == sorted(positions)
    for heading in ("Verdict", "What was audited", "Clean vs robust accuracy", "Targeted attacks",
                    "Per-class robust accuracy", "Smallest adversarial perturbations", "Adversarial examples"):
        assert f"<h2>{heading}</h2>" in text
    assert "Integrity checks: not run" not in text and "Integrity checks (default):" in text
    assert "Loss gradients are usable" in text and "worst-case robust accuracy" in text
    assert "no requirement set" in text
    # no card calls the model robust: without a requirement it gives the figure, the status, "no requirement set"
    section = text.split('<section id="verdict"')[1].split("</section>")[0]
    verdict = _text(re.sub(r'<div class="integrity">.*?</details></div>', " ", section, flags=re.S))  # checks' evidence aside
    assert _labels_robust(verdict) == [], _labels_robust(verdict)
    assert verdict.index("Measured") < verdict.index("Evaluation") < verdict.index("Requirement")
    assert "95% CI" in verdict and "weaker than standard" in verdict and "no attack suite" in verdict
    meta = json.loads((results / "results.json").read_text())["metadata"]
    assert meta["models"]["DigitsCNN"]["sha256"] in text and meta["data"]["sha256"] in text
    assert "worst-case" in text and "eps=0.2" in text and 'class="data sortable' in text
    # figures: curves, success matrices and norm histograms as SVG, examples as PNG, all inline
    assert text.count("data:image/svg+xml;base64,") >= 3
    assert text.count("data:image/png;base64,") >= 8 * 3
    # sections that have no results yet (defenses, explanations, checks) are not rendered as placeholders
    for absent in ("Defenses", "Explanations", "coming soon", "TODO"):
        assert absent not in text


def _text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", fragment))


def _plain(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", fragment)).split())


def _labels_robust(text: str) -> list[str]:
    """Every use of 'robust' that is not part of 'robust accuracy', 'robust_accuracy' or 'robustlab'."""
    return [m.group(0) for m in re.finditer(r"\brobust(?!ness)\b(?![ _]accuracy)[^.]{0,30}", text, re.IGNORECASE)]


def test_report_is_self_contained_small_and_fast(rendered):
    path, seconds = rendered
    text = path.read_text()
    assert seconds < 5, f"rendering took {seconds:.1f}s"
    assert path.stat().st_size < 5 * 1024 * 1024
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', text)
    assert csp and "default-src 'none'" in csp.group(1) and "img-src data:" in csp.group(1)
    assert "'unsafe-inline'" not in csp.group(1).split("script-src")[1].split(";")[0]
    for attr in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', text):
        assert attr.startswith(("data:", "#")), attr
    assert not re.search(r"""(?:src|href)\s*=\s*['"]?\s*(?:https?:)?//""", text)
    assert "@import" not in text and "url(" not in text
    assert "@media print" in text


def test_summary_markdown(results, rendered):
    path = write_summary(results)
    assert path == results / "summary.md"
    text = path.read_text()
    assert text.startswith("## robustlab audit: DigitsCNN")
    assert "Verdict: no requirement set." in text and "Integrity checks (default):" in text
    assert "### Verdict per threat model" in text and "### Robust accuracy per attack" in text
    # the three things in order: the figure with its interval, the evaluation, the requirement
    row = next(line for line in text.splitlines() if line.startswith("| DigitsCNN | linf untargeted | 0.1 |"))
    assert re.search(r"\| \*\*\d+\.\d%\*\* \(95% CI \d+\.\d–\d+\.\d%, n=60\) \| ⚠️ weaker than standard "
                     r"\(no attack suite\) \| no requirement set \|$", row), row
    assert "targeted (next)" in text
    assert _labels_robust(text.split("### Robust accuracy per attack")[0].replace("\\_", "_")) == []
    assert "eps=0.05" in text and "eps=0.2" in text and "median L2" in text
    assert len(text) < 5000


def test_cli_audit_records_requirements_and_writes_report(tmp_path, capsys):
    from safetensors.torch import save_file

    from report_support import trained

    weights = tmp_path / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in trained().state_dict().items()}, str(weights))
    out = tmp_path / "audit"
    code = main(["audit", "--model", "robustlab.zoo:digits_cnn", "--weights", str(weights), "--data", "digits",
                 "--out", str(out), "--attack", "fgsm", "--suite", "quick", "--eps", "0.1", "--n", "10", "--quiet",
                 "--fail-under", "clean_accuracy=0.5", "--require", "robust_accuracy>=0.99"])
    assert code == 1  # FGSM alone breaks more than 1% of the trained CNN at eps 0.1
    assert (out / "report.html").exists() and (out / "summary.md").exists()
    meta = json.loads((out / "results.json").read_text())["metadata"]
    # robust accuracy on the worst case at each eps, clean accuracy once per model
    assert [(c["metric"], c["source"], c["outcome"]) for c in meta["requirements"]] == [
        ("robust_accuracy", "--require", "does not meet"), ("clean_accuracy", "--fail-under", "meets")]
    assert [c["passed"] for c in meta["requirements"]] == [False, True]
    report = (out / "report.html").read_text()
    assert "does not meet" in report and "robust_accuracy &gt;= 0.99" in report and "clean_accuracy &gt;= 0.5" in report
    assert "❌" in (out / "summary.md").read_text()
    assert "report:" in capsys.readouterr().out


def test_cli_report_and_compare_without_torch(results, tmp_path):
    """`robustlab report` and `compare` read results alone: torch cannot even be imported here."""
    copy = tmp_path / "copy"
    shutil.copytree(results, copy)
    (copy / "report.html").unlink(missing_ok=True)
    block = ("import sys; sys.modules['torch'] = None; from robustlab.cli import main; "
             "code = main(sys.argv[1:]); assert 'torch' not in sys.modules or sys.modules['torch'] is None; "
             "sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", block, "report", str(copy), "-o", str(tmp_path / "r.html")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "r.html").stat().st_size > 10_000 and (copy / "summary.md").exists()
    run = subprocess.run([sys.executable, "-c", block, "compare", str(results), str(copy), "-o",
                          str(tmp_path / "c.html")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    run = subprocess.run([sys.executable, "-c", block, "report", str(tmp_path / "nothing-here")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "not a robustlab results directory" in run.stderr
    assert "Traceback" not in run.stderr


def test_cli_report_refuses_a_directory_without_results(tmp_path, capsys):
    (tmp_path / "other").mkdir()
    assert main(["report", str(tmp_path / "other")]) == 2
    assert "no results.json" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "other"), str(tmp_path / "other"), "-o", str(tmp_path / "c.html")]) == 2
    assert not (tmp_path / "c.html").exists()


def test_compare_reports_better_and_worse(results, tmp_path):
    worse = tmp_path / "worse"
    shutil.copytree(results, worse)
    document = json.loads((worse / "results.json").read_text())
    for row in document["summary"]:
        if row["attack"] == "worst-case" and row["eps"] == 0.1 and row["targeted"] == "none":
            before = row["robust_accuracy"]
            row["robust_accuracy"] = before - 0.25
        if row["attack"] == "fgsm" and row["eps"] == 0.05 and row["targeted"] == "none":
            row["robust_accuracy"] = min(1.0, row["robust_accuracy"] + 0.1)
    (worse / "results.json").write_text(json.dumps(document))
    page = compare(results, worse, tmp_path / "diff.html").read_text()
    assert "1 better" in page and "1 worse" in page
    assert f"{before * 100:.1f}% → {(before - 0.25) * 100:.1f}% (-25.0 pp, worse)" in html.unescape(page)
    assert "+10.0 pp" in page and "▼ worse" in page and "▲ better" in page
    assert "default-src 'none'" in page
    markdown = compare(results, worse, tmp_path / "diff.md").read_text()
    assert "**1 better, 1 worse," in markdown and "-25.0 pp" in markdown
    same = compare(results, results, tmp_path / "same.md").read_text()
    assert "**0 better, 0 worse," in same


def test_user_supplied_text_is_escaped(hostile_dir):
    text = render(hostile_dir).read_text()
    assert text.count("<script") == 1  # ours, allowed by its hash
    for payload in XSS:
        assert payload not in text
    assert html.escape(XSS[0]) in text and html.escape(XSS[1]) in text
    assert "<img src=x" not in text and "onerror=alert" not in text.replace("onerror=alert(1)&gt;", "")
    summary = write_summary(hostile_dir).read_text()
    assert "<script>" not in summary and "<img" not in summary


def test_defenses_bought_points_only_between_established_figures():
    """"bought N points" needs both figures established; otherwise the change is shown and marked."""
    import pandas as pd

    from robustlab.reports.sections import defenses
    from robustlab.results import AuditResult

    rows = []
    for model, robust in (("base", 0.1), ("at", 0.6)):
        for attack in ("pgd", "cascade", "worst-case"):
            rows.append({"model": model, "attack": attack, "norm": "linf", "eps": 0.2, "targeted": "none", "n": 200,
                         "clean_accuracy": 0.95, "robust_accuracy": robust})
    metadata = {"models": {"base": {}, "at": {"defense": {"defense": "adversarial-training", "method": "pgd",
                                                          "norm": "linf", "eps": 0.2, "steps": 10, "epochs": 5}}},
                "checks": {"level": "default", "results": []}}
    result = AuditResult(summary=pd.DataFrame(rows), samples=pd.DataFrame(), metadata=metadata)
    text = _plain(defenses.render(result))
    assert "at: bought +50.0 points of worst-case robust accuracy at eps=0.2" in text and "not a bought" not in text
    # a failed check on the defended model: the same change, not a bought gain
    metadata["checks"]["results"] = [{"check": "gradients", "model": "at", "norm": None, "eps": None,
                                      "targeted": None, "status": "fail"}]
    text = _plain(defenses.render(result))
    assert "bought +50" not in text
    assert ("at: +50.0 points of worst-case robust accuracy at eps=0.2, not a bought gain: at: not established "
            "(failed checks: gradients)") in text
    # a weaker evaluation of the baseline (no suite row) is marked too
    metadata["checks"]["results"] = []
    result = AuditResult(summary=pd.DataFrame([r for r in rows if not (r["model"] == "base" and r["attack"] == "cascade")]),
                         samples=pd.DataFrame(), metadata=metadata)
    text = _plain(defenses.render(result))
    assert "not a bought gain: baseline base: weaker than standard (no attack suite)" in text
