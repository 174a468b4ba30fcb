"""robustlab.integrations.mlflow: an audit becomes one MLflow run with stable names.

Against a local file store (no server) and once against `mlflow server` started here on 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import robustlab
from robustlab.gates import judge_requirements, record_requirements
from robustlab.integrations.mlflow import log_result, metric_name
from support import digits_model, digits_test

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def audited():
    result = robustlab.audit(digits_model(), digits_test(30), attacks=["fgsm"], eps=[0.05, 0.1], suite="none",
                             checks="none", progress=False)
    record_requirements(result, judge_requirements(result, ["robust_accuracy>=0.2@0.1"]))
    return result


def read_back(uri: str, run_id: str):
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    artifacts = sorted(a.path for a in client.list_artifacts(run_id, "robustlab"))
    return run, artifacts


def check_run(run, artifacts, result) -> None:
    worst = result.summary[(result.summary["attack"] == "worst-case") & (result.summary["eps"] == 0.1)].iloc[0]
    name = metric_name("robust_accuracy", worst)
    assert name == f"robust_accuracy/{worst['model']}/worst-case/linf/eps_0.1/none"
    assert run.data.metrics[name] == pytest.approx(float(worst["robust_accuracy"]))
    assert run.data.metrics[f"clean_accuracy/{worst['model']}/fgsm/linf/eps_0.05/none"] == pytest.approx(
        float(worst["clean_accuracy"]))
    assert json.loads(run.data.params["config.eps"]) == [0.05, 0.1]
    assert run.data.params["seed"] == str(result.metadata["seed"])
    assert any(k.startswith("model.") and k.endswith(".sha256") for k in run.data.params)
    status = run.data.tags[f"evaluation/{worst['model']}/linf/eps_0.1/none"]
    assert status == "weaker than standard"  # no standard suite, no checks: never "established"
    outcome = run.data.tags[f"requirement/robust_accuracy/{worst['model']}/linf/eps_0.1/none"]
    assert outcome == ("meets" if worst["robust_accuracy"] >= 0.2 else "does not meet")
    assert artifacts == ["robustlab/report.html", "robustlab/results.json", "robustlab/samples.csv",
                         "robustlab/summary.md"]


def test_a_result_and_its_directory_log_to_a_file_store(audited, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    run_id = log_result(audited, tracking_uri=uri, experiment="robustlab-test")
    check_run(*read_back(uri, run_id), audited)
    audited.save(tmp_path / "audit")
    again = log_result(tmp_path / "audit", tracking_uri=uri, experiment="robustlab-test", run_name="from disk")
    run, artifacts = read_back(uri, again)
    check_run(run, artifacts, audited)
    assert run.info.run_name == "from disk"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow  # starting the server takes 20-60 s on two cores
def test_a_result_logs_to_an_mlflow_server(audited, tmp_path):
    pytest.importorskip("mlflow.server")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--default-artifact-root",
         str(tmp_path / "artifacts")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("mlflow server did not start: " + server.stderr.read().decode()[-2000:])
                time.sleep(0.5)
        run_id = log_result(audited, tracking_uri=uri, experiment="robustlab-server")
        check_run(*read_back(uri, run_id), audited)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_without_mlflow_the_error_says_how_to_install_it(audited, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(robustlab.InputError, match=r"pip install 'robustlab\[mlflow\]'"):
        log_result(audited)


def test_the_cli_logs_an_audit_with_mlflow(tmp_path, monkeypatch):
    """`robustlab audit ... --mlflow URI`: the run holds the saved audit's figures and files."""
    from robustlab.cli import main
    from support import digits_model
    from safetensors.torch import save_file

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    weights = tmp_path / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in digits_model().state_dict().items()}, str(weights))
    uri = (tmp_path / "mlruns").as_uri()
    code = main(["audit", "--model", "robustlab.zoo:digits_cnn", "--weights", str(weights), "--n", "20",
                 "--eps", "0.1", "--attack", "fgsm", "--suite", "none", "--checks", "none", "--quiet",
                 "--out", str(tmp_path / "audit"), "--mlflow", uri, "--mlflow-experiment", "cli"])
    assert code == 0
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    assert any(k.startswith("robust_accuracy/") and k.endswith("/fgsm/linf/eps_0.1/none") for k in run.data.metrics)
    assert "robustlab/report.html" in [a.path for a in client.list_artifacts(run.info.run_id, "robustlab")]


def test_the_cli_refuses_mlflow_before_work_when_it_is_missing(tmp_path, monkeypatch, capsys):
    from robustlab.cli import main

    monkeypatch.setitem(sys.modules, "mlflow", None)
    code = main(["audit", "--model", "robustlab.zoo:digits_cnn", "--weights", str(tmp_path / "missing.safetensors"),
                 "--n", "5", "--eps", "0.1", "--out", str(tmp_path / "audit"), "--mlflow"])
    assert code == 2
    assert "pip install 'robustlab[mlflow]'" in capsys.readouterr().err
    assert not (tmp_path / "audit").exists()
