"""The attack registry, and MI-FGSM: the attack added through it (one file plus one registration).

MI-FGSM (Dong et al. 2018) gets what every attack gets: invariants on every output over random
problems (ball, box, success re-checked by a fresh forward pass), seeded repeatability, and the
independent reference: torchattacks' MIFGSM on the same model and samples, per sample. The
registry is checked through each face that reads it: get_attack, the audit (norm, --steps,
--loss), the CLI help and the plugin's quick budget.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import robustlab
from robustlab.attacks import ATTACKS, CW, MIFGSM, PGD, get_attack, registry
from robustlab.attacks.registry import register_attack
from robustlab.cli import build_parser
from robustlab.errors import InputError
from robustlab.harness import _build_attack
from test_attack_properties import _settings, problems

pytestmark = pytest.mark.usefixtures("one_thread")


@_settings(25)
@given(p=problems(), steps=st.integers(1, 8), decay=st.sampled_from([0.0, 0.5, 1.0]),
       loss=st.sampled_from(["ce", "margin"]))
def test_mifgsm_invariants(p, steps, decay, loss, check_outcome):
    outcome = MIFGSM(eps=p.eps, norm=p.norm, steps=steps, decay=decay, loss=loss)(p.model, p.x, p.y, targets=p.targets)
    check_outcome(p.model, p.x, p.y, p.targets, outcome, eps=p.eps, norm=p.norm)
    again = MIFGSM(eps=p.eps, norm=p.norm, steps=steps, decay=decay, loss=loss)(p.model, p.x, p.y, targets=p.targets)
    assert torch.equal(outcome.x_adv, again.x_adv)


@pytest.mark.parametrize("bad", [{"steps": 0}, {"steps": True}, {"decay": -1.0}, {"step_size": 0.0}, {"loss": "dlr2"}])
def test_mifgsm_refuses_bad_settings_by_name(bad, digits_mut, digits_correct):
    with pytest.raises(InputError) as raised:
        MIFGSM(eps=0.1, **bad)(digits_mut, digits_correct.x[:4], digits_correct.y[:4])
    assert next(iter(bad)) in str(raised.value)


torchattacks = pytest.importorskip("torchattacks")


@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_mifgsm_equals_torchattacks_mifgsm_per_sample(eps, digits_module, digits_mut, digits_correct):
    """Same model, samples, 10 steps, alpha eps/10, decay 1: the same adversarial per sample (up to
    float rounding: torchattacks normalises by the mean absolute gradient, we by its sum, which
    differs by a constant and can flip the sign of a momentum component at exactly 0), and
    robust accuracy equal within one sample."""
    x, y = digits_correct.x[:200], digits_correct.y[:200]
    ours = MIFGSM(eps=eps, steps=10)(digits_mut, x, y)
    reference = torchattacks.MIFGSM(digits_module, eps=eps, alpha=eps / 10, steps=10, decay=1.0)
    x_ref = reference(x, y)
    with torch.no_grad():
        theirs_fooled = digits_module(x_ref).argmax(1) != y
    # torchattacks runs all 10 steps; we keep the first fooling iterate, so compare the verdicts
    # and, where both run to the end (not fooled by either), the points themselves.
    assert abs(int(ours.success.sum()) - int(theirs_fooled.sum())) <= 1, (int(ours.success.sum()), int(theirs_fooled.sum()))
    both_robust = ~ours.success & ~theirs_fooled
    assert int(both_robust.sum()) > 10
    gap = (ours.x_adv[both_robust] - x_ref[both_robust]).abs().amax()
    assert float(gap) <= 1e-5, float(gap)
    assert float((ours.x_adv - x).abs().amax()) <= eps * (1 + 1e-6)


def test_mifgsm_is_stronger_than_fgsm_at_equal_budget(digits_mut, digits_correct):
    x, y = digits_correct.x, digits_correct.y
    mi = MIFGSM(eps=0.1)(digits_mut, x, y)
    one = get_attack("fgsm", eps=0.1)(digits_mut, x, y)
    assert mi.success.double().mean() >= one.success.double().mean()


# ============================================================================ the registry, through each face
def test_every_registered_attack_builds_by_name_and_matches_its_class():
    assert set(registry.names()) >= {"fgsm", "pgd", "cw", "square", "apgd-ce", "apgd-t", "fab-t", "mifgsm", "cascade"}
    for name in registry.names():
        built = get_attack(name.upper())
        assert type(built) is ATTACKS[name] and built.name == name
    assert "mifgsm" in ATTACKS and len(ATTACKS) == len(registry.names())


def test_the_audit_configures_attacks_from_their_registration():
    mi = _build_attack("mifgsm", "l2", steps=5, restarts=3, loss="margin")
    assert (mi.norm, mi.steps, mi.loss) == ("l2", 5, "margin")  # restarts: not an MI-FGSM option
    pgd = _build_attack("pgd", "l2", steps=7, restarts=2, loss=None)
    assert (pgd.norm, pgd.steps, pgd.restarts, pgd.loss) == ("l2", 7, 2, PGD.loss)
    cw = _build_attack("cw", "linf", steps=9, restarts=None, loss="margin")
    assert (cw.norm, cw.steps) == ("l2", 9)  # the L2 attack keeps its norm
    apgd = _build_attack("apgd-t", "l2", steps=7, restarts=None, loss="ce")
    assert (apgd.norm, apgd.steps, apgd.loss) == ("l2", 100, "dlr")  # keeps its published schedule


def test_quick_budget_caps_and_keeps_smaller_values():
    entry = registry.entry("cw")
    assert entry is not None
    capped = entry.quick_budget(CW())
    assert (capped.steps, capped.binary_search_steps) == (20, 3)
    assert entry.quick_budget(CW(steps=5, binary_search_steps=2)) == CW(steps=5, binary_search_steps=2)
    assert registry.entry("mifgsm").quick_budget(MIFGSM(steps=50)).steps == 10


def test_cli_help_lists_every_registered_attack(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["audit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in registry.names():
        assert name in text
    assert "momentum iterative FGSM" in text


def test_registering_twice_or_with_unknown_options_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_attack(MIFGSM, summary="again")
    with pytest.raises(ValueError, match="audit_options"):
        register_attack(MIFGSM, name="mifgsm-x", summary="x", audit_options=("epochs",))


def test_an_audit_runs_the_new_attack_by_name(digits_module):
    result = robustlab.audit(digits_module, n=40, attacks=["mifgsm"], eps=[0.1], suite="none", checks="none")
    rows = result.summary[result.summary.attack == "mifgsm"]
    assert len(rows) == 1 and 0.0 <= float(rows.robust_accuracy.iloc[0]) <= float(rows.clean_accuracy.iloc[0])
