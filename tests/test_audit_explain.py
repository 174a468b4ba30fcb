"""The audit's explanation stage: `audit(..., explain=...)`, its saved frames and maps, the report."""

from __future__ import annotations

import numpy as np
import pytest

from robustlab import audit, load
from robustlab.defenses import ensemble
from robustlab.errors import InputError
from robustlab.reports import render

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def explained(digits_module, digits_test, tmp_path_factory):
    result = audit({"cnn": digits_module}, digits_test, attacks=["fgsm", "pgd"], suite="none", eps=[0.05, 0.2], n=80,
                   explain="saliency,shap,probes", checks="none", progress=False)
    out = tmp_path_factory.mktemp("explained") / "r"
    result.save(out)
    return result, out


def test_frames_cover_clean_and_each_pgd_budget(explained):
    result, _ = explained
    info = result.metadata["explain"]["cnn"]
    assert info["keys"] == ["pgd|0.05", "pgd|0.2"] and not info["skipped"]
    saliency = result.tables["explain_saliency"]
    assert set(saliency["key"]) == {"clean", "pgd|0.05", "pgd|0.2"}
    assert (saliency["model"] == "cnn").all()
    n = info["samples"]["saliency"]
    assert n == min(100, int((result.samples.query("attack == 'pgd' and eps == 0.05")["clean_correct"]).sum()))
    # the explained samples are the attacked ones, and their adversarial predictions are the audit's
    rows = result.samples.query("attack == 'pgd' and eps == 0.2").set_index("sample")
    adv = saliency[saliency["key"] == "pgd|0.2"].set_index("sample")
    assert rows.loc[adv.index, "clean_correct"].all()
    assert (rows.loc[adv.index, "adv_pred"].to_numpy() == adv["pred"].to_numpy()).all()
    # the larger budget moves the attribution further
    med = result.tables["explain_saliency_summary"].set_index("key")["spearman_median"]
    assert med["pgd|0.2"] < med["pgd|0.05"] < 1.0
    layers = result.tables["explain_probe_layers"]
    assert (layers["label_accuracy"] > layers["control_accuracy"]).all()
    assert {"explain_shap_shift", "explain_sanity", "explain_probe_adversarial"} <= set(result.tables)


def test_saved_tables_and_maps_round_trip_and_render(explained):
    result, out = explained
    again = load(out)
    assert set(again.tables) == set(result.tables)
    for name, frame in result.tables.items():
        assert len(again.tables[name]) == len(frame), name
    key = "explain|saliency|cnn|pgd|0.2"
    assert np.allclose(again.examples[key], result.examples[key])
    html = (render(out) and (out / "report.html").read_text())
    assert "What the attacks changed" in html and "Layer probes" in html and "Sanity check" in html


def test_vote_ensemble_gets_probes_only(digits_module, digits_test):
    vote = ensemble([digits_module, digits_module], "vote", example_input=digits_test.x[:2])
    result = audit({"vote": vote}, digits_test, attacks=["fgsm"], suite="none", eps=0.1, n=60, explain="all", checks="none",
                   progress=False)
    info = result.metadata["explain"]["vote"]
    assert set(info["skipped"]) == {"saliency", "shap"} and "transfer" in info["skipped"]["saliency"]
    assert "explain_probe_layers" in result.tables and "explain_saliency" not in result.tables


def test_unknown_stage_is_refused_before_any_work(digits_module, digits_test):
    with pytest.raises(InputError, match="unknown explanation colours"):
        audit(digits_module, digits_test, explain="saliency,colours", n=10, progress=False)
