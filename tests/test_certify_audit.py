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


def test_smoothing_rows_stay_off_the_base_models_bracket(digits_mlp):
    result = robustlab.audit(digits_mlp, "digits", n=20, eps=(0.02, 0.1), norm="l2", certify="smoothing:0.25",
                             name="mlp", **FAST)
    s = result.summary
    smoothed = rows(result, "certified:smoothing(sigma=0.25)")
    assert list(smoothed.index) == [0.02, 0.1]
    assert set(smoothed["model"]) == {"mlp+smoothing0.25"}  # the smoothed classifier's certificate, on its rows
    assert smoothed.loc[0.02, "certified_accuracy"] >= smoothed.loc[0.1, "certified_accuracy"]
    assert smoothed["note"].str.contains("smoothed classifier").all()
    base = s[(s["model"] == "mlp") & (s["attack"] == WORST_CASE)]
    assert len(base) == 0 or base["certified_accuracy"].isna().all()  # another classifier's certificate
    assert not s[s["model"] == "mlp"]["attack"].str.startswith("certified:").any()
    assert result.metadata["certify"]["mlp"] == {"method": "smoothing", "sigma": 0.25, "status": "smoothed",
                                                 "smoothed_model": "mlp+smoothing0.25"}
    info = result.metadata["certify"]["mlp+smoothing0.25"]
    assert info["sigma"] == 0.25 and 0 <= info["abstention_rate"] <= 1
    assert "mlp+smoothing0.25" in result.metadata["models"]


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


