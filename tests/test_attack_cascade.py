"""The standard cascade against the reference AutoAttack (standard version), same models and samples.

AutoAttack (Croce & Hein 2020: APGD-CE, APGD-T, FAB-T, Square) is the field's reference
evaluation; torchattacks 3.5.1 ships a port of it (installed with `--no-deps` in the test
environment). On PGD-trained digits CNNs (Linf eps 0.2 and L2 eps 1.0, trained here with the
project's own `adversarial_training`, seeded) and on the undefended CNN, 300 test samples: the
cascade's robust accuracy is never more than 0.5 points above the reference's, and APGD-CE alone
matches the reference APGD-CE within noise over 5 seeds. Slow (a few minutes): marked `slow`,
run in CI.
"""

from __future__ import annotations

import functools
import math
import statistics

import pytest
import torch

from robustlab.attacks import APGD, Cascade
from robustlab.data import digits_split
from robustlab.defenses import adversarial_training
from robustlab.model import ModelUnderTest
from robustlab.training import seeded_init
from robustlab.zoo import DigitsCNN
from support import digits_model, single_thread

torchattacks = pytest.importorskip("torchattacks")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

N = 300
SLACK = 0.005  # the bar: never more than 0.5 points above the reference


@functools.lru_cache(maxsize=None)
def _model(kind: str) -> torch.nn.Module:
    if kind == "undefended":
        module = digits_model()
    else:
        norm, eps = ("linf", 0.2) if kind == "pgd-at-linf" else ("l2", 1.0)
        with single_thread():
            module = adversarial_training(seeded_init(DigitsCNN, 1), digits_split("train"), method="pgd", eps=eps,
                                          norm=norm, steps=7, epochs=15, seed=1)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _samples() -> tuple[torch.Tensor, torch.Tensor]:
    test = digits_split("test")
    return test.x[:N], test.y[:N]


def _reference_robust(module, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (module(x_adv).argmax(1) == y) & (module(x).argmax(1) == y)


CASES = [("undefended", "linf", 0.1), ("undefended", "linf", 0.2), ("undefended", "l2", 0.5),
         ("undefended", "l2", 1.0), ("pgd-at-linf", "linf", 0.1), ("pgd-at-linf", "linf", 0.2),
         ("pgd-at-l2", "l2", 0.5), ("pgd-at-l2", "l2", 1.0)]


@pytest.mark.parametrize("kind,norm,eps", CASES, ids=[f"{k}-{n}-{e:g}" for k, n, e in CASES])
def test_cascade_is_never_above_autoattack(kind, norm, eps, check_outcome):
    module = _model(kind)
    x, y = _samples()
    mut = ModelUnderTest(module, bounds=(0.0, 1.0), name=kind)
    with torch.no_grad():
        correct = module(x).argmax(1) == y
    outcome = Cascade(eps=eps, norm=norm)(mut, x, y, seed=0)
    check_outcome(mut, x, y, None, outcome, eps=eps, norm=norm)
    ours = float((~outcome.success & correct).double().mean())
    reference = torchattacks.AutoAttack(module, norm="Linf" if norm == "linf" else "L2", eps=eps, version="standard",
                                        n_classes=10, seed=0)
    theirs = float(_reference_robust(module, reference(x, y), x, y).double().mean())
    print(f"{kind} {norm} eps={eps:g}: robustlab cascade {ours:.4f}, reference AutoAttack {theirs:.4f} "
          f"(members that broke samples: {sorted(set(outcome.broken_by) - {''})})")
    assert ours <= theirs + SLACK, f"robustlab reports {ours:.4f} robust, AutoAttack {theirs:.4f}"


SEEDS = 5
Z_ONE_SIDED_99 = 2.326  # ours may not be weaker than the reference by more than this many standard errors


@pytest.mark.parametrize("kind,norm,eps", [("pgd-at-linf", "linf", 0.2), ("pgd-at-l2", "l2", 1.0)])
def test_apgd_ce_matches_the_reference_on_adversarially_trained_models(kind, norm, eps):
    """Where weak attacks hide: APGD-CE alone, 5 seeds each, against the reference APGD-CE.

    A single seed's robust accuracy moves by about 0.8 points from seed to seed on these models
    (300 samples), so 3 seeds cannot tell a 1-point difference from noise: with seeds 0-2 the
    Linf case read 0.4867 against 0.4756, with seeds 0-9 0.4827 against 0.4807. The test asks
    that robustlab's mean is not significantly above the reference's (one-sided, 99%, standard
    error from the seeds' spread), and never more than 1 point above it whatever the spread.
    """
    module = _model(kind)
    x, y = _samples()
    mut = ModelUnderTest(module, bounds=(0.0, 1.0), name=kind)
    with torch.no_grad():
        correct = module(x).argmax(1) == y
    ours, theirs = [], []
    for seed in range(SEEDS):
        outcome = APGD(eps=eps, norm=norm, steps=100)(mut, x, y, seed=seed)
        ours.append(float((~outcome.success & correct).double().mean()))
        reference = torchattacks.APGD(module, norm="Linf" if norm == "linf" else "L2", eps=eps, steps=100,
                                      seed=seed, loss="ce")
        theirs.append(float(_reference_robust(module, reference(x, y), x, y).double().mean()))
    mean_ours, mean_theirs = statistics.mean(ours), statistics.mean(theirs)
    standard_error = math.sqrt((statistics.variance(ours) + statistics.variance(theirs)) / SEEDS)
    print(f"APGD-CE {kind} {norm} eps={eps:g}: robustlab {ours} (mean {mean_ours:.4f}), reference {theirs} "
          f"(mean {mean_theirs:.4f}), standard error of the difference {standard_error:.4f}")
    assert mean_ours - mean_theirs <= Z_ONE_SIDED_99 * standard_error, "APGD-CE significantly weaker than the reference"
    assert mean_ours - mean_theirs <= 0.01
