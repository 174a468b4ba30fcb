"""Square attack (score-based): containment and verification, strength against PGD-20, ART and a
random-noise baseline, gradient-free operation, per-sample seeding, query accounting, bad options.

Figures on the suite's digits CNN (100 correctly classified test samples, Linf eps 0.1, seed 0) are
printed with `pytest -s`; at the time of writing: PGD-20 robust accuracy 0.45, Square (300 queries,
193 per sample on average) 0.49, uniform +-eps corners 1.00; L2 eps 0.8 (60 samples): PGD-20 0.13,
Square-300 0.25; ART's SquareAttack (40 samples, 150 queries) 0.775 against robustlab's 0.55.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustlab.attacks import ATTACKS, PGD, Square, get_attack
from robustlab.attacks.square import _bump_cpu, p_selection
from robustlab.errors import InputError
from robustlab.model import ModelUnderTest
from robustlab.threat import Bounds
from support import ZeroGradient

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = {"linf": 0.1, "l2": 0.8}


def robust_accuracy(module: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((module(x_adv).argmax(1) == y).double().mean())


def assert_every_output_contained(x: torch.Tensor, outcome, eps: float, norm: str, low=0.0, high=1.0) -> None:
    """Independent of robustlab: every sample inside the eps ball (float64, 1e-6 relative) and the box."""
    delta = (outcome.x_adv.double() - x.double()).reshape(len(x), -1)
    size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert bool((size <= eps * (1 + 1e-6)).all()), f"max {norm} size {float(size.max())} > eps {eps}"
    low = torch.as_tensor(low, dtype=torch.float64)
    high = torch.as_tensor(high, dtype=torch.float64)
    assert bool(((outcome.x_adv.double() >= low) & (outcome.x_adv.double() <= high)).all())


class NoBackward(torch.autograd.Function):
    """Identity forward; any backward pass is an error (proves an attack never differentiates)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward called on a score-based attack's model")


class Front(nn.Module):
    def __init__(self, fn, inner: nn.Module) -> None:
        super().__init__()
        self.fn, self.inner = fn, inner

    def forward(self, x):
        return self.inner(self.fn.apply(x))


