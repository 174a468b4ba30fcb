"""FAB-T (targeted minimum-norm FAB, AutoAttack's third member): invariants, projection, closed form,
reference, seeding, half precision.

- Invariants on every output (ball, bounds, success re-checked by a fresh forward pass) over random
  problems, at a fixed eps and with no budget, targeted or not (like every other attack).
- The projection onto plane-and-box: equal to the reference's (torchattacks' copy of fra31's
  projection_linf / projection_l2) on the unit box, and optimal on any box (an independent
  certificate: Linf, no shorter radius reaches the plane; L2, the KKT form d = clip(lam w)).
- A closed form: on an affine multi-class model, away from the box faces, the smallest Linf (L2)
  perturbation that changes the prediction is min_j |z_y - z_j| / ||w_j - w_y||_1 (_2); FAB-T
  finds it within 1% (FAB's overshoot eta = 1.05 settles about 0.5% above the boundary).
- Against the independent reference, torchattacks.FAB (a port of fra31/auto-attack's FAB), on the
  digits CNN: per-sample found norms agree to float rounding (one target, no budget; both are
  deterministic with one restart), and robust accuracy at eps with 9 targets agrees.
- Results do not depend on batch size or batch mates (per-sample seeding of restarts); a float16
  model finds the float32 model's norms (it used to stall on exact logit ties).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import robustlab
from robustlab.attacks import ATTACKS, FABT, get_attack
from robustlab.attacks.fab import plane_step
from robustlab.errors import InputError
from robustlab.model import ModelUnderTest
from robustlab.threat import Bounds
from support import Scale, digits_model
from test_attack_properties import _settings, problems

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _size(outcome, norm: str) -> torch.Tensor:
    return (outcome.linf if norm == "linf" else outcome.l2).double()


# ============================================================================ invariants
@_settings(30)
@given(p=problems(), steps=st.integers(1, 8), restarts=st.integers(1, 2), n_targets=st.integers(1, 9),
       bounded=st.booleans(), seed=st.integers(0, 2**20))
def test_fab_t_invariants(p, steps, restarts, n_targets, bounded, seed, check_outcome):
    eps = p.eps if bounded else None
    outcome = FABT(eps=eps, norm=p.norm, steps=steps, restarts=restarts, n_targets=n_targets)(
        p.model, p.x, p.y, targets=p.targets, seed=seed)
    check_outcome(p.model, p.x, p.y, p.targets, outcome, eps=eps, norm=p.norm)
    if eps is None:  # no budget: a sample is moved only to a point that fools the model
        moved = (outcome.x_adv != p.x).reshape(len(p.x), -1).any(dim=1)
        assert bool(outcome.success[moved].all()) and not bool(moved[~outcome.success].any())


def test_eps_zero_returns_x_exactly(digits_mut, digits_correct):
    x, y = digits_correct.x[:20], digits_correct.y[:20]
    outcome = FABT(eps=0.0, steps=5, n_targets=3)(digits_mut, x, y)
    assert torch.equal(outcome.x_adv, x) and not bool(outcome.success.any())


def test_misclassified_samples_are_returned_clean_and_count_as_broken(digits_mut, digits_test, check_outcome):
    with torch.no_grad():
        wrong = torch.nonzero(digits_mut(digits_test.x).argmax(1) != digits_test.y).reshape(-1)[:5]
    assert len(wrong) >= 3
    x, y = digits_test.x[wrong], digits_test.y[wrong]
    outcome = FABT(eps=0.05, steps=5)(digits_mut, x, y)
    check_outcome(digits_mut, x, y, None, outcome, eps=0.05, norm="linf")
    assert bool(outcome.success.all()) and torch.equal(outcome.x_adv, x)


def test_targeted_audit_runs_toward_the_given_targets(digits_mut, digits_correct, check_outcome):
    x, y = digits_correct.x[:40], digits_correct.y[:40]
    targets = (y + 1 + torch.arange(40) % 9) % 10
    outcome = FABT(steps=50)(digits_mut, x, y, targets=targets)
    check_outcome(digits_mut, x, y, targets, outcome, eps=None, norm="linf")
    assert float(outcome.success.double().mean()) >= 0.9


def test_registered_and_validated():
    assert ATTACKS["fab-t"] is FABT and isinstance(get_attack("FAB-T", eps=0.1), FABT)
    attack = FABT()
    assert (attack.steps, attack.restarts, attack.n_targets, attack.alpha_max, attack.eta, attack.beta) == \
        (100, 1, 9, 0.1, 1.05, 0.9)  # AutoAttack's standard FAB-T
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    mut = ModelUnderTest(digits_model(), bounds=(0.0, 1.0))
    for bad in ({"steps": 0}, {"n_targets": 1.5}, {"beta": 1.0}, {"alpha_max": -0.1}, {"eta": 0.0}):
        with pytest.raises(InputError, match=next(iter(bad))):
            FABT(eps=0.1, **bad)(mut, x, y)


# ============================================================================ projection onto plane and box
def _plane_problems(seed: int, rows: int = 64):
    """Random (t, w, c) in the unit box: the plane misses the box, cuts it with the box binding, or
    is reached freely (the three cases of the reference's projection)."""
    g = torch.Generator().manual_seed(seed)
    d = int(torch.randint(2, 150, (), generator=g))
    t = torch.rand(rows, d, generator=g, dtype=F64)
    faces = torch.rand(rows, d, generator=g)
    t = torch.where(faces < 0.15, 0.0, torch.where(faces > 0.85, 1.0, t))
    w = torch.randn(rows, d, generator=g, dtype=F64) * (torch.rand(rows, d, generator=g) > 0.1)
    spread = torch.rand(rows, generator=g, dtype=F64) * (3.0 if seed % 2 else 0.2)
    c = torch.randn(rows, generator=g, dtype=F64) * spread * w.abs().sum(1)
    return t, w, c


def _reach(room: torch.Tensor, weight: torch.Tensor, rate: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """The largest w . d reachable toward the plane with every |d_i| <= lam * rate_i inside the box."""
    return (weight * torch.minimum(room, lam.unsqueeze(1) * rate)).sum(1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_plane_step_equals_the_reference_projection_on_the_unit_box(norm):
    reference = pytest.importorskip("torchattacks.attacks.fab")
    project = reference.projection_linf if norm == "linf" else reference.projection_l2
    cases = torch.zeros(3)
    for seed in range(40):
        t, w, c = _plane_problems(seed)
        b = c + (w * t).sum(1)
        ours = plane_step(t, w, c, torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64), linf=norm == "linf")
        theirs = project(t.clone(), w.clone(), b.clone())
        assert float((ours - theirs).abs().max()) <= 1e-9, seed
        room = torch.where(torch.sign(w) * torch.sign(c).unsqueeze(1) > 0, 1.0 - t, t)
        misses = (w.abs() * room).sum(1) < c.abs()
        free = (w.abs() * room).sum(1) >= c.abs()
        free &= ((ours.abs() < room - 1e-12) | (w == 0)).all(1)
        cases += torch.stack([misses.sum(), free.sum(), (~misses & ~free).sum()]).double()
    assert bool((cases > 50).all()), f"cases (misses, box not binding, box binding): {cases.tolist()}"


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_plane_step_is_the_shortest_step_on_any_box(norm):
    """Per-feature boxes with negative and wide bounds: the step lands on the plane inside the box, and
    is optimal by an independent certificate (where the plane misses the box: every coordinate at
    its face toward the plane)."""
    for seed in range(20):
        t01, w, c = _plane_problems(100 + seed)
        g = torch.Generator().manual_seed(seed)
        low = -1.0 + torch.rand(t01.shape[1], generator=g, dtype=F64)
        high = low + 0.1 + 3.0 * torch.rand(t01.shape[1], generator=g, dtype=F64)
        t = low + (high - low) * t01
        c = c * 2.0
        d = plane_step(t, w, c, low, high, linf=norm == "linf")
        assert bool(((t + d >= low - 1e-12) & (t + d <= high + 1e-12)).all())
        toward = torch.sign(w) * torch.sign(c).unsqueeze(1)
        room = torch.where(toward > 0, high - t, t - low)
        weight = w.abs()
        misses = (weight * room).sum(1) < c.abs() * (1 - 1e-12)
        assert torch.allclose(d[misses], (toward * room)[misses], atol=1e-12)
        hits = ~misses
        assert torch.allclose((w * d).sum(1)[hits], c[hits], rtol=1e-9, atol=1e-9)
        assert bool(((d * toward >= -1e-15) | (w == 0)).all())  # every coordinate moves toward the plane
        if norm == "linf":
            radius = d.abs().amax(1)
            shorter = _reach(room, weight, torch.ones_like(w), radius * (1 - 1e-6))
            assert bool((shorter[hits] < c.abs()[hits] * (1 + 1e-12) + 1e-15).all())
            assert bool((shorter[hits & (radius > 0)] < c.abs()[hits & (radius > 0)]).all())
        else:
            # KKT: d_i = toward_i * min(room_i, lam |w_i|) for one lam >= 0 per row
            free = (d.abs() < room - 1e-9) & (weight > 1e-6)
            lam = torch.where(free, d.abs() / weight.clamp_min(1e-300), 0.0).amax(1)
            expected = toward * torch.minimum(room, lam.unsqueeze(1) * weight)
            assert torch.allclose(d[hits], expected[hits], atol=1e-8)


# ============================================================================ closed form
def _affine(seed: int = 5, d: int = 20, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, d, generator=g)
    bias = torch.randn(classes, generator=g) * 0.3 - weight @ torch.full((d,), 0.5)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, classes)).eval()
    with torch.no_grad():
        module[1].weight.copy_(weight)
        module[1].bias.copy_(bias)
    x = 0.3 + 0.4 * torch.rand(200, d, generator=g)  # the perturbations below never reach a face
    with torch.no_grad():
        logits = module(x).double()
    y = logits.argmax(1)
    return module, x, y, logits, weight.double()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_t_finds_the_closed_form_distance_on_an_affine_model(norm, check_outcome):
    """min_j |z_y - z_j| / ||w_j - w_y||_dual: FAB-T (3 targets, all the other classes) reaches every
    sample within 1% of it; no budget, and at a fixed eps (every sample clearly within it falls,
    none beyond it)."""
    module, x, y, logits, weight = _affine()
    dual = 1 if norm == "linf" else 2
    difference = weight.unsqueeze(0) - weight[y].unsqueeze(1)
    distance = (logits.gather(1, y.unsqueeze(1)) - logits) / difference.norm(p=dual, dim=2).clamp_min(1e-300)
    distance[torch.arange(len(y)), y] = float("inf")
    closed = distance.min(1).values
    mut = ModelUnderTest(module, bounds=(0.0, 1.0), output="logits")
    found = FABT(norm=norm)(mut, x, y)
    check_outcome(mut, x, y, None, found, eps=None, norm=norm)
    size = _size(found, norm)
    assert bool(found.success.all())
    assert bool((size >= closed * (1 - 1e-5)).all())  # nothing beats the true distance
    ratio = size / closed
    assert float(ratio.max()) <= 1.01, f"found/closed form up to {float(ratio.max()):.4f}"
    eps = float(closed.median())
    bounded = FABT(eps=eps, norm=norm)(mut, x, y)
    check_outcome(mut, x, y, None, bounded, eps=eps, norm=norm)
    assert bool(bounded.success[closed < eps / 1.01].all())
    assert not bool(bounded.success[closed > eps].any())


