"""Robustness gates for the digits demo model, run by robustlab's pytest plugin.

    pytest examples/ci/test_model_robustness.py --robustlab-report robustness-report
    pytest examples/ci/test_model_robustness.py --robustlab-quick                      # pull requests
    pytest examples/ci/test_model_robustness.py --robustlab-save-baseline examples/ci/robustness-baseline.json
    pytest examples/ci/test_model_robustness.py --robustlab-baseline examples/ci/robustness-baseline.json \
        --robustlab-compare-fail robust_accuracy:2%

In your own project, replace the `model` and `test_data` fixtures with your release candidate and
your held-out data (any `robustlab.audit` data: an .npz, (x, y) arrays, a Dataset or DataLoader).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def model():
    """The demo CNN (trained on scikit-learn's digits once, then cached; see `robustlab demo`)."""
    from robustlab.demo import digits_cnn

    net, _ = digits_cnn()
    return net


@pytest.fixture(scope="session")
def test_data():
    from robustlab.data import digits_split

    return digits_split("test").head(200)


# One gate: PGD at Linf eps 0.05 must leave at least 75% of the 200 samples correctly classified
# (the demo CNN: 98.5% clean, 88% under PGD-20 at eps 0.05).
@pytest.mark.robustness(attack="pgd", eps=0.05, min_accuracy=0.75, min_clean_accuracy=0.95, name="digits-cnn")
def test_release_candidate_resists_pgd(robustlab, model, test_data):
    robustlab.check(model, test_data)


# Several attacks: the gate reads the per-sample worst case over them, at every eps listed.
@pytest.mark.robustness(attack=["fgsm", "pgd", "cw"], eps=[0.02, 0.05], min_accuracy=0.75, name="digits-cnn")
def test_release_candidate_worst_case(robustlab, model, test_data):
    robustlab.check(model, test_data)


# A targeted threat model: the attacker picks the least-likely class.
@pytest.mark.robustness(attack="pgd", eps=0.05, targeted="least-likely", min_accuracy=0.9, name="digits-cnn")
def test_release_candidate_targeted(robustlab, model, test_data):
    robustlab.check(model, test_data)


# The same gates written by hand: audit with the session's device/seed/quick settings, then assert.
def test_release_candidate_by_hand(robustlab, model, test_data):
    result = robustlab.audit(model, test_data, attacks=["fgsm", "pgd"], eps=[0.02, 0.05], name="digits-cnn")
    robustlab.assert_robust(result, attack="pgd", eps=0.02, min_accuracy=0.9)
    robustlab.assert_robust(result, attack="worst-case", eps=0.05, min_accuracy=0.75)
