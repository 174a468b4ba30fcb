"""The harness: result contract, worst case, targets, determinism, persistence, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import robustlab
from robustlab.errors import InputError
from robustlab.results import SAMPLE_COLUMNS, SUMMARY_COLUMNS
from support import Softmaxed, digits_model, digits_test

FAST = dict(attacks=("fgsm", "pgd", "cw"), suite="none", eps=(0.05, 0.15), steps=5)


@pytest.fixture(scope="module")
def result():
    return robustlab.audit(digits_model(), digits_test(60), name="cnn", checks="none", **FAST)  # checks: test_integrity.py


def test_summary_and_samples_follow_the_contract(result):
    assert list(result.summary.columns) == SUMMARY_COLUMNS
    assert list(result.samples.columns) == SAMPLE_COLUMNS
    bounded = result.summary[result.summary["eps"].notna()]
    assert set(bounded["attack"]) == {"fgsm", "pgd", "cw", "worst-case"}
    assert len(bounded) == 4 * 2
    unbounded = result.summary[result.summary["eps"].isna()]
    assert list(unbounded["attack"]) == ["cw"] and list(unbounded["norm"]) == ["l2"]
    # one row per (sample, attack, eps): 3 attacks x 2 eps + CW's unbounded run + the worst case at 2 eps
    assert len(result.samples) == 60 * (3 * 2 + 1 + 2)
    assert (result.samples["attack"] == "worst-case").sum() == 60 * 2
    meta = result.metadata
    for key in ("robustlab_version", "torch_version", "device", "seed", "started", "finished", "models", "data", "config"):
        assert key in meta
    assert meta["models"]["cnn"]["sha256"] == robustlab.ModelUnderTest(digits_model()).sha256()
    assert meta["data"]["sha256"] == digits_test(60).fingerprint()


def test_accuracies_recomputed_from_samples(result):
    s = result.samples
    for _, row in result.summary[result.summary["attack"] != "worst-case"].iterrows():
        rows = s[(s["attack"] == row["attack"]) & (s["eps"].fillna(-1) == (-1 if pd.isna(row["eps"]) else row["eps"]))]
        assert row["robust_accuracy"] == pytest.approx((rows["adv_pred"] == rows["label"]).mean())
        assert row["clean_accuracy"] == pytest.approx((rows["clean_pred"] == rows["label"]).mean())
        attacked = rows[rows["attacked"]]
        assert (attacked["clean_correct"]).all()
        assert row["success_rate"] == pytest.approx(attacked["success"].mean())
        # a misclassified clean sample is never robust
        assert not rows.loc[~rows["clean_correct"], "robust"].any()


def test_worst_case_is_per_sample_not_min_of_averages(result):
    s, summary = result.samples, result.summary
    for eps in (0.05, 0.15):
        at = s[s["eps"] == eps]
        per_sample = at.groupby("sample")["robust"].all()
        worst = summary[(summary["attack"] == "worst-case") & (summary["eps"] == eps)]["robust_accuracy"].item()
        assert worst == pytest.approx(per_sample.mean())
        each = summary[(summary["eps"] == eps) & (summary["attack"] != "worst-case")]["robust_accuracy"]
        assert worst <= each.min() + 1e-12


def test_pgd_beats_fgsm_and_robustness_falls_with_eps(result):
    acc = result.robust_accuracy
    for eps in (0.05, 0.15):
        assert acc(attack="pgd", eps=eps) <= acc(attack="fgsm", eps=eps) + 0.02
    assert acc(eps=0.15) < acc(eps=0.05)


def test_perturbations_stay_in_budget(result):
    s = result.samples
    bounded = s[s["eps"].notna()]
    attacks = bounded[bounded["attack"] != "worst-case"]
    assert (attacks["linf"] <= attacks["eps"] * (1 + 1e-6)).all()
    # worst-case rows keep the smallest adversarial perturbation found, and none where nothing was found
    worst = bounded[bounded["attack"] == "worst-case"]
    broken = worst["clean_correct"] & ~worst["robust"]
    assert (worst.loc[broken, "linf"] <= worst.loc[broken, "eps"] * (1 + 1e-6)).all()
    assert worst.loc[~broken, "linf"].isna().all()


def test_seeded_runs_are_identical_and_batch_size_does_not_matter():
    kwargs = dict(attacks=("pgd", "cw"), suite="none", eps=(0.1,), steps=5, seed=3)
    a = robustlab.audit(digits_model(), digits_test(40), **kwargs)
    b = robustlab.audit(digits_model(), digits_test(40), batch_size=7, **kwargs)
    c = robustlab.audit(digits_model(), digits_test(40), **kwargs)
    pd.testing.assert_frame_equal(a.samples, c.samples)
    pd.testing.assert_frame_equal(a.samples, b.samples, check_exact=False, rtol=1e-5, atol=1e-6)
    d = robustlab.audit(digits_model(), digits_test(40), **{**kwargs, "seed": 4})
    assert not np.array_equal(a.samples["l2"].to_numpy(), d.samples["l2"].to_numpy())


@pytest.mark.parametrize("mode", ["next", "random", "least-likely"])
def test_targeted_modes(mode):
    r = robustlab.audit(digits_model(), digits_test(40), attacks=("pgd",), suite="none", eps=(0.2,), steps=10, targeted=mode)
    s = r.samples
    assert (s["targeted"] == mode).all()
    assert (s["target"] != s["label"]).all()
    assert (s.loc[s["success"], "adv_pred"] == s.loc[s["success"], "target"]).all()
    assert ((s["adv_pred"] == s["target"]) & s["attacked"]).sum() == s["success"].sum()
    if mode == "next":
        assert (s["target"] == (s["label"] + 1) % 10).all()
    assert r.summary["success_rate"].iloc[0] > 0.1  # a sign error would give ~0 (foolbox: 25% for least-likely)


def test_targeted_all_and_fixed_label():
    r = robustlab.audit(digits_model(), digits_test(20), attacks=("fgsm",), suite="none", eps=(0.1,), targeted=["all", "3"])
    s = r.samples[r.samples["attack"] == "fgsm"]  # the integrity checks add pgd-margin rows
    every = s[s["targeted"] == "all"]
    assert len(every) == 20 * 9
    assert every.groupby("sample")["target"].nunique().eq(9).all()
    fixed = s[s["targeted"] == "3"]
    assert (fixed["target"] == 3).all()
    assert not fixed.loc[fixed["label"] == 3, "attacked"].any()
    # robust under 'all' means robust against every target
    row = r.summary[(r.summary["targeted"] == "all") & (r.summary["attack"] == "fgsm")].iloc[0]
    assert row["robust_accuracy"] == pytest.approx(every.groupby("sample")["robust"].all().mean())


def test_several_models_side_by_side():
    r = robustlab.audit({"a": digits_model(), "b": robustlab.ModelUnderTest(digits_model())}, digits_test(20),
                        attacks=("fgsm",), suite="none", eps=(0.1,))
    assert set(r.summary["model"]) == {"a", "b"} and set(r.samples["model"]) == {"a", "b"}


def test_save_and_load_round_trip(result, tmp_path):
    result.save(tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["schema"] == "robustlab.results/2"
    assert {r["attack"] for r in doc["summary"]} == {"fgsm", "pgd", "cw", "worst-case"}
    loaded = robustlab.load(tmp_path / "out")
    pd.testing.assert_frame_equal(loaded.samples, result.samples, check_exact=False, rtol=1e-8)
    pd.testing.assert_frame_equal(loaded.summary, result.summary, check_exact=False, rtol=1e-8, check_dtype=False)
    assert loaded.metadata == json.loads(json.dumps(doc["metadata"]))
    # every audit carries its evaluation, checks or not: here no suite and no checks
    assert [(v["eps"], v["status"], v["reasons"]) for v in doc["metadata"]["evaluation"]] == [
        (e, "weaker than standard", ["no attack suite", "integrity checks not run"]) for e in (0.05, 0.15)]


def test_results_of_schema_1_are_upgraded_on_load(result, tmp_path):
    """A /1 file (verdict "robust", thresholds) reads as /2: evaluation recomputed, thresholds re-judged."""
    from robustlab import verdicts

    result.save(tmp_path / "old")
    path = tmp_path / "old" / "results.json"
    doc = json.loads(path.read_text())
    meta = doc["metadata"]
    evaluations = meta.pop("evaluation")
    meta["verdict"] = [{"model": v["model"], "norm": v["norm"], "eps": v["eps"], "targeted": v["targeted"],
                        "verdict": "robust", "robust_accuracy": v["robust_accuracy"], "reasons": []}
                       for v in evaluations]
    eps = evaluations[0]["eps"]
    meta["thresholds"] = [{"metric": "robust_accuracy", "value": 0.01, "eps": eps,
                           "description": f"robust_accuracy >= 0.01 at eps={eps:g}", "model": "cnn",
                           "attack": "worst-case", "targeted": "none", "observed": 0.5, "passed": True}]
    doc["schema"] = "robustlab.results/1"
    path.write_text(json.dumps(doc))
    old = robustlab.load(tmp_path / "old")
    assert "verdict" not in old.metadata and "thresholds" not in old.metadata
    assert old.metadata["migrated_from"] == "robustlab.results/1"
    # the old "robust" becomes what the evidence supports: no checks were run, so weaker than standard
    assert [v["status"] for v in old.metadata["evaluation"]] == [verdicts.WEAKER] * len(evaluations)
    [judged] = old.metadata["requirements"]
    assert judged["requirement"] == f"robust_accuracy >= 0.01 at eps={eps:g}" and judged["outcome"] == "meets"
    old.save(tmp_path / "old")
    assert json.loads(path.read_text())["schema"] == "robustlab.results/2"
    with pytest.raises(InputError, match="schema"):
        path.write_text(json.dumps(doc | {"schema": "robustlab.results/0"}))
        robustlab.load(tmp_path / "old")


def test_save_refuses_foreign_directory_and_leaves_nothing(result, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty"):
        result.save(foreign)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=(-0.1,)), "eps"),
    (dict(eps=(float("nan"),)), "eps"),
    (dict(eps=(8,)), "8/255"),
    (dict(attacks=("deepfool",), suite="none"), "unknown attack"),
    (dict(norm="l3"), "unknown norm"),
    (dict(targeted="sideways"), "unknown mode"),
    (dict(targeted=12), "out of range"),
    (dict(seed=-1), "seed"),
    (dict(batch_size=0), "batch_size"),
    (dict(device="tpu"), "device"),
])
def test_bad_arguments_fail_before_work(kwargs, match):
    with pytest.raises(InputError, match=match):
        robustlab.audit(digits_model(), digits_test(10), **kwargs)


def test_bad_data_fails_before_work():
    d = digits_test(10)
    x, y = d.x.clone(), d.y.clone()
    x[3, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        robustlab.audit(digits_model(), (x, y))
    with pytest.raises(InputError, match="outside the bounds"):
        robustlab.audit(digits_model(), (d.x * 2, y))
    with pytest.raises(InputError, match=r"\[0, 9\]"):
        robustlab.audit(digits_model(), (d.x, y + 5))
    with pytest.raises(InputError, match="floating point"):
        robustlab.audit(digits_model(), ((d.x * 16).to(torch.uint8), y))
    with pytest.raises(InputError, match="probabilities"):
        robustlab.audit(Softmaxed(digits_model()).eval(), d)


def test_chance_level_model_is_flagged():
    from robustlab.model import RobustlabWarning
    from robustlab.zoo import DigitsCNN

    with pytest.warns(RobustlabWarning, match="chance level"):
        robustlab.audit(DigitsCNN().eval(), digits_test(40), attacks=("fgsm",), suite="none", eps=(0.1,))


def test_examples_hold_verified_adversarial_inputs(result, tmp_path):
    from robustlab.results import example_key

    ex = result.examples
    ids, clean = ex["sample|cnn"], ex["clean|cnn"]
    assert len(ids) == 8 and clean.shape == (8, 1, 8, 8)
    data = digits_test(60)
    position = {int(i): p for p, i in enumerate(data.indices)}  # sample ids index the source data set
    assert np.array_equal(clean, data.x[[position[int(i)] for i in ids]].numpy())
    s = result.samples
    for eps in (0.05, 0.15):
        adv = ex[example_key("cnn", "pgd", eps, "none")]
        assert np.abs(adv - clean).reshape(8, -1).max(axis=1).max() <= eps * (1 + 1e-6)
        rows = s[(s["attack"] == "pgd") & (s["eps"] == eps)].set_index("sample").loc[ids]
        with torch.no_grad():
            pred = digits_model()(torch.from_numpy(adv)).argmax(1).numpy()
        assert np.array_equal(pred, rows["adv_pred"].to_numpy())  # the stored inputs are the audited ones
    result.save(tmp_path / "r")
    loaded = robustlab.load(tmp_path / "r").examples
    assert set(loaded) == set(ex) and all(np.array_equal(loaded[k], ex[k]) for k in ex)


def test_harness_module_does_not_shadow_the_audit_function():
    """Importing the harness module first must leave robustlab.audit the function (it once did not)."""
    import subprocess
    import sys

    code = ("import robustlab.harness, robustlab; from robustlab.harness import resolve_device; "
            "assert callable(robustlab.audit) and robustlab.audit.__module__ == 'robustlab.harness'")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).returncode == 0


def test_the_table_writes_eps_as_people_do_and_its_columns_never_run_together():
    """--eps 2/255 printed as eps=0.00784314, wider than its 11-character column (issue 20)."""
    import pandas as pd

    from robustlab.results import format_table

    rows = [{"model": "m", "attack": a, "norm": "linf", "eps": e, "targeted": "none", "n": 10, "clean_accuracy": 0.9,
             "robust_accuracy": r, "success_rate": 0.1, "median_l2": 0.1, "median_linf": e}
            for a in ("pgd", "worst-case") for e, r in ((2 / 255, 0.5), (8 / 255, 0.25), (0.1, 0.125))]
    text = format_table(pd.DataFrame(rows))
    header = next(line for line in text.splitlines() if "eps=" in line)
    assert header.split()[2:] == ["eps=2/255", "eps=8/255", "eps=0.1"]
    worst = next(line for line in text.splitlines() if line.strip().startswith("worst-case"))
    assert worst.split()[1:] == ["50.0%", "25.0%", "12.5%"]
    assert header.index("eps=8/255") + len("eps=8/255") == worst.index("25.0%") + len("25.0%")  # right-aligned