def test_any_box_scales_with_the_inputs(digits_module, digits_correct):
    """Inputs in [0, 255], the scaling inside the model: the same attack, norms 255x larger."""
    module = torch.nn.Sequential(Scale(1 / 255), digits_module).eval()
    x, y = digits_correct.x[:30], digits_correct.y[:30]
    scaled = FABT(n_targets=2, steps=30)(ModelUnderTest(module, bounds=Bounds(0.0, 255.0), output="logits"),
                                         x * 255, y)
    unit = FABT(n_targets=2, steps=30)(ModelUnderTest(digits_module, bounds=(0.0, 1.0)), x, y)
    assert torch.equal(scaled.success, unit.success)
    ratio = scaled.linf.double()[unit.success] / 255 / unit.linf.double()[unit.success]
    assert float((ratio - 1).abs().median()) <= 1e-3


# ============================================================================ reference: torchattacks.FAB
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_found_norms_match_the_reference_per_sample(norm, digits_module, digits_mut, digits_correct):
    """One target (the most likely other class), no budget, 100 steps: FAB-T is deterministic with
    one restart, so each sample's found norm is the reference's up to float rounding."""
    torchattacks = pytest.importorskip("torchattacks")
    x, y = digits_correct.x[:100], digits_correct.y[:100]
    ours = FABT(norm=norm, n_targets=1)(digits_mut, x, y)
    # n_classes=2: one target class, the 2nd most likely; an eps no sample needs, so every point found is kept
    reference = torchattacks.FAB(digits_module, norm="Linf" if norm == "linf" else "L2", eps=1.0 if norm == "linf"
                                 else 8.0, steps=100, n_restarts=1, multi_targeted=True, n_classes=2)
    x_ref = reference(x, y)
    with torch.no_grad():
        theirs_hit = digits_module(x_ref).argmax(1) != y
    delta = (x_ref - x).double().reshape(len(x), -1)
    theirs = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert int((ours.success != theirs_hit).sum()) <= 1
    both = ours.success & theirs_hit
    relative = (_size(ours, norm)[both] / theirs[both] - 1).abs()
    print(f"FAB-T {norm}: median found norm robustlab {float(_size(ours, norm)[both].median()):.5f}, "
          f"torchattacks {float(theirs[both].median()):.5f}; per-sample relative difference median "
          f"{float(relative.median()):.2e}, max {float(relative.max()):.2e}")
    assert float(relative.median()) <= 1e-4
    assert float(relative.quantile(0.95)) <= 1e-2


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_robust_accuracy_matches_the_reference(norm, eps, digits_module, digits_mut, digits_correct, check_outcome):
    """9 targets at a fixed eps, 100 correctly classified samples: the same robust accuracy as the
    reference's multi-targeted FAB (it can differ by a sample whose closest point lies outside the
    ball: robustlab projects it and re-checks, the reference discards it), never above it."""
    torchattacks = pytest.importorskip("torchattacks")
    x, y = digits_correct.x[:100], digits_correct.y[:100]
    outcome = FABT(eps=eps, norm=norm)(digits_mut, x, y)
    check_outcome(digits_mut, x, y, None, outcome, eps=eps, norm=norm)
    reference = torchattacks.FAB(digits_module, norm="Linf" if norm == "linf" else "L2", eps=eps, steps=100,
                                 n_restarts=1, multi_targeted=True, n_classes=10)
    with torch.no_grad():
        theirs = float((digits_module(reference(x, y)).argmax(1) == y).double().mean())
    ours = float((~outcome.success).double().mean())
    print(f"FAB-T {norm} eps={eps}: robust accuracy robustlab {ours:.3f}, torchattacks {theirs:.3f}")
    assert ours <= theirs + 0.01 and abs(ours - theirs) <= 0.02


