"""Certificates in the audit (issue 16): certify= / --certify, the bracket [certified, robust] on the
worst-case row, unsupported models skipped with a reason, and the consistency check between the two."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import robustlab
import robustlab.certify
from robustlab.cli import main
from robustlab.data import digits_split
from robustlab.errors import InputError, VerificationError
from robustlab.results import WORST_CASE, load
from robustlab.training import seeded_init, train_classifier
from robustlab.zoo import DigitsCNN

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(attacks=("pgd",), suite="none", checks="none", progress=False)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def small_cnn() -> nn.Module:
    return DigitsCNN(width=4)


@pytest.fixture(scope="module")
def train(one_thread) -> robustlab.data.Dataset:
    return digits_split("train")


@pytest.fixture(scope="module")
def digits_mlp(train) -> nn.Module:
    return train_classifier(seeded_init(mlp, 0), train, epochs=5, seed=0)


@pytest.fixture(scope="module")
def crown_audit(digits_mlp):
    return robustlab.audit(digits_mlp, "digits", n=60, eps=(0.02, 0.1), certify="crown", name="mlp", **FAST)


def rows(result, attack):
    s = result.summary
    return s[(s["attack"] == attack) & (s["targeted"] == "none")].set_index("eps")


def test_crown_rows_bracket_the_worst_case_and_fall_with_eps(crown_audit):
    certified, worst = rows(crown_audit, "certified:crown"), rows(crown_audit, WORST_CASE)
    assert sorted(certified.index) == sorted(worst.index) == [0.02, 0.1]
    assert certified["robust_accuracy"].isna().all()  # a certificate is not an attack
    assert (worst["certified_accuracy"] == certified["certified_accuracy"]).all()  # the bracket on one row
    assert (worst["certified_accuracy"] <= worst["robust_accuracy"]).all()
    assert certified.loc[0.02, "certified_accuracy"] > certified.loc[0.1, "certified_accuracy"]
    assert certified.loc[0.02, "certified_accuracy"] > 0.3
    assert rows(crown_audit, "pgd")["certified_accuracy"].isna().all()
    # sample rows: robust = certified, nothing attacked; a certified sample is robust in the worst case
    s = crown_audit.samples
    mine = s[s["attack"] == "certified:crown"]
    assert len(mine) == 2 * 60 and not mine["success"].any() and not mine["attacked"].any()
    for eps in (0.02, 0.1):
        c = mine[mine["eps"] == eps].set_index("sample")["robust"]
        w = s[(s["attack"] == WORST_CASE) & (s["eps"] == eps)].set_index("sample")["robust"]
        assert (w[c[c].index]).all()
        assert c.mean() == pytest.approx(certified.loc[eps, "certified_accuracy"])
    info = crown_audit.metadata["certify"]["mlp"]
    assert info["status"] == "certified" and info["method"] == "crown"
    assert crown_audit.metadata["config"]["certify"] == "crown"
    # certificates join no worst case and no evaluation
    assert all("certified:crown" not in e["attacks"] for e in crown_audit.metadata["evaluation"])
    assert "certified:crown" in crown_audit.table()


def test_certified_accuracy_round_trips_and_old_files_load_with_nan(crown_audit, tmp_path):
    crown_audit.save(tmp_path / "r")
    back = load(tmp_path / "r")
    assert np.allclose(rows(back, "certified:crown")["certified_accuracy"],
                       rows(crown_audit, "certified:crown")["certified_accuracy"])
    document = json.loads((tmp_path / "r" / "results.json").read_text())
    for record in document["summary"]:
        record.pop("certified_accuracy")
    (tmp_path / "r" / "results.json").write_text(json.dumps(document))
    old = load(tmp_path / "r")
    assert old.summary["certified_accuracy"].isna().all() and old.summary["certified_accuracy"].dtype == "float64"
    old.save(tmp_path / "again")  # a summary with or without the column saves


def test_report_shows_the_certified_rows_from_saved_results(crown_audit, tmp_path):
    from robustlab.reports import render, write_summary

    crown_audit.save(tmp_path / "r")
    html = render(tmp_path / "r").read_text()
    assert "certified:crown (certified)" in html and "certified &ge;" in html
    assert "certified:crown (certified)" in write_summary(tmp_path / "r").read_text()


def test_cnn_with_max_pool_is_certified(train):
    cnn = train_classifier(seeded_init(small_cnn, 0), train, epochs=3, seed=0)
    result = robustlab.audit(cnn, "digits", n=30, eps=0.01, certify="ibp", name="cnn", **FAST)
    certified, worst = rows(result, "certified:ibp"), rows(result, WORST_CASE)
    assert result.metadata["certify"]["cnn"]["status"] == "certified"
    assert 0 < certified.loc[0.01, "certified_accuracy"] <= worst.loc[0.01, "robust_accuracy"]


def test_unsupported_model_is_skipped_with_the_reason(digits_mlp, capsys):
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Tanh()).eval()
    said: list[str] = []
    with pytest.warns(robustlab.model.RobustlabWarning):  # the untrained model is at chance level
        result = robustlab.audit({"mlp": digits_mlp, "tanh": tanh}, "digits", n=30, eps=(0.05,), certify="crown",
                                 **{**FAST, "progress": said.append})
    info = result.metadata["certify"]["tanh"]
    assert info["status"] == "skipped" and info["kind"] == "Tanh" and "Tanh" in info["reason"]
    assert any("tanh: certify crown skipped" in line for line in said)
    assert set(result.summary.loc[result.summary["attack"] == "certified:crown", "model"]) == {"mlp"}
    assert result.metadata["certify"]["mlp"]["status"] == "certified"


def test_a_sample_certified_and_broken_fails_the_audit(digits_mlp, monkeypatch):
    real = robustlab.certify.certify

    def everything(*args, **kwargs):  # a broken certifier: every correct sample "proven" robust
        outcome = real(*args, **kwargs)
        outcome.certified = outcome.prediction == outcome.labels
        return outcome

    monkeypatch.setattr(robustlab.certify, "certify", everything)
    with pytest.raises(VerificationError, match=r"model 'mlp': \d+ samples certified robust by crown at linf "
                                                r"eps=0.1 were broken by verified attacks \(pgd\); samples \["):
        robustlab.audit(digits_mlp, "digits", n=40, eps=(0.1,), certify="crown", name="mlp", **FAST)


@pytest.mark.parametrize("value", ["lipschitz", "ibp:2", "smoothing:0", "smoothing:x", 3])
def test_bad_certify_values_are_refused_naming_certify(digits_mlp, value):
    with pytest.raises(InputError) as error:
        robustlab.audit(digits_mlp, "digits", n=10, eps=0.1, certify=value, **FAST)
    assert error.value.argument == "certify"


def test_smoothing_rows_stay_off_the_bracket(digits_mlp):
    result = robustlab.audit(digits_mlp, "digits", n=20, eps=(0.02, 0.1), norm="l2", certify="smoothing:0.25",
                             name="mlp", **FAST)
    smoothed = rows(result, "certified:smoothing(sigma=0.25)")
    assert list(smoothed.index) == [0.02, 0.1]
    assert smoothed.loc[0.02, "certified_accuracy"] >= smoothed.loc[0.1, "certified_accuracy"]
    assert smoothed["note"].str.contains("smoothed classifier").all()
    assert rows(result, WORST_CASE)["certified_accuracy"].isna().all()  # another classifier's certificate
    info = result.metadata["certify"]["mlp"]
    assert info["sigma"] == 0.25 and 0 <= info["abstention_rate"] <= 1


def test_cli_certify_round_trip(digits_mlp, tmp_path, capsys):
    from safetensors.torch import save_file

    (tmp_path / "mlpnet.py").write_text(
        "from torch import nn\n\ndef mlp():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), "
        "nn.Linear(32, 10))\n")
    save_file({k: v.contiguous() for k, v in digits_mlp.state_dict().items()}, str(tmp_path / "w.safetensors"))
    common = ["audit", "--model", f"{tmp_path / 'mlpnet.py'}:mlp", "--weights", str(tmp_path / "w.safetensors"),
              "--attack", "pgd", "--suite", "none", "--checks", "none", "--eps", "0.02,0.1", "--n", "30", "--quiet"]
    bad = tmp_path / "bad"
    for argv in ([*common, "--out", str(bad), "--certify", "lipschitz"],
                 ["demo", "--out", str(bad), "--certify", "smoothing:-1", "--quiet"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        assert "error: --certify: " in capsys.readouterr().err and not bad.exists()
    out = tmp_path / "ok"
    assert main([*common, "--out", str(out), "--certify", "crown"]) == 0
    assert "certified:crown" in capsys.readouterr().out
    summary = json.loads((out / "results.json").read_text())["summary"]
    certified = {r["eps"]: r["certified_accuracy"] for r in summary if r["attack"] == "certified:crown"}
    worst = {r["eps"]: r for r in summary if r["attack"] == WORST_CASE}
    assert set(certified) == {0.02, 0.1}
    for eps, value in certified.items():
        assert value == worst[eps]["certified_accuracy"] <= worst[eps]["robust_accuracy"]
    assert all(r["certified_accuracy"] is None for r in summary if r["attack"] == "pgd")
