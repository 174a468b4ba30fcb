"""robustlab.explain.probes: layer activations, label/control probes, adversarial crossing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explain_support import Failing, ReusedRelu, hook_count
from robustlab.errors import InputError
from robustlab.explain.probes import capture, layer_names, probe_report
from robustlab.model import ModelUnderTest
from robustlab.training import seeded_init
from robustlab.zoo import DigitsCNN

pytestmark = pytest.mark.usefixtures("one_thread")

N = 300  # held-out digits used by the probe tests (30% of them form the probes' test split)


@pytest.fixture(scope="module")
def pgd_digits(digits_module, digits_test):
    from robustlab.attacks import PGD

    mut = ModelUnderTest(digits_module, bounds=(0.0, 1.0))
    x, y = digits_test.x[:N], digits_test.y[:N]
    outcome = PGD(eps=0.1)(mut, x, y)
    return mut, x, y, outcome


@pytest.fixture(scope="module")
def trained_report(pgd_digits):
    mut, x, y, outcome = pgd_digits
    return probe_report(mut, x, y, {"pgd|0.1": (outcome.x_adv, outcome.adv_pred)}, seed=0)


def test_capture_named_layers_matches_the_modules_outputs(digits_module, digits_test):
    mut = ModelUnderTest(digits_module, bounds=(0.0, 1.0))
    x = digits_test.x[:20]
    acts = capture(mut, x, layers=["classifier.3", "features.4", "features.2"])
    assert list(acts) == ["features.2", "features.4", "classifier.3"]  # forward order
    with torch.no_grad():
        pooled = digits_module.features(x)
        conv2 = digits_module.features[:3](x)
        logits = digits_module(x)
    torch.testing.assert_close(acts["classifier.3"], logits)
    torch.testing.assert_close(acts["features.4"], pooled.flatten(1))
    # 32 x 8 x 8 = 2048 values > 1024: average-pooled to 32 x 5 x 5
    torch.testing.assert_close(acts["features.2"], torch.nn.functional.adaptive_avg_pool2d(conv2, 5).flatten(1))
    assert all(a.dtype == torch.float32 and a.shape[0] == 20 for a in acts.values())
    everything = capture(mut, x)
    assert list(everything) == layer_names(mut) and len(everything) == 9
    assert hook_count(digits_module) == 0


def test_unknown_layer_is_an_input_error(digits_module, digits_test):
    mut = ModelUnderTest(digits_module, bounds=(0.0, 1.0))
    with pytest.raises(InputError) as info:
        capture(mut, digits_test.x[:4], layers=["features.0", "features.9"])
    assert info.value.argument == "layers" and "features.9" in str(info.value)
    with pytest.raises(InputError) as info:
        probe_report(mut, digits_test.x[:40], digits_test.y[:40], {}, layers=["nope"])
    assert info.value.argument == "layers"
    assert hook_count(digits_module) == 0


def test_hooks_are_removed_when_the_forward_raises():
    model = Failing().eval()
    mut = ModelUnderTest(model, bounds=(0.0, 1.0))
    x = torch.rand(8, 4)
    assert set(capture(mut, x)) == {"first", "second"}
    model.explode = True
    with pytest.raises(RuntimeError, match="boom"):
        capture(mut, x)
    assert hook_count(model) == 0


def test_a_module_called_twice_is_recorded_per_call(digits_module, digits_test):
    model = ReusedRelu(digits_module).eval()
    acts = capture(ModelUnderTest(model), digits_test.x[:5], layers=["relu"])
    assert list(acts) == ["relu", "relu#2", "relu#3"]
    assert [a.shape[1] for a in acts.values()] == [16 * 8 * 8, 32 * 5 * 5, 64]  # 2048 values pooled to 800


def test_label_probes_beat_the_control_task_at_every_layer(trained_report):
    layers = trained_report.layers
    assert len(layers) == 9
    assert (layers["label_accuracy"] > 0.85).all()
    assert (layers["selectivity"] > 0.1).all(), layers
    np.testing.assert_allclose(layers["selectivity"], layers["label_accuracy"] - layers["control_accuracy"])
    assert trained_report.control_labels is not None
    # control labels are constant within an input cluster, drawn from the label distribution
    assert set(np.unique(trained_report.control_labels)) <= set(range(10))


def test_detectability_of_pgd(pgd_digits, trained_report):
    """Clean vs PGD eps=0.1 activations: the detection probe sees the perturbation near the input
    (AUC ~0.99), in the last convolutional representation (features.4: ~0.9) and in the logits,
    where it needs the sorted activations (the attack lowers the margin, which is not linear in the
    raw logits: ~0.57 without them). The last-layer number is checked against a plain scikit-learn
    logistic regression on the same split and the same features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    frame = trained_report.adversarial.set_index("layer")
    assert frame.loc["features.0", "detect_auc"] > 0.95
    assert frame.loc["features.4", "detect_auc"] > 0.8
    mut, x, y, outcome = pgd_digits
    with torch.no_grad():
        clean, adv = mut(x).double().numpy(), mut(outcome.x_adv).double().numpy()
    train, test = trained_report.split["train"], trained_report.split["test"]
    raw = np.concatenate([clean, adv])
    ordered = -np.sort(-raw, axis=1)
    target = np.r_[np.zeros(N), np.ones(N)]
    tr, te = np.r_[train, train + N], np.r_[test, test + N]
    a, b = StandardScaler().fit(raw[tr]), StandardScaler().fit(ordered[tr])

    def features(rows):
        return np.hstack([a.transform(raw[rows]), b.transform(ordered[rows])])

    reference = LogisticRegression(max_iter=200).fit(features(tr), target[tr])
    auc = roc_auc_score(target[te], reference.decision_function(features(te)))
    assert abs(frame.loc["classifier.3", "detect_auc"] - auc) < 1e-6
    assert auc > 0.8  # well above chance at the last layer
    linear_only = LogisticRegression(max_iter=200).fit(a.transform(raw[tr]), target[tr])
    assert roc_auc_score(target[te], linear_only.decision_function(a.transform(raw[te]))) < auc - 0.2


