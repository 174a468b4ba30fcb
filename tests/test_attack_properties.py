"""Property tests: the invariants every attack output must satisfy, over random problems.

Random shapes (batch 1..6, 1..3 feature dims), random boxes (scalar or per-feature
`Bounds(low_tensor, high_tensor)`), budgets from 0 to the whole box, both norms, targeted or not,
on tiny random models (linear or a small ReLU MLP). On EVERY output sample:
- the float64 norm of x_adv - x is at most eps * (1 + 1e-6), and every value is inside the box;
- `success` and `adv_pred` agree with a fresh forward pass on x_adv;
- `l2` / `linf` are the float64 norms of x_adv - x.
Plus: seeded runs repeat exactly, eps = 0 returns x exactly, results do not depend on the batch
size (or on which other samples are attacked alongside), CW outputs projected with `restrict` keep
the invariants, and float64 inputs are judged against the caller's x, not a float32 copy.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robustlab.attacks import CW, FGSM, PGD, restrict
from robustlab.model import ModelUnderTest
from robustlab.threat import Bounds

# ROBUSTLAB_PROPERTY_SCALE=20 runs 20x more examples (a deeper search; the default keeps the file fast).
SCALE = max(1, int(os.environ.get("ROBUSTLAB_PROPERTY_SCALE", "1")))


def _settings(examples: int) -> settings:
    return settings(max_examples=examples * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])


PROPERTY_SETTINGS = _settings(30)
F32 = torch.float32

pytestmark = pytest.mark.usefixtures("one_thread")


# ============================================================================ problem generation
@dataclass
class Problem:
    model: ModelUnderTest
    x: torch.Tensor
    y: torch.Tensor
    targets: torch.Tensor | None
    norm: str
    eps: float
    description: str

    def __repr__(self) -> str:  # hypothesis prints this on failure
        return f"Problem({self.description}, norm={self.norm}, eps={self.eps!r})"


def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=F32))


def _build_module(kind: str, features: int, hidden: int, classes: int, gain: float, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        layers = [torch.nn.Flatten(), torch.nn.Linear(features, classes)]
    else:
        layers = [torch.nn.Flatten(), torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes)]
    module = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for layer in module:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * gain / math.sqrt(layer.in_features))
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.5)
    return module.eval()


@st.composite
def problems(draw, *, norms=("linf", "l2"), eps_zero: bool | None = None):
    batch = draw(st.integers(1, 6))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    features = math.prod(shape)
    classes = draw(st.integers(1, 4))  # 1: a single binary logit (robustlab attacks logits [0, z])
    kind = draw(st.sampled_from(["linear", "mlp"]))
    hidden = draw(st.integers(2, 8))
    gain = draw(st.sampled_from([0.5, 2.0, 8.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)

    lo = draw(st.floats(-3.0, 2.0, width=32))
    width = draw(st.floats(0.0078125, 4.0, width=32))
    hi = _f32(lo + width)
    if not hi > lo:
        hi = float(torch.nextafter(torch.tensor(lo, dtype=F32), torch.tensor(math.inf, dtype=F32)))
    per_feature = draw(st.booleans())
    if per_feature:
        low = (lo + torch.rand(shape, generator=g) * (hi - lo)).to(F32)
        high = (low + width * (0.05 + torch.rand(shape, generator=g))).to(F32)
        high = torch.where(high > low, high, torch.nextafter(low, torch.full_like(low, math.inf)))
        bounds = Bounds(low, high)
        low_t, high_t = low, high
    else:
        bounds = Bounds(lo, hi)
        low_t, high_t = torch.full(shape, lo, dtype=F32), torch.full(shape, hi, dtype=F32)

    u = torch.rand(batch, *shape, generator=g)
    x = (low_t + (high_t - low_t) * u).to(F32)
    face = draw(st.sampled_from([0.0, 0.3]))  # fraction of values put exactly on a face of the box
    r = torch.rand(batch, *shape, generator=g)
    x = torch.where(r < face / 2, low_t, torch.where(r > 1 - face / 2, high_t, x))
    x = torch.minimum(torch.maximum(x, low_t), high_t)

    labels = max(2, classes)
    y = torch.randint(0, labels, (batch,), generator=g)
    targeted = draw(st.booleans())
    targets = torch.randint(0, labels, (batch,), generator=g) if targeted else None

    norm = draw(st.sampled_from(norms))
    if eps_zero is True:
        frac = 0.0
    else:
        frac = draw(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))) if eps_zero is None else \
            draw(st.one_of(st.just(1.0), st.floats(1e-3, 1.0)))
    limit = bounds.width() if norm == "linf" else bounds.diameter_l2(shape)
    eps = frac * limit

    module = _build_module(kind, features, hidden, classes, gain, seed)
    # output="logits": these are logit models; robustlab's auto-detection may take a batch of one row of
    # non-negative logits that happen to sum to ~1 for probabilities and refuse the model.
    model = ModelUnderTest(module, bounds=bounds, output="logits")
    description = (f"batch={batch}, shape={shape}, classes={classes}, {kind}(hidden={hidden}, gain={gain}, seed={seed}), "
                   f"bounds={'per-feature' if per_feature else (lo, hi)}, faces={face}, targeted={targeted}")
    return Problem(model, x, y, targets, norm, eps, description)


def _is_success(model: ModelUnderTest, x_adv: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None):
    with torch.no_grad():
        pred = model(x_adv).argmax(dim=1)
    return pred != y if targets is None else pred == targets


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a != b).reshape(len(a), -1).any(dim=1)


# ============================================================================ invariants per attack
@PROPERTY_SETTINGS
@given(p=problems(), loss=st.sampled_from(["ce", "margin"]))
def test_fgsm_invariants(p, loss, check_outcome):
    outcome = FGSM(eps=p.eps, norm=p.norm, loss=loss)(p.model, p.x, p.y, targets=p.targets)
    check_outcome(p.model, p.x, p.y, p.targets, outcome, eps=p.eps, norm=p.norm)


@PROPERTY_SETTINGS
@given(p=problems(), steps=st.integers(1, 3), restarts=st.integers(1, 2), random_start=st.booleans(),
       loss=st.sampled_from(["ce", "margin"]), rel_step=st.sampled_from([None, 0.1, 0.5, 2.0]),
       seed=st.integers(0, 2**20))
def test_pgd_invariants(p, steps, restarts, random_start, loss, rel_step, seed, check_outcome):
    attack = PGD(eps=p.eps, norm=p.norm, steps=steps, restarts=restarts, random_start=random_start, loss=loss,
                 rel_step_size=rel_step)
    outcome = attack(p.model, p.x, p.y, targets=p.targets, seed=seed)
    check_outcome(p.model, p.x, p.y, p.targets, outcome, eps=p.eps, norm=p.norm)
    if not random_start:
        # The clean input is the first iterate and PGD keeps the first iterate that succeeds.
        clean_success = _is_success(p.model, p.x, p.y, p.targets)
        assert bool(outcome.success[clean_success].all()), "PGD lost a success its first iterate already had"


@PROPERTY_SETTINGS
@given(p=problems(norms=("l2",)), steps=st.integers(1, 6), search=st.integers(1, 3),
       lr=st.sampled_from([0.01, 0.1, 0.5]), const=st.sampled_from([0.01, 1.0, 100.0]),
       confidence=st.sampled_from([0.0, 0.5]), abort_early=st.booleans(), budget_norm=st.sampled_from(["linf", "l2"]),
       budget_frac=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)))
def test_cw_invariants_and_restrict(p, steps, search, lr, const, confidence, abort_early, budget_norm, budget_frac,
                                    check_outcome):
    attack = CW(steps=steps, binary_search_steps=search, lr=lr, initial_const=const, confidence=confidence,
                abort_early=abort_early)
    outcome = attack(p.model, p.x, p.y, targets=p.targets)
    check_outcome(p.model, p.x, p.y, p.targets, outcome, eps=None, norm="l2")
    # A sample CW never succeeds on is returned as its clean input; anything else it returns fooled it.
    moved = _changed(outcome.x_adv, p.x)
    assert bool(outcome.success[moved].all()), "CW returned a perturbed input that does not fool the model"
    assert not bool(moved[~outcome.success].any())

    # Evaluated under a budget by projection (what the audit does for minimal attacks).
    shape = tuple(p.x.shape[1:])
    limit = p.model.bounds.width() if budget_norm == "linf" else p.model.bounds.diameter_l2(shape)
    eps = budget_frac * limit
    bounded = restrict(outcome, p.model, p.x, p.y, eps, budget_norm)
    check_outcome(p.model, p.x, p.y, p.targets, bounded, eps=eps, norm=budget_norm)
    # Projection is a no-op where the perturbation already fits, so such successes are kept.
    size = outcome.linf if budget_norm == "linf" else outcome.l2
    fits = outcome.success & (size.double() < eps)
    assert bool(bounded.success[fits].all()), (
        f"restrict lost successes whose perturbation already fitted in eps={eps!r}: rows "
        f"{torch.nonzero(fits & ~bounded.success).reshape(-1).tolist()}")


@pytest.mark.parametrize("attack", [FGSM(eps=1e-3, norm="linf"), PGD(eps=1e-3, norm="l2", steps=3)],
                         ids=["fgsm-linf", "pgd-l2"])
def test_float64_inputs_are_converted_to_the_model_dtype_first(attack, check_outcome):
    """Attacks accept float64 inputs for a float32 model. A float32 model can only see float32
    values, so x is converted once, up front; the ball, the bounds and the reported norms refer to
    that converted x, and x_adv comes back in the model's dtype."""
    g = torch.Generator().manual_seed(0)
    module = _build_module("linear", 64, 0, 3, 2.0, 1)
    model = ModelUnderTest(module, bounds=(0.0, 1.0), output="logits")
    x = 0.1 + 0.8 * torch.rand(50, 64, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (50,), generator=g)
    outcome = attack(model, x, y)
    assert outcome.x_adv.dtype == torch.float32
    check_outcome(model, x.to(torch.float32), y, None, outcome, eps=attack.eps, norm=attack.norm)


