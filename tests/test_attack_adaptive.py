"""Adaptive attacks (Athalye et al. 2018): BPDA through gradient blockers, EoT through randomness.

The suite's digits CNN, with a gradient-masking layer put in front (no training). Figures (200
correctly classified test samples, Linf eps 0.1, PGD-20; printed with `pytest -s`) at the time of
writing: undefended 0.47; 32-level input quantisation: plain PGD 1.00, BPDA + transfer 0.515;
zero-gradient layer: plain PGD 1.00, BPDA + transfer 0.47. Noise defense (sigma 0.1, 100 samples,
PGD-20, robust accuracy of the expected prediction / of the one verification draw): without EoT
0.84 / 0.74, with 16 EoT samples 0.61 / 0.65.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustlab.attacks import FGSM, PGD, bpda, find_gradient_blockers, is_random, transfer
from robustlab.attacks import gradient as gradient_module
from robustlab.attacks.gradient import expected_loss_and_gradient, loss_and_gradient
from robustlab.errors import InputError
from robustlab.model import ModelUnderTest
from robustlab.threat import contain, get_norm
from support import GradientKiller as Killer

pytestmark = pytest.mark.usefixtures("one_thread")


class Quantise(nn.Module):
    """Input quantisation to k levels: piecewise constant, so its gradient is zero almost everywhere."""

    def __init__(self, levels: int = 32) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, x):
        return torch.round(x * self.levels) / self.levels




class QuantiseFlat(nn.Module):
    """A blocker that changes the shape: (N, 1, 8, 8) -> (N, 64), quantised."""

    def forward(self, x):
        return torch.round(x.flatten(1) * 32) / 32


class Noisy(nn.Module):
    """A randomised defense: Gaussian noise on the input, drawn anew in every forward pass."""

    def __init__(self, inner: nn.Module, sigma: float) -> None:
        super().__init__()
        self.inner, self.sigma = inner, sigma

    def forward(self, x):
        return self.inner(x + self.sigma * torch.randn_like(x))


def wrap(*layers: nn.Module) -> ModelUnderTest:
    return ModelUnderTest(nn.Sequential(*layers).eval(), bounds=(0, 1), output="logits")


def robust(outcome) -> float:
    return 1.0 - outcome.success_rate


def snapshot(module: nn.Module) -> dict:
    """Everything about a module that bpda / find_gradient_blockers must leave alone."""
    return {
        "state": {k: v.clone() for k, v in module.state_dict().items()},
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for n, m in module.named_modules()],
        "training": [m.training for m in module.modules()],
        "grad": [p.requires_grad for p in module.parameters()],
    }


def assert_unchanged(module: nn.Module, before: dict) -> None:
    after = snapshot(module)
    assert after["hooks"] == before["hooks"]
    assert all(f == 0 and p == 0 and b == 0 for _, f, p, b in after["hooks"]), after["hooks"]
    assert after["training"] == before["training"] and after["grad"] == before["grad"]
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])


# ============================================================================ find_gradient_blockers
def test_blockers_are_found_exactly(digits_module, digits_correct):
    x, y = digits_correct.x[:32], digits_correct.y[:32]
    before = snapshot(digits_module)
    assert find_gradient_blockers(ModelUnderTest(digits_module, bounds=(0, 1)), x, y) == []
    assert find_gradient_blockers(wrap(Quantise(), digits_module), x, y) == ["0"]
    assert find_gradient_blockers(wrap(Killer(), digits_module), x, y) == ["0"]
    torch.manual_seed(0)
    in_place = wrap(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(32, 10))
    assert find_gradient_blockers(in_place, x, y) == []
    both = wrap(Quantise(), nn.Identity(), Killer(), digits_module)
    assert find_gradient_blockers(both, x, y) == ["0", "2"]  # the killer downstream does not hide the quantiser
    assert_unchanged(digits_module, before)


# ============================================================================ bpda
@pytest.mark.parametrize("blocker", [Quantise, Killer])
def test_bpda_restores_pgd(blocker, digits_module, digits_correct):
    x, y = digits_correct.x[:200], digits_correct.y[:200]
    before = snapshot(digits_module)
    undefended = robust(PGD(eps=0.1, steps=20)(ModelUnderTest(digits_module, bounds=(0, 1)), x, y))
    masked = wrap(blocker(), digits_module)
    masked_before = snapshot(masked.module)
    plain = robust(PGD(eps=0.1, steps=20)(masked, x, y))
    surrogate = bpda(masked, probe=x[:32])
    outcome = PGD(eps=0.1, steps=20)(surrogate, x, y)
    judged = transfer(outcome, masked, x, y)  # success re-checked on the ORIGINAL model
    print(f"\n{blocker.__name__}: robust accuracy undefended {undefended:.3f}, plain PGD {plain:.3f}, "
          f"BPDA + transfer {robust(judged):.3f}")
    assert plain >= 0.95
    assert abs(robust(judged) - undefended) <= 0.08
    assert torch.equal(judged.success, outcome.success)  # the surrogate computes the same function
    with torch.no_grad():
        original, approximated = masked(x), surrogate(x)
    assert torch.allclose(approximated, original, rtol=1e-5, atol=1e-5 * float(original.abs().max()))
    assert_unchanged(masked.module, masked_before)
    assert_unchanged(digits_module, before)
    assert surrogate.module is not masked.module
    assert surrogate.bounds == masked.bounds and surrogate.num_classes == masked.num_classes
    assert find_gradient_blockers(surrogate, x[:32], y[:32]) == []


def test_bpda_of_a_differentiable_identity_changes_nothing(digits_module, digits_correct):
    """Straight-through identity on a layer that is the identity: PGD must find exactly the same."""
    x, y = digits_correct.x[:100], digits_correct.y[:100]

    class Times1(nn.Module):
        def forward(self, t):
            return t * 1.0

    model = wrap(Times1(), digits_module)
    reference = PGD(eps=0.1, steps=10)(model, x, y)
    outcome = PGD(eps=0.1, steps=10)(bpda(model, ["0"], probe=x), x, y)
    assert float((outcome.x_adv - reference.x_adv).abs().max()) <= 1e-6
    assert torch.equal(outcome.success, reference.success)


def test_bpda_shape_changing_layer_needs_an_approximation(digits_module, digits_correct):
    x, y = digits_correct.x[:32], digits_correct.y[:32]
    model = wrap(QuantiseFlat(), nn.Unflatten(1, (1, 8, 8)), digits_module)
    model.inspect(x)
    assert find_gradient_blockers(model, x, y) == ["0"]
    with pytest.raises(InputError, match="'0'") as error:
        bpda(model)  # layers=None: found on random probe inputs; the identity cannot stand in for it
    assert error.value.argument == "layers"
    surrogate = bpda(model, {"0": lambda t: t.flatten(1)})
    with torch.no_grad():
        assert torch.allclose(surrogate(x), model(x), atol=1e-4)
    xg = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(surrogate(xg).sum(), xg)
    assert float(grad.abs().max()) > 0


def test_bpda_refuses_bad_layers(digits_module, digits_correct):
    model = wrap(Quantise(), digits_module)
    with pytest.raises(InputError, match="no layer named 'nope'"):
        bpda(model, ["nope"])
    with pytest.raises(InputError, match="layers"):
        bpda(model)  # not inspected, no probe: no way to find the blockers
    with pytest.raises(InputError, match="callable"):
        bpda(model, {"0": 3})
    model.inspect(digits_correct.x[:8])
    found = bpda(model)  # inspected: random probe inputs in the bounds find the quantiser
    xg = digits_correct.x[:8].clone().requires_grad_(True)
    grad, = torch.autograd.grad(found(xg).sum(), xg)
    assert float(grad.abs().max()) > 0


# ============================================================================ EoT
def _expected_robust_accuracy(module: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, draws: int = 32) -> float:
    with torch.no_grad():
        logits = torch.stack([module(x_adv) for _ in range(draws)]).mean(0)
    return float((logits.argmax(1) == y).double().mean())


@pytest.mark.filterwarnings("ignore:model 'Noisy'")
def test_eot_beats_single_sample_gradients_on_a_random_model(digits_module, digits_correct):
    x, y = digits_correct.x[:100], digits_correct.y[:100]
    noisy = Noisy(digits_module, sigma=0.1).eval()
    model = ModelUnderTest(noisy, bounds=(0, 1), output="logits")
    torch.manual_seed(0)
    assert is_random(model, x[:8])
    results = {}
    for k in (1, 16):
        torch.manual_seed(1)
        outcome = PGD(eps=0.1, steps=20, eot_samples=k)(model, x, y)
        assert outcome.gradient_calls == len(x) * 20 * k
        torch.manual_seed(2)
        results[k] = (_expected_robust_accuracy(noisy, outcome.x_adv, y), robust(outcome))
    print(f"\nnoise sigma 0.1, PGD-20: robust accuracy (expected prediction / one verification draw) "
          f"without EoT {results[1][0]:.3f} / {results[1][1]:.3f}, EoT-16 {results[16][0]:.3f} / {results[16][1]:.3f}")
    assert results[16][0] <= results[1][0] - 0.10
    assert results[16][1] < results[1][1]


def _old_pgd(model, x, y, eps, steps, seed):
    """PGD as written before eot_samples existed (attacks/pgd.py at d0f5b6b), for one restart."""
    norm = get_norm("linf")
    low, high = model.bounds.tensors(x)
    eps_t = torch.full((len(x),), eps)
    start = norm.random_start(eps_t, torch.arange(len(x)), tuple(x.shape[1:]), seed=seed, stream=100,
                              device=x.device, dtype=x.dtype)
    x_adv = torch.minimum(torch.maximum(x + start, low), high)
    best, found = x.clone(), torch.zeros(len(x), dtype=torch.bool)
    for _ in range(steps):
        logits, _, grad = loss_and_gradient(model, x_adv, y, None, "ce")
        hit = logits.argmax(1) != y
        best = torch.where((hit & ~found).reshape(-1, 1, 1, 1), x_adv, best)
        found = found | hit
        x_adv = norm.ascend(x, x_adv, grad, 2.5 * eps / steps, eps_t, low, high)
    return torch.where(found.reshape(-1, 1, 1, 1), best, x_adv)


def test_eot_one_sample_is_the_old_pgd_bit_for_bit(digits_mut, digits_correct):
    x, y = digits_correct.x[:60], digits_correct.y[:60]
    outcome = PGD(eps=0.1, steps=10, eot_samples=1)(digits_mut, x, y, seed=7)
    with digits_mut.evaluating():
        old = _old_pgd(digits_mut, x, y, 0.1, 10, seed=7)
    # the base class's exact containment step (one-ulp nudges where float32 rounding left the ball)
    old = contain(x, old, torch.full((len(x),), 0.1, dtype=torch.float64), get_norm("linf"), digits_mut.bounds)
    assert torch.equal(outcome.x_adv, old)
    default = PGD(eps=0.1, steps=10)(digits_mut, x, y, seed=7)
    assert torch.equal(default.x_adv, outcome.x_adv)


def test_eot_on_a_deterministic_model_averages_identical_gradients(digits_mut, digits_correct, monkeypatch):
    x, y = digits_correct.x[:20], digits_correct.y[:20]
    with digits_mut.evaluating():
        _, _, single = loss_and_gradient(digits_mut, x, y, None, "ce")
        logits, value, repeated = expected_loss_and_gradient(digits_mut, x, y, None, "ce", 4)
        monkeypatch.setattr(gradient_module, "EOT_REPEAT_VALUES", 0)  # force the k-pass loop
        logits_loop, value_loop, looped = expected_loss_and_gradient(digits_mut, x, y, None, "ce", 4)
    scale = float(single.abs().max())
    assert torch.allclose(repeated, single, atol=1e-5 * scale) and torch.allclose(looped, single, atol=1e-5 * scale)
    assert logits.shape == logits_loop.shape == (20, 10) and value.shape == value_loop.shape == (20,)
    assert torch.allclose(logits, logits_loop, atol=1e-4)


def test_eot_options_are_validated(digits_mut, digits_correct):
    x, y = digits_correct.x[:4], digits_correct.y[:4]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError) as error:
            PGD(eps=0.1, eot_samples=bad)(digits_mut, x, y)
        assert error.value.argument == "eot_samples"
        with pytest.raises(InputError):
            FGSM(eps=0.1, eot_samples=bad)(digits_mut, x, y)
    assert FGSM(eps=0.1, eot_samples=3)(digits_mut, x, y).gradient_calls == 12


@pytest.mark.filterwarnings("ignore:model 'Noisy'")
def test_is_random(digits_module, digits_correct):
    x = digits_correct.x[:8]
    assert not is_random(ModelUnderTest(digits_module, bounds=(0, 1)), x, repeats=3)
    assert is_random(ModelUnderTest(Noisy(digits_module, 0.05).eval(), bounds=(0, 1), output="logits"), x)
    with pytest.raises(InputError, match="repeats"):
        is_random(ModelUnderTest(digits_module, bounds=(0, 1)), x, repeats=1)
