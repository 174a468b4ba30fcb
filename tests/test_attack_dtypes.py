"""Attacks on float16 and bfloat16 models find what they find in float32 (issue 17, item 1).

The suite's digits CNN is copied and cast (`copy.deepcopy(module).to(dtype)`, the session model is
left alone), wrapped, and attacked on its own dtype's inputs. Every attack's robust accuracy must
be within 2 points of the float32 model's on the same weights. Before the fix it was not (first
200 test samples, eps 0.1): float16 PGD reported 0.930 (float32: 0.455), its random start being
the all-white image, judged a success outside the ball and frozen, then contained back where it no
longer fooled; float16 L2 PGD and FGSM raised on non-finite outputs; bfloat16 FGSM reported 0.740
(float32: 0.545: on bfloat16 logits the cross-entropy gradient loses its true-class term) and
PGD 0.590; float16 CW 0.980 (float32: 0.230).

CPU float16 convolutions run in torch 2.13 (about 6x slower than float32 on this model), so the
CNN is used for both dtypes; the expensive attacks (Square, CW) get fewer samples.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import robustlab
from robustlab.attacks import CW, FGSM, PGD, Square, restrict
from robustlab.model import ModelUnderTest
from robustlab.threat import get_norm
from robustlab import seeding
from support import digits_model, digits_test

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 0.02  # robust accuracy, absolute
# Square on a bfloat16 model: a score-based search sees logits rounded to 8 significant bits, so most
# candidates tie and it stays 2 to 2.7 points above float32 on some CPUs (Intel Xeon, 8 seeds: 0.677 against
# 0.657; AMD EPYC: 0.667 against 0.652). The audit's worst case does not rest on it where gradients exist
# (PGD on the same bfloat16 model stays within TOLERANCE); this bound keeps the gap from growing.
SQUARE_BFLOAT16_TOLERANCE = 0.03
N_GRADIENT, N_SLOW = 300, 150  # samples for the gradient attacks / for Square and CW
LOW = (torch.float16, torch.bfloat16)

ATTACKS = {  # name: (attack, samples, budget for CW's restrict)
    "fgsm-linf": (FGSM(eps=0.1), N_GRADIENT),
    "fgsm-l2": (FGSM(norm="l2", eps=1.0), N_GRADIENT),
    "pgd-linf": (PGD(eps=0.1, steps=10), N_GRADIENT),
    "pgd-l2": (PGD(norm="l2", eps=1.0, steps=10), N_GRADIENT),
    "pgd-margin-linf": (PGD(eps=0.1, steps=10, loss="margin"), N_GRADIENT),
    "square-linf": (Square(eps=0.1, queries=100), N_SLOW),
    "square-l2": (Square(norm="l2", eps=1.0, queries=100), N_SLOW),
    "cw": (CW(steps=30, binary_search_steps=3), N_SLOW),
}
BUDGETS = {"cw-l2": ("l2", 1.0), "cw-linf": ("linf", 0.1)}


@functools.lru_cache(maxsize=None)
def model_in(dtype: torch.dtype) -> ModelUnderTest:
    return robustlab.wrap(copy.deepcopy(digits_model()).to(dtype).eval(), bounds=(0, 1), name=f"digits-{dtype}")


@functools.lru_cache(maxsize=None)
def run(dtype: torch.dtype, name: str):
    """(model, x, y, outcome) of one attack on the model cast to dtype (cached: each runs once)."""
    attack, n = ATTACKS[name]
    data = digits_test(450)
    model = model_in(dtype)
    x, y = data.x[:n].to(dtype), data.y[:n]
    return model, x, y, attack(model, x, y, seed=0)


SQUARE_SEEDS = (0, 1, 2)  # Square's random search moves a 150-sample figure by ~1.5 points from seed to seed


def square_mean(dtype: torch.dtype, name: str, check_outcome) -> float:
    """Square's robust accuracy, the mean over SQUARE_SEEDS, every outcome's invariants checked."""
    attack, _ = ATTACKS[name]
    model, x, y, _ = run(dtype, name)
    values = []
    for seed in SQUARE_SEEDS:
        outcome = attack(model, x, y, seed=seed)
        check_outcome(model, x, y, None, outcome, eps=attack.eps, norm=attack.norm)
        values.append(1.0 - outcome.success_rate)
    return sum(values) / len(values)


def robust_accuracies(dtype: torch.dtype, name: str, check_outcome) -> dict[str, float]:
    """Robust accuracy per budget, after checking every outcome's invariants independently."""
    model, x, y, outcome = run(dtype, name)
    attack = ATTACKS[name][0]
    if name.startswith("square"):
        return {name: square_mean(dtype, name, check_outcome)}
    if name != "cw":
        check_outcome(model, x, y, None, outcome, eps=attack.eps, norm=attack.norm)
        return {name: 1.0 - outcome.success_rate}
    check_outcome(model, x, y, None, outcome, eps=None, norm="l2")
    out = {}
    for label, (norm, eps) in BUDGETS.items():
        bounded = restrict(outcome, model, x, y, eps, norm)
        check_outcome(model, x, y, None, bounded, eps=eps, norm=norm)
        out[label] = 1.0 - bounded.success_rate
    return out


@pytest.mark.parametrize("dtype", LOW, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_low_precision_robust_accuracy_matches_float32(name, dtype, check_outcome):
    ours = robust_accuracies(dtype, name, check_outcome)
    reference = robust_accuracies(torch.float32, name, check_outcome)
    _, x, _, outcome = run(dtype, name)
    assert outcome.x_adv.dtype == dtype
    tolerance = SQUARE_BFLOAT16_TOLERANCE if name.startswith("square") and dtype == torch.bfloat16 else TOLERANCE
    for label, value in ours.items():
        print(f"\n{label}: robust accuracy {dtype} {value:.3f}, float32 {reference[label]:.3f}")
        assert abs(value - reference[label]) <= tolerance + 1e-9, (label, dtype, value, reference[label])


@pytest.mark.parametrize("dtype", LOW, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_is_the_float64_draw_rounded(norm, dtype):
    """The shared random start (PGD, adversarial training) is the float64 draw cast once: finite,
    within one rounding of the ball, and not clamped to the box's corner. Before, 99.6% of float16
    uniforms were inf."""
    ids, shape = torch.arange(64), (1, 8, 8)
    u = seeding.uniform(0, 100, ids, shape, dtype=dtype)
    exact = seeding.uniform(0, 100, ids, shape, dtype=torch.float64)
    assert bool(torch.isfinite(u).all()) and bool(((u >= 0) & (u < 1)).all())
    assert torch.equal(u, exact.to(dtype).clamp_max(float(torch.nextafter(torch.ones((), dtype=dtype),
                                                                           torch.zeros((), dtype=dtype)))))
    geometry = get_norm(norm)
    eps = 0.1 if norm == "linf" else 1.0
    eps_t = torch.full((64,), eps, dtype=torch.float64)
    start = geometry.random_start(eps_t, ids, shape, seed=0, stream=100, device="cpu", dtype=dtype)
    wide = geometry.random_start(eps_t, ids, shape, seed=0, stream=100, device="cpu", dtype=torch.float64)
    assert start.dtype == dtype and torch.equal(start, wide.to(dtype))
    size = geometry.measure(start.double())
    assert bool((size <= eps * (1 + 2 * torch.finfo(dtype).eps)).all()) and bool((size > 0.5 * eps).all())