# ============================================================================ eps = 0, seeds
@PROPERTY_SETTINGS
@given(p=problems(eps_zero=True), attack_name=st.sampled_from(["fgsm", "pgd"]), restarts=st.integers(1, 2),
       seed=st.integers(0, 2**20))
def test_eps_zero_returns_x_exactly(p, attack_name, restarts, seed, check_outcome):
    attack = FGSM(eps=0.0, norm=p.norm) if attack_name == "fgsm" else \
        PGD(eps=0.0, norm=p.norm, steps=2, restarts=restarts, random_start=True)
    outcome = attack(p.model, p.x, p.y, targets=p.targets, seed=seed)
    check_outcome(p.model, p.x, p.y, p.targets, outcome, eps=0.0, norm=p.norm)
    assert torch.equal(outcome.x_adv, p.x)
    assert bool((outcome.l2 == 0).all()) and bool((outcome.linf == 0).all())


@PROPERTY_SETTINGS
@given(p=problems(eps_zero=True), budget_norm=st.sampled_from(["linf", "l2"]))
def test_restrict_to_eps_zero_returns_x_exactly(p, budget_norm, check_outcome):
    outcome = CW(steps=3, binary_search_steps=2, initial_const=10.0)(p.model, p.x, p.y, targets=p.targets)
    bounded = restrict(outcome, p.model, p.x, p.y, 0.0, budget_norm)
    check_outcome(p.model, p.x, p.y, p.targets, bounded, eps=0.0, norm=budget_norm)
    assert torch.equal(bounded.x_adv, p.x)