# ---------------------------------------------------------------------------- the smoothed classifier as a model
def noise_trained(train, sigma: float, epochs: int = 10) -> nn.Module:
    """Gaussian data augmentation at sigma (Cohen et al.'s base classifiers)."""
    import torch.nn.functional as F

    model = seeded_init(mlp, 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        order = torch.randperm(len(train.x), generator=generator)
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            optimiser.zero_grad()
            F.cross_entropy(model(train.x[idx] + sigma * torch.randn(train.x[idx].shape, generator=generator)),
                            train.y[idx]).backward()
            optimiser.step()
    return model.eval()


@pytest.fixture(scope="module")
def smoothed_audit(train):
    # sigma 0.5 on a base trained at 0.25: enough ambiguous samples that CERTIFY and PREDICT abstain on some
    return robustlab.audit(noise_trained(train, 0.25), "digits", n=60, eps=(0.25, 0.5, 1.0), norm="l2",
                           certify="smoothing:0.5", name="mlp", **FAST)


def test_the_smoothed_classifier_is_audited_by_eot_pgd_and_its_bracket_is_ordered(smoothed_audit):
    s = smoothed_audit.summary
    mine = s[s["model"] == "mlp+smoothing0.5"]
    assert set(mine["attack"]) == {"eot-pgd", WORST_CASE, "certified:smoothing(sigma=0.5)"}
    attacked = mine[mine["attack"] == "eot-pgd"].set_index("eps")
    certified = mine[mine["attack"] == "certified:smoothing(sigma=0.5)"].set_index("eps")
    worst = mine[mine["attack"] == WORST_CASE].set_index("eps")
    assert list(attacked.index) == list(certified.index) == list(worst.index) == [0.25, 0.5, 1.0]
    assert (attacked["n_attacked"] > 0).all() and (attacked["gradient_calls"] > 0).all()
    for eps in (0.25, 0.5, 1.0):  # the bracket [certified, attacked], on the smoothed classifier's worst-case row
        assert worst.loc[eps, "certified_accuracy"] == certified.loc[eps, "certified_accuracy"]
        assert certified.loc[eps, "certified_accuracy"] <= attacked.loc[eps, "robust_accuracy"]
        assert worst.loc[eps, "robust_accuracy"] <= attacked.loc[eps, "robust_accuracy"]
    assert list(certified["certified_accuracy"]) == sorted(certified["certified_accuracy"], reverse=True)
    assert certified.loc[0.25, "certified_accuracy"] > certified.loc[1.0, "certified_accuracy"]
    assert attacked.loc[1.0, "robust_accuracy"] < attacked.loc[1.0, "clean_accuracy"]  # EoT-PGD breaks some
    # the verdict reads the bracket off the evaluation record of the smoothed classifier's threat model
    records = {(v["model"], v["eps"]): v for v in smoothed_audit.metadata["evaluation"]}
    record = records[("mlp+smoothing0.5", 0.5)]
    assert record["certified_accuracy"] == certified.loc[0.5, "certified_accuracy"]
    assert record["certified_method"] == "smoothing(sigma=0.5)"
    assert "certified_accuracy" not in records[("mlp", 0.5)]  # the base model is another classifier
    info = smoothed_audit.metadata["certify"]["mlp+smoothing0.5"]
    assert set(info["certified_and_broken"]) == {"0.25", "0.5", "1"}
    described = smoothed_audit.metadata["models"]["mlp+smoothing0.5"]
    assert "smoothing" in str(described)


def test_abstentions_of_the_smoothed_classifier_count_as_not_robust(smoothed_audit):
    samples = smoothed_audit.samples
    mine = samples[samples["model"] == "mlp+smoothing0.5"]
    certificate = mine[mine["attack"] == "certified:smoothing(sigma=0.5)"]
    abstained = certificate[certificate["adv_pred"] == -1]
    assert len(abstained) > 0 and not abstained["robust"].any()  # CERTIFY's abstentions: not certified
    assert smoothed_audit.metadata["certify"]["mlp+smoothing0.5"]["abstention_rate"] > 0
    # PREDICT's abstentions: the smoothed classifier's clean prediction, never correct, so never robust
    rows_ = mine[mine["attack"].isin(["eot-pgd", WORST_CASE])]
    predicted = rows_.drop_duplicates("sample").set_index("sample")
    assert (predicted["clean_correct"] == (predicted["clean_pred"] == predicted["label"])).all()
    assert not rows_[rows_["clean_pred"] == -1]["robust"].any()
    assert not rows_[~rows_["clean_correct"]]["robust"].any()
    summary = smoothed_audit.summary
    clean = summary[summary["model"] == "mlp+smoothing0.5"]["clean_accuracy"].iloc[0]
    assert clean == pytest.approx(float(predicted["clean_correct"].mean()))


@pytest.mark.filterwarnings("ignore:model 'mlp\\+smoothing0.25'. clean accuracy")
def test_abstentions_of_predict_are_not_attacked_and_not_robust(train, monkeypatch):
    """PREDICT forced to abstain on the first 10 samples: they are not correct, not attacked, not robust."""
    import robustlab.certify.smoothed as smoothed

    real = smoothed.smoothed_prediction

    def abstaining(*args, **kwargs):
        prediction = real(*args, **kwargs).clone()
        prediction[:10] = -1
        return prediction

    monkeypatch.setattr(smoothed, "smoothed_prediction", abstaining)
    result = robustlab.audit(noise_trained(train, 0.25, epochs=3), "digits", n=20, eps=0.25, norm="l2",
                             certify="smoothing:0.25", name="mlp", **FAST)
    s = result.samples
    mine = s[(s["model"] == "mlp+smoothing0.25") & (s["attack"] == "eot-pgd")].set_index("sample")
    first = mine.index[:10]
    assert (mine.loc[first, "clean_pred"] == -1).all()
    assert not mine.loc[first, "clean_correct"].any() and not mine.loc[first, "attacked"].any()
    assert not mine.loc[first, "robust"].any()
    row = result.summary[(result.summary["model"] == "mlp+smoothing0.25") & (result.summary["attack"] == "eot-pgd")]
    assert float(row["clean_accuracy"].iloc[0]) <= 0.5


def test_a_model_named_like_a_smoothed_classifier_is_refused(digits_mlp):
    with pytest.raises(InputError, match="smoothed classifier") as error:
        robustlab.audit({"m": digits_mlp, "m+smoothing0.25": digits_mlp}, "digits", n=10, eps=0.1, norm="l2",
                        certify="smoothing:0.25", **FAST)
    assert error.value.argument == "certify"


# ---------------------------------------------------------------------------- requirements on certified accuracy
def _cli_model(digits_mlp, tmp_path) -> list[str]:
    from safetensors.torch import save_file

    (tmp_path / "mlpnet.py").write_text(
        "from torch import nn\n\ndef mlp():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), "
        "nn.Linear(32, 10))\n")
    save_file({k: v.contiguous() for k, v in digits_mlp.state_dict().items()}, str(tmp_path / "w.safetensors"))
    return ["audit", "--model", f"{tmp_path / 'mlpnet.py'}:mlp", "--weights", str(tmp_path / "w.safetensors"),
            "--attack", "pgd", "--suite", "none", "--checks", "none", "--eps", "0.02,0.1", "--n", "30", "--quiet",
            "--name", "mlp"]


def test_cli_refuses_a_certified_requirement_without_certify_before_any_work(digits_mlp, tmp_path, capsys,
                                                                              monkeypatch):
    common = _cli_model(digits_mlp, tmp_path)
    out = tmp_path / "out"
    assert main([*common, "--out", str(out), "--require", "certified_accuracy>=0.4@0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["robustlab audit: error: --require: certified_accuracy >= 0.4 at eps=0.1 needs certificates: add "
                   "--certify ibp|crown|smoothing[:SIGMA] (without them there are no certified rows to judge)"]
    assert not out.exists()
    assert main(["demo", "--out", str(out), "--quiet", "--require", "certified_accuracy>=0.4"]) == 2
    assert "needs certificates" in capsys.readouterr().err and not out.exists()
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text('[tool.robustlab]\nrequire = ["certified_accuracy>=40%@0.1"]\n')
    monkeypatch.chdir(project)
    assert main([*common, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: pyproject.toml [tool.robustlab] require: certified_accuracy >= 0.4 at eps=0.1 needs " \
           "certificates" in err
    assert not out.exists()


def test_cli_judges_certified_requirements_and_says_meets_certified(digits_mlp, tmp_path, capsys, monkeypatch):
    common = _cli_model(digits_mlp, tmp_path)
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text('[tool.robustlab]\nrequire = ["certified_accuracy>=0.2@0.02"]\n')
    monkeypatch.chdir(project)
    out = tmp_path / "ok"
    assert main([*common, "--out", str(out), "--certify", "crown"]) == 0  # [tool.robustlab]'s requirement
    printed = capsys.readouterr().out
    assert "pass  certified_accuracy >= 0.2 at eps=0.02: mlp certified:crown eps=0.02 (untargeted):" in printed
    assert "certified lower bound [95% CI]" in printed
    saved = json.loads((out / "results.json").read_text())["metadata"]["requirements"]
    assert [(j["metric"], j["attack"], j["outcome"]) for j in saved] == [
        ("certified_accuracy", "certified:crown", "meets")]
    # a robust-accuracy requirement the certified bound meets, and a certified one it does not
    out2 = tmp_path / "two"
    code = main([*common, "--out", str(out2), "--certify", "crown", "--require", "robust_accuracy>=0.2@0.02",
                 "--require", "certified_accuracy>=0.99@0.1"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "pass  robust_accuracy >= 0.2 at eps=0.02: mlp worst-case eps=0.02 (untargeted):" in printed
    assert "meets: certified (certified >= " in printed
    assert "FAIL  certified_accuracy >= 0.99 at eps=0.1:" in printed and "does not meet" in printed
