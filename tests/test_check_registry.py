"""The check registry (robustlab.integrity.catalogue), and the check added through it: random noise.

Every registered check resolves to a function that asks only for evidence the runner provides;
the texts users read come from the registrations; the adaptive plan follows each check's declared
planner. The "random-noise" check (Carlini et al. 2019: random points of the eps ball must never
beat a gradient attack; strict level) is one function plus one registration: on a model whose
gradients are masked it fails and the Square attack runs; on an honest one it passes.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import robustlab
from robustlab.attacks import RandomNoise
from robustlab.data import digits_split
from robustlab.integrity import CHECKS, adaptive, catalogue, runner
from robustlab.integrity.base import CheckResult, ModelContext
from robustlab.model import ModelUnderTest, RobustlabWarning
import integrity_zoo as zoo

pytestmark = pytest.mark.usefixtures("one_thread")

ASKABLE = {"ctx", "ev", "eps", "labels", "clean_logits", "evidence_by_mode", "margin_label"}


def test_every_registered_check_resolves_and_asks_only_for_what_the_runner_gives():
    specs = catalogue.checks()
    assert [s.id for s in specs][:4] == ["gradients", "logits", "determinism", "unbounded"]  # model-wide first
    for spec in specs:
        fn = runner.resolve(spec)
        assert set(inspect.signature(fn).parameters) <= ASKABLE, spec.id
        assert CHECKS[spec.id] == (spec.title, spec.means, spec.next_step)
        assert catalogue.model_wide(spec.id) == (spec.scope == "model")
    assert set(CHECKS) == {s.id for s in specs}
    assert "random-noise" in {s.id for s in catalogue.checks("strict")}
    assert "random-noise" not in {s.id for s in catalogue.checks("default")}


def test_registering_a_check_twice_or_with_an_unknown_planner_is_refused():
    spec = catalogue.get("random-noise")
    with pytest.raises(ValueError, match="already registered"):
        catalogue.register_check(spec)
    with pytest.raises(ValueError, match="adaptive"):
        catalogue.register_check(catalogue.CheckSpec("x", "t", "m", "n", scope="eps", run="probes:x", adaptive="magic"))


def _context() -> ModelContext:
    mut = ModelUnderTest(zoo.plain(), bounds=(0.0, 1.0), name="m")
    test = digits_split("test")
    x, y = test.x[:8], test.y[:8]
    return ModelContext(mut=mut, source=mut, via_transfer=False, x=x, y=y, ids=torch.arange(8),
                        clean_correct=torch.ones(8, dtype=torch.bool), norm="linf", eps=[0.05, 0.1], seed=0,
                        batch_size=None, level="strict", attacks=[])


def test_the_plan_follows_each_checks_registered_planner():
    ctx = _context()
    noise = CheckResult(model="m", check="random-noise", status="fail", norm="linf", eps=0.1, targeted="none")
    extras, notes = adaptive.plan(ctx, [noise])
    assert [e.label for e in extras] == ["square"] and extras[0].eps == [0.05, 0.1] and not notes
    assert "random-noise" in extras[0].reason
    # a gradient cause found (the forward pass is random: EoT) takes precedence over a blanket Square
    random = CheckResult(model="m", check="determinism", status="fail")
    extras, _ = adaptive.plan(ctx, [random, noise])
    assert [e.label for e in extras] == ["pgd-eot"]
    passed = CheckResult(model="m", check="random-noise", status="pass", norm="linf", eps=0.1, targeted="none")
    assert adaptive.plan(ctx, [passed]) == ([], [])


def test_random_noise_is_a_verified_attack(digits_mut, digits_correct, check_outcome):
    x, y = digits_correct.x[:60], digits_correct.y[:60]
    for norm, eps in (("linf", 0.3), ("l2", 2.0)):
        outcome = RandomNoise(norm=norm, eps=eps, draws=20)(digits_mut, x, y, seed=3)
        check_outcome(digits_mut, x, y, None, outcome, eps=eps, norm=norm)
        again = RandomNoise(norm=norm, eps=eps, draws=20)(digits_mut, x.flip(0), y.flip(0), seed=3,
                                                          sample_ids=torch.arange(len(x)).flip(0))
        assert torch.equal(again.x_adv.flip(0), outcome.x_adv)  # per-sample draws: batch order does not matter


def _strict(model, n: int = 60, eps: float = 0.1):
    data = digits_split("test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RobustlabWarning)
        return robustlab.audit(model, data.head(n), attacks=("fgsm", "pgd"), suite="none", eps=(eps,),
                               checks="strict", progress=False)


def _check(result, name):
    return next(c for c in result.metadata["checks"]["results"] if c["check"] == name)


def test_random_noise_fails_on_masked_gradients_and_square_runs():
    result = _strict(zoo.quantised(), eps=0.2)  # PGD is blind here; noise of a larger ball breaks enough to judge
    noise = _check(result, "random-noise")
    assert noise["status"] == "fail", noise
    assert noise["evidence"]["broken"] > 0 and noise["evidence"]["probed"] == noise["evidence"]["robust_rows"]
    assert "probe:noise" in set(result.samples["attack"])  # what noise broke joins the worst case
    square = [a for a in result.metadata["checks"]["adaptive"] if a["attack"] == "square"]
    assert square and "random-noise" in square[0]["check"]


def test_random_noise_passes_on_an_honest_model():
    result = _strict(zoo.plain())
    assert _check(result, "random-noise")["status"] == "pass"