@_settings(20)
@given(p=problems(eps_zero=False), attack_name=st.sampled_from(["fgsm", "pgd", "cw"]), seed=st.integers(0, 2**20))
def test_seeded_runs_are_identical(p, attack_name, seed):
    attack = {
        "fgsm": FGSM(eps=p.eps, norm=p.norm),
        "pgd": PGD(eps=p.eps, norm=p.norm, steps=3, restarts=2, random_start=True),
        "cw": CW(steps=5, binary_search_steps=2),
    }[attack_name]
    first = attack(p.model, p.x, p.y, targets=p.targets, seed=seed)
    second = attack(p.model, p.x, p.y, targets=p.targets, seed=seed)
    assert torch.equal(first.x_adv, second.x_adv)
    assert torch.equal(first.success, second.success)
    assert torch.equal(first.adv_pred, second.adv_pred)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
def test_pgd_random_start_depends_on_the_seed(norm, eps, digits_mut, digits_correct, check_outcome):
    """A step of 1e-30 leaves PGD at its random start, so the start itself is observable: it lies in
    the ball, and another seed draws another start for every sample."""
    x, y = digits_correct.x[:20], digits_correct.y[:20]
    attack = PGD(eps=eps, norm=norm, steps=1, step_size=1e-30, random_start=True)
    a = attack(digits_mut, x, y, seed=0)
    b = attack(digits_mut, x, y, seed=1)
    check_outcome(digits_mut, x, y, None, a, eps=eps, norm=norm)
    check_outcome(digits_mut, x, y, None, b, eps=eps, norm=norm)
    assert bool(_changed(a.x_adv, x).all()), "a random start left a sample at its clean input"
    assert bool(_changed(a.x_adv, b.x_adv).all()), "seeds 0 and 1 drew the same random start for some sample"