def test_clean_probes_on_adversarial_activations_and_crossing(pgd_digits, trained_report):
    mut, x, y, outcome = pgd_digits
    frame = trained_report.adversarial.set_index("layer")
    test = trained_report.split["test"]
    success = test[(outcome.adv_pred != y).numpy()[test]]
    assert (frame["n_success"] == len(success)).all() and len(success) > 10
    # the clean probes' accuracy on adversarial inputs is lower than on clean inputs at the last layer
    clean_acc = trained_report.layers.set_index("layer").loc["classifier.3", "label_accuracy"]
    assert frame.loc["classifier.3", "accuracy"] < clean_acc - 0.1
    crossing = trained_report.crossing.set_index("key").loc["pgd|0.1"]
    order = list(trained_report.layers["layer"])
    for column, field, above in (("layer_not_true", "success_true", False),
                                 ("layer_adversarial", "success_adversarial", True)):
        values = frame.loc[order, field].to_numpy()
        hits = values > 0.5 if above else values < 0.5
        expected = order[int(np.argmax(hits))] if hits.any() else None
        assert (crossing[column] if isinstance(crossing[column], str) else None) == expected


def test_selectivity_collapses_in_a_random_network(pgd_digits, trained_report):
    """An untrained (seeded) DigitsCNN keeps the input's information in its early layers (random
    convolutions; selectivity there is like the trained one's), but its classifier layers lose it:
    the trained network's selectivity grows towards the output, the random one's falls."""
    mut, x, y, _ = pgd_digits
    random_net = seeded_init(DigitsCNN, 0).eval()
    rand = probe_report(ModelUnderTest(random_net, bounds=(0.0, 1.0)), x, y, {}, seed=0).layers.set_index("layer")
    trained = trained_report.layers.set_index("layer")
    head = ["classifier.1", "classifier.2", "classifier.3"]
    assert rand.loc[head, "selectivity"].mean() < trained.loc[head, "selectivity"].mean() - 0.1
    assert rand.loc["classifier.3", "selectivity"] < trained.loc["classifier.3", "selectivity"] - 0.2
    assert rand.loc["classifier.3", "label_accuracy"] < trained.loc["classifier.3", "label_accuracy"] - 0.2


def test_targets_and_bad_input(pgd_digits):
    mut, x, y, outcome = pgd_digits
    x, y = x[:60], y[:60]
    goal = (y + 1) % 10
    report = probe_report(mut, x, y, {"t": (outcome.x_adv[:60], outcome.adv_pred[:60])}, targets={"t": goal},
                          layers=["classifier.3"])
    assert list(report.layers["layer"]) == ["classifier.3"]
    test = report.split["test"]
    assert report.adversarial.loc[0, "n_success"] == int((outcome.adv_pred[:60] == goal).numpy()[test].sum())
    for kwargs, argument in ((dict(adversarial={"a": (x[:5], y[:5])}), "adversarial['a']"),
                             (dict(y=y.float()), "y"), (dict(x_clean=x[:5], y=y[:5]), "x_clean"),
                             (dict(targets={"zzz": goal}), "targets"), (dict(control_clusters=1), "control_clusters")):
        call = dict(x_clean=x, y=y, adversarial={})
        call.update(kwargs)
        with pytest.raises(InputError) as info:
            probe_report(mut, call.pop("x_clean"), call.pop("y"), call.pop("adversarial"), **call)
        assert info.value.argument == argument