# ============================================================================ seeding, dtypes
@pytest.mark.parametrize("attack", [FABT(eps=0.1, steps=10, restarts=2, n_targets=4),
                                    FABT(norm="l2", steps=10, restarts=2, n_targets=3)],
                         ids=["linf-eps", "l2-no-budget"])
def test_results_do_not_depend_on_batch_size_or_batch_mates(attack, digits_mut, digits_correct):
    x, y = digits_correct.x[:60], digits_correct.y[:60]
    reference = attack(digits_mut, x, y, seed=3)
    assert 0 < int(reference.success.sum()) <= len(x)
    small = attack(digits_mut, x, y, seed=3, batch_size=7)
    assert torch.equal(small.success, reference.success)
    assert float((small.x_adv - reference.x_adv).abs().max()) <= 1e-5
    part = attack(digits_mut, x[20:35], y[20:35], sample_ids=torch.arange(20, 35), seed=3)
    assert torch.equal(part.success, reference.success[20:35])
    assert float((part.x_adv - reference.x_adv[20:35]).abs().max()) <= 1e-5
    other_seed = attack(digits_mut, x, y, seed=4)
    assert not torch.equal(other_seed.x_adv, reference.x_adv)  # the restart's random start is seeded


def test_float16_model_finds_the_float32_norms(digits_correct, check_outcome):
    """Iterates in float32, the plane a logit unit past the tie: before, 15% of the samples stalled
    on an exact float16 tie z_t = z_y (argmax gives it to y) with norms up to 36% larger."""
    x, y = digits_correct.x[:40], digits_correct.y[:40]
    half = robustlab.wrap(copy.deepcopy(digits_model()).half().eval(), bounds=(0, 1), name="digits-fp16")
    full = robustlab.wrap(copy.deepcopy(digits_model()).eval(), bounds=(0, 1), name="digits-fp32")
    attack = FABT(n_targets=1, steps=50)
    ours = attack(half, x.half(), y)
    check_outcome(half, x.half(), y, None, ours, eps=None, norm="linf")
    base = attack(full, x, y)
    both = ours.success & base.success
    assert int(both.sum()) >= len(x) - 2
    ratio = ours.linf.double()[both] / base.linf.double()[both]
    assert float(ratio.max()) <= 1.03, sorted(ratio.tolist())[-5:]
    bounded = FABT(eps=0.1, steps=30, n_targets=3)(half, x.half(), y)
    check_outcome(half, x.half(), y, None, bounded, eps=0.1, norm="linf")


def test_an_l2_audit_runs_fab_t_in_l2():
    """The audit's norm reaches FAB-T (it did not: an L2 audit ran it in Linf and wrote L2 rows)."""
    import robustlab
    from support import digits_test

    result = robustlab.audit(digits_model(), digits_test(20), attacks=["fab-t"], norm="l2", eps=[0.5],
                             suite="none", checks="none", progress=False)
    rows = result.samples[(result.samples["attack"] == "fab-t") & result.samples["success"].astype(bool)]
    assert len(rows) and (rows["norm"] == "l2").all()
    assert float(rows["l2"].max()) <= 0.5 * (1 + 1e-6)