# ============================================================================ batch-size invariance
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
def test_pgd_does_not_depend_on_batch_size(norm, eps, digits_module, digits_correct, check_outcome):
    """Random starts are drawn per sample, so the batch size changes nothing but float rounding. The model
    runs in float64 here: a float32 convolution's rounding depends on the batch it runs in (oneDNN picks
    kernels by batch size, differently on different CPUs) and ten L2 steps amplify it to 2e-4 on some;
    in float64 anything the batching itself changed would stand out above 1e-9."""
    import copy

    mut = ModelUnderTest(copy.deepcopy(digits_module).double(), bounds=Bounds(0.0, 1.0))
    x, y = digits_correct.x[:120].double(), digits_correct.y[:120]
    attack = PGD(eps=eps, norm=norm, steps=10, restarts=2, random_start=True)
    runs = {bs: attack(mut, x, y, seed=5, batch_size=bs) for bs in (7, 64, None)}
    reference = runs[None]
    check_outcome(mut, x, y, None, reference, eps=eps, norm=norm)
    assert reference.x_adv.dtype == torch.float64 and 0 < int(reference.success.sum()) < len(x)
    for bs in (7, 64):
        difference = float((runs[bs].x_adv - reference.x_adv).abs().max())
        assert difference <= 1e-9, f"batch_size={bs}: x_adv differs from batch_size=None by {difference:.3g}"
        assert torch.equal(runs[bs].success, reference.success), f"batch_size={bs}: success differs"
        assert torch.equal(runs[bs].adv_pred, reference.adv_pred)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
def test_pgd_sample_depends_only_on_its_id(norm, eps, digits_mut, digits_correct):
    """Attacking a slice with its sample ids reproduces that slice of the full run."""
    x, y = digits_correct.x[:60], digits_correct.y[:60]
    attack = PGD(eps=eps, norm=norm, steps=10, random_start=True)
    full = attack(digits_mut, x, y, seed=2)
    part = attack(digits_mut, x[17:29], y[17:29], sample_ids=torch.arange(17, 29), seed=2)
    assert float((part.x_adv - full.x_adv[17:29]).abs().max()) <= 1e-6
    assert torch.equal(part.success, full.success[17:29])
    # ... and the id, not the position, is what decides: the same rows under other ids differ.
    shifted = attack(digits_mut, x[17:29], y[17:29], sample_ids=torch.arange(1017, 1029), seed=2)
    assert not torch.equal(shifted.x_adv, part.x_adv)


@_settings(25)
@given(p=problems(norms=("l2",)), steps=st.integers(2, 12), search=st.integers(1, 3),
       abort_early=st.booleans())
def test_cw_does_not_depend_on_batch_size(p, steps, search, abort_early):
    """CW's early abort is per sample, so a sample's result must not depend on its batch mates."""
    attack = CW(steps=steps, binary_search_steps=search, lr=0.1, abort_early=abort_early)
    together = attack(p.model, p.x, p.y, targets=p.targets)
    alone = attack(p.model, p.x, p.y, targets=p.targets, batch_size=1)
    assert torch.equal(alone.success, together.success)
    difference = float((alone.x_adv - together.x_adv).abs().max())
    assert difference <= 1e-6, f"batch_size=1 vs None: x_adv differs by {difference:.3g}"