class RowCounter(nn.Module):
    """Counts the input rows the wrapped module sees."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x):
        self.rows += len(x)
        return self.inner(x)


# ---------------------------------------------------------------------------- verification
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("targeted", [False, True])
def test_outputs_are_contained_and_verified(norm, targeted, digits_mut, digits_correct, check_outcome):
    x, y = digits_correct.x[:40], digits_correct.y[:40]
    targets = (y + 1) % 10 if targeted else None
    eps = EPS[norm] * (2 if targeted else 1)
    outcome = Square(norm=norm, eps=eps, queries=150)(digits_mut, x, y, targets=targets)
    assert_every_output_contained(x, outcome, eps, norm)
    check_outcome(digits_mut, x, y, targets, outcome, eps=eps, norm=norm)  # also: adv_pred == fresh argmax
    with torch.no_grad():
        pred = digits_mut(outcome.x_adv).argmax(1)
    assert torch.equal(outcome.adv_pred, pred)
    assert outcome.success.any(), "Square found nothing at all"
    assert outcome.targets is None if not targeted else torch.equal(outcome.targets, targets)


def test_eps_zero_returns_x_exactly(digits_mut, digits_correct):
    x, y = digits_correct.x[:10], digits_correct.y[:10]
    for norm in ("linf", "l2"):
        outcome = Square(norm=norm, eps=0.0, queries=20)(digits_mut, x, y)
        assert torch.equal(outcome.x_adv, x)
        assert outcome.gradient_calls == 0


@pytest.mark.parametrize("options", [
    {"queries": 0}, {"queries": -5}, {"queries": 1.5}, {"queries": True}, {"restarts": 0},
    {"p_init": 0.0}, {"p_init": 1.5}, {"loss": "hinge"}, {"norm": "l1"}])
def test_bad_options_are_refused_before_any_query(options, digits_module, digits_correct):
    counter = RowCounter(digits_module).eval()
    model = ModelUnderTest(counter, bounds=(0, 1))
    model.inspect(digits_correct.x[:4])
    before = counter.rows
    with pytest.raises(InputError) as error:
        Square(eps=0.1, **{"norm": "linf", **options})(model, digits_correct.x[:4], digits_correct.y[:4])
    assert error.value.argument == next(iter(options))
    assert counter.rows == before


def test_registered_by_name():
    assert ATTACKS["square"] is Square
    assert get_attack("square", eps=0.1, queries=10) == Square(eps=0.1, queries=10)


# ---------------------------------------------------------------------------- strength
def test_linf_close_to_pgd_and_far_better_than_random_noise(digits_module, digits_mut, digits_correct):
    x, y = digits_correct.x[:100], digits_correct.y[:100]
    eps = 0.1
    pgd = robust_accuracy(digits_module, PGD(eps=eps, steps=20)(digits_mut, x, y).x_adv, y)
    outcome = Square(eps=eps, queries=300)(digits_mut, x, y)
    square = robust_accuracy(digits_module, outcome.x_adv, y)
    corners = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.5, -eps, eps)
    noise = robust_accuracy(digits_module, (x + corners).clamp(0, 1), y)
    print(f"\nLinf eps={eps}: robust accuracy PGD-20 {pgd:.3f}, Square-300 {square:.3f} "
          f"({outcome.gradient_calls / len(x):.0f} queries/sample), random corners {noise:.3f}")
    assert square <= pgd + 0.10
    assert square < noise - 0.3


def test_l2_finds_adversarials_pgd_finds(digits_module, digits_mut, digits_correct):
    x, y = digits_correct.x[:60], digits_correct.y[:60]
    eps = EPS["l2"]
    pgd = robust_accuracy(digits_module, PGD(eps=eps, norm="l2", steps=20)(digits_mut, x, y).x_adv, y)
    square = robust_accuracy(digits_module, Square(eps=eps, norm="l2", queries=300)(digits_mut, x, y).x_adv, y)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    noise = robust_accuracy(digits_module, (x + eps * g / g.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)).clamp(0, 1), y)
    print(f"\nL2 eps={eps}: robust accuracy PGD-20 {pgd:.3f}, Square-300 {square:.3f}, random direction {noise:.3f}")
    assert square <= pgd + 0.20  # L2 Square's 3x3 windows are coarse on 8x8 images
    assert square < noise - 0.3


def test_works_without_gradients_where_pgd_fails(digits_module, digits_correct):
    x, y = digits_correct.x[:60], digits_correct.y[:60]
    masked = ModelUnderTest(Front(ZeroGradient, digits_module).eval(), bounds=(0, 1))
    pgd = PGD(eps=0.1, steps=20)(masked, x, y)
    square = Square(eps=0.1, queries=200)(masked, x, y)
    print(f"\nzero-gradient model: PGD success {pgd.success_rate:.3f}, Square success {square.success_rate:.3f}")
    assert pgd.success_rate <= 0.05
    assert square.success_rate >= 0.35
    # ... and it never runs a backward pass (this model raises in backward).
    no_backward = ModelUnderTest(Front(NoBackward, digits_module).eval(), bounds=(0, 1))
    with pytest.raises(RuntimeError, match="backward called"):
        PGD(eps=0.1, steps=1)(no_backward, x[:2], y[:2])
    assert Square(eps=0.1, queries=200)(no_backward, x, y).success_rate == square.success_rate


def test_flat_inputs_with_per_feature_bounds(digits_module, digits_correct):
    """(N, D) inputs are treated as a 1 x D image; per-feature bounds are respected."""
    flat = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), digits_module).eval()
    x, y = digits_correct.x[:40].reshape(40, 64), digits_correct.y[:40]
    high = torch.ones(64)
    high[:16] = x[:, :16].amax(0).clamp_min(0.25)  # the first two rows may hardly grow
    model = ModelUnderTest(flat, bounds=Bounds(torch.zeros(64), high), output="logits")
    for norm in ("linf", "l2"):
        outcome = Square(norm=norm, eps=EPS[norm], queries=200)(model, x, y)
        assert outcome.x_adv.shape == x.shape
        assert_every_output_contained(x, outcome, EPS[norm], norm, low=torch.zeros(64), high=high)
        assert outcome.success_rate >= 0.2, (norm, outcome.success_rate)


# ---------------------------------------------------------------------------- seeding
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_does_not_depend_on_batch_size_or_batch_mates(norm, digits_mut, digits_correct):
    x, y = digits_correct.x[:40], digits_correct.y[:40]
    attack = Square(norm=norm, eps=EPS[norm], queries=40, restarts=2)
    runs = {bs: attack(digits_mut, x, y, seed=3, batch_size=bs) for bs in (7, 64)}
    a, b = runs[7], runs[64]
    assert 0 < int(b.success.sum()) < len(x)
    assert float((a.x_adv - b.x_adv).abs().max()) <= 1e-6
    assert torch.equal(a.success, b.success) and a.gradient_calls == b.gradient_calls
    again = attack(digits_mut, x, y, seed=3, batch_size=64)
    assert torch.equal(again.x_adv, b.x_adv)
    part = attack(digits_mut, x[20:31], y[20:31], sample_ids=torch.arange(20, 31), seed=3, batch_size=64)
    assert float((part.x_adv - b.x_adv[20:31]).abs().max()) <= 1e-6
    other_seed = attack(digits_mut, x, y, seed=4, batch_size=64)
    assert not torch.equal(other_seed.x_adv, b.x_adv)


# ---------------------------------------------------------------------------- queries
def test_query_count_is_exact_and_successful_samples_stop(digits_module, digits_correct):
    """gradient_calls counts forward queries: one row per query, checked by a counting module; a
    sample stops being queried when it is fooled, a failing one uses the whole budget."""
    x, y = digits_correct.x[:16], digits_correct.y[:16]
    counter = RowCounter(digits_module).eval()
    model = ModelUnderTest(counter, bounds=(0, 1))
    model.inspect(x)
    budget = 60
    per_sample = []
    for i in range(len(x)):
        counter.rows = 0
        one = Square(eps=0.1, queries=budget)(model, x[i:i + 1], y[i:i + 1], sample_ids=torch.tensor([i]))
        assert counter.rows == one.gradient_calls + 1  # + the verification forward pass
        per_sample.append((one.gradient_calls, bool(one.success)))
    counter.rows = 0
    batch = Square(eps=0.1, queries=budget)(model, x, y)
    assert counter.rows == batch.gradient_calls + len(x)
    assert batch.gradient_calls == sum(q for q, _ in per_sample)
    assert [s for _, s in per_sample] == batch.success.tolist()
    fooled = [q for q, s in per_sample if s]
    assert all(q == budget for q, s in per_sample if not s)
    assert fooled and max(fooled) <= budget and sum(fooled) / len(fooled) < budget / 2
    # a large eps: every sample fooled, on average within a few dozen queries of a 200 budget (at 60
    # queries one sample of these 16 survives under seed 0 and falls under seeds 1-4)
    easy = Square(eps=0.3, queries=200)(model, x, y)
    assert easy.success.all() and easy.gradient_calls < 0.2 * 200 * len(x)


def test_restarts_only_add_successes(digits_mut, digits_correct):
    x, y = digits_correct.x[:40], digits_correct.y[:40]
    one = Square(eps=0.1, queries=40)(digits_mut, x, y)
    two = Square(eps=0.1, queries=40, restarts=2)(digits_mut, x, y)
    assert bool((two.success | ~one.success).all())  # restart 0 is identical; restart 1 runs on failures only
    assert int(two.success.sum()) > int(one.success.sum())
    failures = int((~one.success).sum())
    assert two.gradient_calls > one.gradient_calls and two.gradient_calls <= one.gradient_calls + 40 * failures


# ---------------------------------------------------------------------------- pieces of the paper
def test_p_schedule_matches_the_reference_code():
    def reference(p_init, it, n_iters):  # max-andr/square-attack attack.py, p_selection
        it = int(it / n_iters * 10000)
        for lo, hi, d in ((10, 50, 2), (50, 200, 4), (200, 500, 8), (500, 1000, 16), (1000, 2000, 32),
                          (2000, 4000, 64), (4000, 6000, 128), (6000, 8000, 256), (8000, 10000, 512)):
            if lo < it <= hi:
                return p_init / d
        return p_init
    for n_iters in (10000, 1000, 300, 7):
        for it in range(n_iters):
            assert p_selection(0.05, it, n_iters) == reference(0.05, it, n_iters)


@pytest.mark.parametrize("h,w", [(3, 3), (5, 5), (7, 7), (1, 5), (4, 4)])
def test_l2_bump_has_unit_norm_and_two_opposite_halves(h, w):
    bump = _bump_cpu(h, w)
    assert abs(float(bump.square().sum()) - 1.0) < 1e-12
    first, second = (bump[: h // 2], bump[h // 2:]) if h >= 2 else (bump[:, : w // 2], bump[:, w // 2:])
    assert bool((first >= 0).all()) and bool((second <= 0).all())
    if first.numel():
        assert float(first.max()) > 0
    assert float(second.min()) < 0
