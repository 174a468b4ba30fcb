"""APGD-CE, APGD-T and the standard cascade: invariants, closed forms, reference comparisons.

- Invariants on every output (ball, bounds, success re-checked by a fresh forward pass) over
  random problems, like every other attack (test_attack_properties.py).
- A closed form: on a binary linear model away from the box faces, the smallest Linf perturbation
  that flips a sample is |margin| / ||w||_1, so APGD must flip every sample whose distance is
  clearly inside eps, and can flip none outside.
- Batch-size and sample-id invariance (per-sample seeding), and the cascade's bookkeeping.
- Against the independent reference: torchattacks' port of AutoAttack's APGD and APGD-T on the
  same model and samples (the full cascade against the full AutoAttack on adversarially trained
  models is in test_attack_cascade.py, marked slow).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from robustlab.attacks import APGD, APGDT, PGD, Cascade
from robustlab.attacks import apgd as apgd_module
from robustlab.attacks.apgd import checkpoint_schedule, target_groups
from robustlab.attacks.losses import dlr
from robustlab.model import ModelUnderTest
from robustlab.threat import Bounds
from support import Scale, digits_model, digits_test
from test_attack_properties import _settings, problems

pytestmark = pytest.mark.usefixtures("one_thread")


# ============================================================================ invariants
@_settings(25)
@given(p=problems(), steps=st.integers(1, 12), restarts=st.integers(1, 2), loss=st.sampled_from(["ce", "dlr", "margin"]),
       seed=st.integers(0, 2**20))
def test_apgd_invariants(p, steps, restarts, loss, seed, check_outcome):
    outcome = APGD(eps=p.eps, norm=p.norm, steps=steps, restarts=restarts, loss=loss)(
        p.model, p.x, p.y, targets=p.targets, seed=seed)
    check_outcome(p.model, p.x, p.y, p.targets, outcome, eps=p.eps, norm=p.norm)


@_settings(25)
@given(p=problems(), steps=st.integers(1, 8), n_targets=st.integers(1, 9), seed=st.integers(0, 2**20))
def test_apgd_t_invariants(p, steps, n_targets, seed, check_outcome):
    outcome = APGDT(eps=p.eps, norm=p.norm, steps=steps, n_targets=n_targets)(
        p.model, p.x, p.y, targets=p.targets, seed=seed)
    check_outcome(p.model, p.x, p.y, p.targets, outcome, eps=p.eps, norm=p.norm)


@_settings(10)
@given(p=problems(eps_zero=False), seed=st.integers(0, 2**20))
def test_quick_cascade_invariants(p, seed, check_outcome):
    outcome = Cascade(eps=p.eps, norm=p.norm, suite="quick")(p.model, p.x, p.y, targets=p.targets, seed=seed)
    check_outcome(p.model, p.x, p.y, p.targets, outcome, eps=p.eps, norm=p.norm)
    assert outcome.attack == "cascade-quick"
    assert [bool(b) for b in outcome.broken_by] == outcome.success.tolist()


@pytest.mark.parametrize("attack", [APGD(eps=0.0, steps=3), APGDT(eps=0.0, norm="l2", steps=3)], ids=["ce", "t"])
def test_eps_zero_returns_x_exactly(attack, digits_mut, digits_correct):
    x, y = digits_correct.x[:30], digits_correct.y[:30]
    outcome = attack(digits_mut, x, y)
    assert torch.equal(outcome.x_adv, x) and not bool(outcome.success.any())


def test_checkpoints_are_the_published_schedule():
    """p_0 = 0, p_1 = 0.22, p_j+1 = p_j + max(p_j - p_j-1 - 0.03, 0.06): gaps 22, 19, 16, ... 6 of 100."""
    assert checkpoint_schedule(100) == (22, 3, 6)
    assert checkpoint_schedule(5) == (1, 1, 1)


def test_target_groups_cover_every_rank_once_most_likely_first():
    for k, n, rows in ((9, 100, 4096), (9, 1000, 2000), (1, 5, 10), (5, 10, 1)):
        groups = target_groups(k, n, rows)
        assert groups[0] == [0] and sorted(r for g in groups for r in g) == list(range(k))
        assert all(len(g) * n <= max(rows, n) for g in groups[1:])


def test_dlr_is_shift_and_scale_invariant():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 10, generator=g)
    y = torch.randint(0, 10, (50,), generator=g)
    t = (y + 1) % 10
    for targets in (None, t):
        assert torch.allclose(dlr(z, y, targets), dlr(3.0 * z + 7.0, y, targets), atol=1e-5)
    # positive exactly when the attack succeeded (untargeted): the margin's sign
    assert torch.equal(dlr(z, y, None) > 0, z.argmax(1) != y)


# ============================================================================ closed form
@pytest.mark.parametrize("attack", [APGD(steps=30), APGDT(steps=30)], ids=["apgd-ce", "apgd-t"])
def test_apgd_flips_exactly_the_samples_within_the_closed_form_distance(attack, check_outcome):
    """Binary linear model, logit difference w.(x - 1/2), inputs far from the faces of the box: the Linf distance
    to the decision boundary is |w.(x - 1/2)| / ||w||_1. Every sample within 0.9 eps must fall; none
    beyond eps can (the outcome is verified inside the ball)."""
    g = torch.Generator().manual_seed(3)
    d, n, eps = 20, 200, 0.05
    w = torch.randn(d, generator=g)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, 2)).eval()
    with torch.no_grad():
        module[1].weight.copy_(torch.stack([-w / 2, w / 2]))
        module[1].bias.copy_(torch.stack([w.sum() / 4, -w.sum() / 4]))  # boundary through the box's centre
    x = 0.3 + 0.4 * torch.rand(n, d, generator=g)  # eps = 0.05 never reaches a face
    with torch.no_grad():
        y = module(x).argmax(1)
    distance = ((x.double() - 0.5) @ w.double()).abs() / w.abs().sum().double()
    mut = ModelUnderTest(module, bounds=(0.0, 1.0), output="logits")
    outcome = attack.replace(eps=eps)(mut, x, y)
    check_outcome(mut, x, y, None, outcome, eps=eps, norm="linf")
    inside = distance < 0.9 * eps
    assert int(inside.sum()) > 20 and int((distance > eps).sum()) > 20
    assert bool(outcome.success[inside].all()), f"missed {int((inside & ~outcome.success).sum())} reachable samples"
    assert not bool(outcome.success[distance > eps].any())


# ============================================================================ seeding
@pytest.mark.parametrize("attack", [APGD(eps=0.1, steps=10), APGDT(eps=0.8, norm="l2", steps=10, n_targets=3)],
                         ids=["apgd-ce-linf", "apgd-t-l2"])
def test_apgd_does_not_depend_on_batch_size_or_batch_mates(attack, digits_mut, digits_correct):
    x, y = digits_correct.x[:80], digits_correct.y[:80]
    reference = attack(digits_mut, x, y, seed=4)
    assert 0 < int(reference.success.sum()) < len(x)
    small = attack(digits_mut, x, y, seed=4, batch_size=7)
    assert torch.equal(small.success, reference.success)
    assert float((small.x_adv - reference.x_adv).abs().max()) <= 1e-6
    part = attack(digits_mut, x[30:45], y[30:45], sample_ids=torch.arange(30, 45), seed=4)
    assert torch.equal(part.success, reference.success[30:45])
    assert float((part.x_adv - reference.x_adv[30:45]).abs().max()) <= 1e-6


# ============================================================================ cascade bookkeeping
def test_cascade_runs_each_member_on_what_earlier_members_left(digits_mut, digits_correct, check_outcome):
    x, y = digits_correct.x[:120], digits_correct.y[:120]
    cascade = Cascade(eps=0.1, suite="quick")
    outcome = cascade(digits_mut, x, y, seed=0)
    check_outcome(digits_mut, x, y, None, outcome, eps=0.1, norm="linf")
    first = cascade.members()[0](digits_mut, x, y, seed=0)
    # The first member sees every sample with the same seed: what it breaks, the cascade breaks first.
    assert [b == "apgd-ce" for b in outcome.broken_by] == first.success.tolist()
    later = [b for b in outcome.broken_by if b and b != "apgd-ce"]
    assert set(later) <= {"apgd-t"}
    assert bool((outcome.success | ~first.success).all())
    assert outcome.gradient_calls > first.gradient_calls or not later


def test_cascade_is_at_least_as_strong_as_pgd(digits_mut, digits_correct):
    x, y = digits_correct.x, digits_correct.y
    for norm, eps in (("linf", 0.1), ("l2", 0.6)):
        cascade = Cascade(eps=eps, norm=norm, suite="quick")(digits_mut, x, y)
        pgd = PGD(eps=eps, norm=norm, steps=20)(digits_mut, x, y)
        assert int(cascade.success.sum()) >= int(pgd.success.sum()), (norm, eps)


def test_cascade_refuses_unknown_suites(digits_mut, digits_correct):
    from robustlab.errors import InputError

    with pytest.raises(InputError, match="suite"):
        Cascade(eps=0.1, suite="huge")(digits_mut, digits_correct.x[:4], digits_correct.y[:4])


# ============================================================================ reference: torchattacks
torchattacks = pytest.importorskip("torchattacks")


def _robust(module, x_adv, y) -> torch.Tensor:
    with torch.no_grad():
        return module(x_adv).argmax(1) == y


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_apgd_ce_matches_the_reference_apgd_ce(norm, eps, digits_module, digits_mut, digits_correct):
    """Same model, same 200 correctly classified samples, 100 iterations, over 3 seeds: robust
    accuracy within 2 points of torchattacks' APGD (its own seeds), and never more than 1 point
    above it on average."""
    x, y = digits_correct.x, digits_correct.y
    ours, ref = [], []
    for seed in range(3):
        outcome = APGD(eps=eps, norm=norm, steps=100)(digits_mut, x, y, seed=seed)
        ours.append(float((~outcome.success).double().mean()))
        reference = torchattacks.APGD(digits_module, norm="Linf" if norm == "linf" else "L2", eps=eps, steps=100,
                                      seed=seed, loss="ce")
        ref.append(float(_robust(digits_module, reference(x, y), y).double().mean()))
    mean_ours, mean_ref = sum(ours) / 3, sum(ref) / 3
    print(f"APGD-CE {norm} eps={eps}: robustlab {ours} (mean {mean_ours:.4f}), torchattacks {ref} "
          f"(mean {mean_ref:.4f})")
    assert mean_ours <= mean_ref + 0.01
    assert abs(mean_ours - mean_ref) <= 0.02


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_apgd_t_matches_the_reference_apgd_t(norm, eps, digits_module, digits_mut, digits_correct):
    x, y = digits_correct.x[:100], digits_correct.y[:100]
    outcome = APGDT(eps=eps, norm=norm, steps=100, n_targets=9)(digits_mut, x, y)
    reference = torchattacks.APGDT(digits_module, norm="Linf" if norm == "linf" else "L2", eps=eps, steps=100,
                                   n_classes=10, seed=0)
    ref = float(_robust(digits_module, reference(x, y), y).double().mean())
    ours = float((~outcome.success).double().mean())
    print(f"APGD-T {norm} eps={eps}: robustlab {ours:.3f}, torchattacks {ref:.3f}")
    assert ours <= ref + 0.01


def test_bounds_other_than_unit_box(check_outcome, digits_module, digits_correct):
    """The box is the model's declared one: inputs in [0, 255] with the scaling inside the model."""
    module = torch.nn.Sequential(Scale(1 / 255), digits_module).eval()
    mut = ModelUnderTest(module, bounds=Bounds(0.0, 255.0), output="logits")
    x, y = digits_correct.x[:40] * 255, digits_correct.y[:40]
    outcome = APGD(eps=0.1 * 255, steps=20)(mut, x, y)
    check_outcome(mut, x, y, None, outcome, eps=0.1 * 255, norm="linf")
    unit = APGD(eps=0.1, steps=20)(ModelUnderTest(digits_module, bounds=(0.0, 1.0)), x / 255, y)
    assert abs(int(outcome.success.sum()) - int(unit.success.sum())) <= 2


def test_fooled_samples_leave_the_run_without_changing_anyone_else(monkeypatch):
    """Fooled samples leave at once on the CPU, at checkpoints on accelerators (simulated here):
    the same samples are fooled either way, every output is verified, and the gradient calls
    count only the samples still running (fewer than n * (steps + 1) on a model that falls)."""
    module = digits_model()
    data = digits_test(120)
    mut = ModelUnderTest(module, bounds=(0.0, 1.0))
    attack = APGD(eps=0.1, steps=30)
    every_step = attack(mut, data.x, data.y, seed=3)
    monkeypatch.setattr(apgd_module, "SYNC_FREE_DEVICES", ())
    at_checkpoints = attack(mut, data.x, data.y, seed=3)
    assert torch.equal(every_step.success, at_checkpoints.success)
    assert every_step.success.any() and not every_step.success.all()
    assert every_step.gradient_calls < at_checkpoints.gradient_calls < len(data.x) * 31
