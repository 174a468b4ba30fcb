"""Certification (robustlab.certify): IBP, CROWN and randomised smoothing against closed forms,
sampled points, attacks and the published behaviour.

- Linear models: the margin bound is the closed form margin - eps * ||w_y - w_j||_dual (both
  methods are exact there), and with Linf box clipping it is the margin at the minimising corner.
- Locally linear ReLU networks (every ReLU stable in the ball): CROWN is exact, i.e. it equals the
  margin at the corner picked by the local gradient, and at least IBP's bound.
- Soundness: bounds contain the margins of many random points and APGD's adversarial points; no
  sample certified at eps is broken by APGD at eps.
- CROWN vs IBP (Zhang et al. 2018; 2020): tighter on every sample of a naturally trained MLP; not
  uniformly tighter on an IBP-trained one, where IBP wins on some samples.
- Randomised smoothing: on a linear two-class model the certified radius approaches the distance
  to the hyperplane (sigma * Phi^-1(p_A) is that distance) and never exceeds it; abstentions at the
  boundary; batch-size invariance; on digits the curves of Cohen et al. 2019.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab
from robustlab.attacks import APGD
from robustlab.certify import (InputSet, SmoothedClassifier, UnsupportedLayerError, certify,
                               clopper_pearson_lower, margin_spec, predict_smoothed, spec_lower, trace)
from robustlab.certify.bounds import layer_bounds
from robustlab.certify.ops import MaxPool, ReLU
from robustlab.data import digits_split
from robustlab.errors import InputError
from robustlab.training import seeded_init, train_classifier
from support import digits_model, digits_test

pytestmark = pytest.mark.usefixtures("one_thread")

DUAL = {"linf": 1, "l2": 2}  # the dual norm's p: ||.||_1 for Linf balls, ||.||_2 for L2


def mlp(width: int = 64) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def random_cnn() -> nn.Module:
    """Every supported layer kind, random weights and batch-norm statistics, eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return _random_cnn()


def _random_cnn() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Dropout(0.3),
        nn.Flatten(), nn.Linear(32, 24), nn.ReLU(), nn.Identity(), nn.Linear(24, 10))
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):  # He-scaled, so that inputs matter more than biases
            nn.init.normal_(layer.weight, std=2.0 / math.sqrt(layer.weight[0].numel()))
            nn.init.uniform_(layer.bias, -0.05, 0.05)
    bn = model[1]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def train() -> robustlab.data.Dataset:
    return digits_split("train")


@pytest.fixture(scope="module")
def test_split() -> robustlab.data.Dataset:
    return digits_split("test")


@pytest.fixture(scope="module")
def natural_mlp(train) -> nn.Module:
    return train_classifier(seeded_init(mlp, 0), train, epochs=20, seed=0)


@pytest.fixture(scope="module")
def ibp_mlp(train) -> nn.Module:
    """IBP training (Gowal et al. 2018) at Linf eps 0.1: eps ramped up and kappa from 1 to 0.5
    over the first half, through the package's own differentiable bounds."""
    model = seeded_init(mlp, 0)
    chain = trace(model, (1, 8, 8), dtype=torch.float32)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    epochs, eps = 30, 0.11
    low, high = torch.tensor(0.0), torch.tensor(1.0)
    for epoch in range(epochs):
        ramp = min(1.0, epoch / (0.5 * epochs))
        order = torch.randperm(len(train.x), generator=generator)
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            x, y = train.x[idx], train.y[idx]
            bound = spec_lower(chain, InputSet(x, eps * ramp, "linf", low, high),
                               margin_spec(y, 10, dtype=torch.float32), "ibp")
            worst = torch.logsumexp(torch.cat([torch.zeros(len(x), 1), -bound], 1), 1).mean()
            loss = (1 - 0.5 * ramp) * F.cross_entropy(model(x), y) + 0.5 * ramp * worst
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


# ---------------------------------------------------------------------------- linear closed forms
def linear_case(seed: int = 0, n: int = 40):
    model = seeded_init(lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), seed).double().eval()
    x = torch.rand(n, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    logits = model(x).detach()
    y = logits.argmax(1)
    w = model[1].weight.detach()
    return model, x, y, logits, w


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_linear_model_bound_and_radius_are_the_closed_form(method, norm):
    model, x, y, logits, w = linear_case()
    mut = robustlab.wrap(model, bounds=(-100.0, 100.0))  # far outside any ball: no clipping
    margins = logits.gather(1, y.unsqueeze(1)) - logits  # (N, K)
    dual = torch.linalg.vector_norm(w[y].unsqueeze(1) - w.unsqueeze(0), ord=DUAL[norm], dim=2)  # (N, K)
    others = torch.ones_like(margins, dtype=torch.bool).scatter_(1, y.unsqueeze(1), False)
    radius = torch.where(others, margins / dual, torch.full_like(margins, math.inf)).min(1).values
    eps = 0.02 if norm == "linf" else 0.1
    expected = torch.where(others, margins - eps * dual, torch.full_like(margins, math.inf)).min(1).values
    outcome = certify(mut, x, y, eps=eps, norm=norm, method=method)
    torch.testing.assert_close(outcome.margin_lower, expected, rtol=1e-10, atol=1e-10)
    for q in (0.1, 0.3, 0.5, 0.7, 0.9):  # the decision flips exactly at the closed-form radius
        eps = float(radius.quantile(q))
        certified = certify(mut, x, y, eps=eps, norm=norm, method=method).certified
        decided = (radius - eps).abs() > 1e-9
        assert torch.equal(certified[decided], (radius > eps)[decided])
        assert 0 < int(certified.sum()) < len(x)


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_linear_model_linf_bound_with_box_clipping_is_the_margin_at_the_worst_corner(method):
    model, x, y, logits, w = linear_case(seed=1)
    mut = robustlab.wrap(model, bounds=(0.0, 1.0))
    eps = 0.3  # most coordinates are clipped by [0, 1]
    lo, hi = (x - eps).clamp_min(0), (x + eps).clamp_max(1)
    expected = torch.full((len(x),), math.inf, dtype=torch.float64)
    for j in range(10):  # the minimiser of a linear margin over a box is a corner: evaluate the model there
        direction = (w[y] - w[j]).reshape(x.shape)
        corner = torch.where(direction > 0, lo, hi)
        out = model(corner).detach()
        value = out.gather(1, y.unsqueeze(1)).squeeze(1) - out[:, j]
        expected = torch.where(y != j, torch.minimum(expected, value), expected)
    outcome = certify(mut, x, y, eps=eps, norm="linf", method=method)
    torch.testing.assert_close(outcome.margin_lower, expected, rtol=1e-10, atol=1e-10)


def test_normalisation_inside_the_wrapper_is_certified_as_an_affine_first_layer():
    model, x, y, _, w = linear_case(seed=2)
    mean, std = 0.3, 0.2
    mut = robustlab.wrap(model, bounds=(-100.0, 100.0), mean=mean, std=std)
    logits = mut(x).detach()
    y = logits.argmax(1)
    margins = logits.gather(1, y.unsqueeze(1)) - logits
    dual = torch.linalg.vector_norm(w[y].unsqueeze(1) - w.unsqueeze(0), ord=1, dim=2) / std  # rows of W / std
    expected = torch.where(margins > 0, margins - 0.01 * dual, torch.full_like(margins, math.inf)).min(1).values
    for method in ("ibp", "crown"):
        outcome = certify(mut, x, y, eps=0.01, method=method)
        torch.testing.assert_close(outcome.margin_lower, expected, rtol=1e-10, atol=1e-10)


def test_first_layer_l2_bounds_are_the_dual_norm_of_the_weight_rows(natural_mlp):
    """IBP's first layer on an L2 ball: W x + b +- eps ||W_i||_2, with W the layer's matrix (for a
    convolution read off its Jacobian, zero padding included), normalisation folded in."""
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps, std = 0.3, 0.5
    wide = (torch.tensor(-100.0, dtype=torch.float64), torch.tensor(100.0, dtype=torch.float64))
    for model in (natural_mlp, digits_model()):
        mut = robustlab.wrap(model, bounds=(-100.0, 100.0), std=std)
        mut.inspect(x.float())
        chain = robustlab.certify.chain_for(mut)
        first = next(i for i, op in enumerate(chain.ops) if isinstance(op, ReLU))
        lo, hi = layer_bounds(chain, InputSet(x, eps, "l2", *wide), "ibp")[first]
        block = chain.ops[:first]  # normalisation, the first Linear or Conv2d (and a flatten)
        matrix = torch.autograd.functional.jacobian(lambda z: _run(block, z.reshape(1, 1, 8, 8)).reshape(-1),
                                                    x[0].reshape(-1))
        center = _run(block, x)
        radius = eps * torch.linalg.vector_norm(matrix, dim=1).reshape(center.shape[1:])
        torch.testing.assert_close(lo, center - radius, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(hi, center + radius, rtol=1e-10, atol=1e-10)


def _run(ops, z):
    for op in ops:
        z = op.forward(z)
    return z


# ---------------------------------------------------------------------------- tracing
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_trace_computes_the_model_and_refuses_what_it_cannot_bound():
    for model in (digits_model(), random_cnn()):
        chain = trace(model, (1, 8, 8))
        x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(chain.forward(x.double()), model(x).double(), rtol=1e-5, atol=1e-5)

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 10)

        def forward(self, x):
            h = x.flatten(1)
            return self.b(h + torch.relu(self.a(h)))

    cases = [
        ("2", nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))),
        ("<model>", torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))),
        ("add", Residual()),
        ("2", nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Softmax(dim=1))),
        ("0", nn.Sequential(nn.MaxPool2d(3, ceil_mode=True), nn.Flatten(), nn.Linear(9, 10))),
    ]
    for layer, model in cases:
        with pytest.raises(UnsupportedLayerError) as error:
            trace(model.eval(), (1, 8, 8))
        assert error.value.layer == layer and "Supported:" in str(error.value)
        assert isinstance(error.value, InputError)
    with pytest.raises(UnsupportedLayerError, match="Tanh"):  # through the public API, before any work
        certify(cases[0][1].eval(), torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), eps=0.1)


def test_final_log_softmax_is_dropped_and_the_certificate_is_unchanged(natural_mlp, test_split):
    x, y = test_split.x[:50], test_split.y[:50]
    plain = certify(natural_mlp, x, y, eps=0.02, method="crown")
    logp = certify(nn.Sequential(natural_mlp, nn.LogSoftmax(dim=1)).eval(), x, y, eps=0.02, method="crown")
    torch.testing.assert_close(plain.margin_lower, logp.margin_lower, rtol=1e-12, atol=1e-12)
    assert any("log_softmax" in note for note in logp.notes)


# ---------------------------------------------------------------------------- soundness
def ball_points(x: torch.Tensor, eps: float, norm: str, k: int, generator: torch.Generator) -> torch.Tensor:
    """k points per sample in the ball, inside [0, 1]: Linf corners and uniform points, L2 sphere
    points (clipping moves a point toward x, so it stays in the ball)."""
    n, shape = len(x), x.shape[1:]
    if norm == "linf":
        u = torch.rand(k, n, *shape, generator=generator, dtype=x.dtype) * 2 - 1
        delta = torch.where(torch.arange(k).reshape(-1, *[1] * x.dim()) % 2 == 0, u.sign(), u) * eps
    else:
        d = torch.randn(k, n, *shape, generator=generator, dtype=x.dtype)
        delta = eps * d / torch.linalg.vector_norm(d.reshape(k, n, -1), dim=2).reshape(k, n, *[1] * len(shape))
    return (x.unsqueeze(0) + delta).clamp(0, 1)


@pytest.mark.parametrize("norm,eps", [("linf", 0.03), ("l2", 0.3)])
@pytest.mark.parametrize("method", ["ibp", "crown"])
@pytest.mark.parametrize("name", ["random-cnn", "natural-mlp"])
def test_bounds_contain_the_margins_of_sampled_and_adversarial_points(name, method, norm, eps, natural_mlp,
                                                                     test_split):
    model = random_cnn() if name == "random-cnn" else natural_mlp
    x, y = test_split.x[:24], test_split.y[:24]
    chain = trace(model, (1, 8, 8))
    spec = margin_spec(y, 10, dtype=torch.float64)
    inputs = InputSet(x.double(), eps, norm, torch.tensor(0.0, dtype=torch.float64),
                      torch.tensor(1.0, dtype=torch.float64))
    lower = spec_lower(chain, inputs, spec, method)
    upper = -spec_lower(chain, inputs, -spec, method)
    points = ball_points(x.double(), eps, norm, 300, torch.Generator().manual_seed(0))
    adversarial = APGD(eps=eps, norm=norm, steps=50, loss="margin")(robustlab.wrap(model), x, y).x_adv.double()
    points = torch.cat([points, adversarial.unsqueeze(0)])
    with torch.no_grad():
        logits = chain.forward(points.reshape(-1, 1, 8, 8)).reshape(len(points), len(x), 10)
    margins = torch.einsum("nsk,pnk->pns", spec, logits)
    assert bool((margins >= lower - 1e-9).all()) and bool((margins <= upper + 1e-9).all())
    assert bool((upper - lower > 1e-6).all())  # a real interval, not a point


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5)])
@pytest.mark.parametrize("name", ["random-cnn", "natural-mlp", "ibp-mlp"])
def test_no_certified_sample_is_broken_by_apgd(name, norm, eps, natural_mlp, ibp_mlp, test_split):
    model = {"random-cnn": random_cnn(), "natural-mlp": natural_mlp, "ibp-mlp": ibp_mlp}[name]
    x, y = test_split.x[:150], test_split.y[:150]
    if name == "random-cnn":  # judged on its own predictions, so that some samples are certifiable
        y = model(x).argmax(1)
        eps /= 5
    mut = robustlab.wrap(model)
    broken = APGD(eps=eps, norm=norm)(mut, x, y).success
    for method in ("ibp", "crown"):
        certified = certify(mut, x, y, eps=eps, norm=norm, method=method).certified
        assert not bool((certified & broken).any())
    assert certified.any() and broken.any()  # neither side is vacuous


def locally_affine(chain, bounds) -> torch.Tensor:
    """Per sample: every ReLU stable and every max-pool window decided (one element's lower bound
    at least every other's upper bound) over the whole input set."""
    ok = torch.ones(len(bounds[0][0]), dtype=torch.bool)
    for op, (lo, hi) in zip(chain.ops, bounds):
        if isinstance(op, ReLU):
            ok &= ((lo >= 0) | (hi <= 0)).flatten(1).all(1)
        elif isinstance(op, MaxPool):
            low, high = op._windows(lo), op._windows(hi)
            best, k = low.max(dim=2, keepdim=True)
            others = high.scatter(2, k, -math.inf).max(dim=2).values
            ok &= (best.squeeze(2) >= others).flatten(1).all(1)
    return ok


@pytest.mark.parametrize("name", ["natural-mlp", "random-cnn"])
def test_crown_is_exact_where_the_network_is_affine(name, natural_mlp, test_split):
    """In a ball where no ReLU changes state and no max-pool window changes its winner, the network
    is affine, so CROWN's bound is the exact minimum: the margin at the box corner chosen by the
    sign of its gradient. IBP is looser."""
    model = copy.deepcopy(natural_mlp if name == "natural-mlp" else random_cnn()).double()
    if name == "natural-mlp":
        x, eps = test_split.x[:30].double(), 2e-4
    else:  # off the digits' blank background, where max-pool windows tie
        x = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.8 + 0.1
        eps = 1e-5
    y = model(x).argmax(1)
    chain = trace(model, (1, 8, 8))
    inputs = InputSet(x, eps, "linf", torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    keep = locally_affine(chain, layer_bounds(chain, inputs, "crown"))
    assert int(keep.sum()) >= 20
    x, y = x[keep], y[keep]
    spec = margin_spec(y, 10, dtype=torch.float64)
    inputs = InputSet(x, eps, "linf", torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    crown, ibp = spec_lower(chain, inputs, spec, "crown"), spec_lower(chain, inputs, spec, "ibp")
    lo, hi = inputs.box()
    exact = torch.empty_like(crown)
    for s in range(spec.shape[1]):
        z = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((model(z) * spec[:, s]).sum(), z)
        corner = torch.where(grad > 0, lo, hi)
        exact[:, s] = (model(corner) * spec[:, s]).sum(1).detach()
    torch.testing.assert_close(crown, exact, rtol=1e-9, atol=1e-9)
    assert bool((crown >= ibp - 1e-12).all()) and float((crown > ibp + 1e-12).double().mean()) > 0.9


# ---------------------------------------------------------------------------- CROWN vs IBP, trained models
def test_crown_is_tighter_than_ibp_on_a_natural_mlp_but_not_on_an_ibp_trained_one(natural_mlp, ibp_mlp, test_split):
    x, y = test_split.x, test_split.y
    for norm, eps in (("linf", 0.01), ("l2", 0.1)):
        ibp = certify(natural_mlp, x, y, eps=eps, norm=norm, method="ibp")
        crown = certify(natural_mlp, x, y, eps=eps, norm=norm, method="crown")
        assert bool((crown.margin_lower >= ibp.margin_lower).all())
        assert crown.certified_accuracy > ibp.certified_accuracy + 0.1
    # Zhang et al. 2020: on IBP-trained networks IBP's bounds can be tighter than CROWN's.
    ibp = certify(ibp_mlp, x, y, eps=0.1, method="ibp")
    crown = certify(ibp_mlp, x, y, eps=0.1, method="crown")
    assert bool((ibp.margin_lower > crown.margin_lower).any())


def test_certified_accuracy_of_an_ibp_trained_mlp_falls_with_eps_below_its_attacked_accuracy(ibp_mlp, test_split):
    x, y = test_split.x, test_split.y
    mut = robustlab.wrap(ibp_mlp)
    grid = (0.0, 0.05, 0.1, 0.15, 0.2)
    previous = None
    curves: dict[str, list[float]] = {"ibp": [], "crown": []}
    for eps in grid:
        robust = ~APGD(eps=eps, norm="linf")(mut, x, y).success if eps else mut(x).argmax(1) == y
        for method in curves:
            outcome = certify(mut, x, y, eps=eps, method=method)
            assert not bool((outcome.certified & ~robust).any())  # the bracket, sample by sample
            curves[method].append(outcome.certified_accuracy)
            if method == "ibp":  # IBP's boxes are nested in eps: so are its certificates
                if previous is not None:
                    assert bool((outcome.certified <= previous).all())
                previous = outcome.certified
    for values in curves.values():
        assert all(a >= b for a, b in zip(values, values[1:])) and values[0] - values[-1] > 0.5
    assert curves["ibp"][2] > 0.5  # IBP training at 0.1 buys certified robustness there


def test_undefended_digits_cnn_is_certified_at_small_eps_and_not_at_0p2():
    model = digits_model()
    data = digits_test(120)
    mut = robustlab.wrap(model)
    assert certify(mut, data.x, data.y, eps=0.2, method="ibp").certified_accuracy == 0.0
    x, y = data.x[:16], data.y[:16]
    assert certify(mut, x, y, eps=0.2, method="crown").certified_accuracy == 0.0
    small = certify(mut, x, y, eps=0.01, method="crown")
    assert small.certified_accuracy >= 0.75
    assert not bool((small.certified & APGD(eps=0.01, norm="linf")(mut, x, y).success).any())


# ---------------------------------------------------------------------------- randomised smoothing
def test_clopper_pearson_lower_bound_matches_the_beta_quantile_and_its_coverage():
    from scipy.stats import beta

    assert clopper_pearson_lower(np.array([0]), 100, 0.001)[0] == 0.0
    assert clopper_pearson_lower(np.array([100]), 100, 0.001)[0] == pytest.approx(0.001 ** (1 / 100), rel=1e-12)
    assert clopper_pearson_lower(np.array([63]), 100, 0.05)[0] == pytest.approx(beta.ppf(0.05, 63, 38), rel=1e-12)
    rng = np.random.default_rng(0)  # coverage: the bound is below p in at least 1 - alpha of the draws
    p, n, alpha = 0.7, 200, 0.05
    covered = clopper_pearson_lower(rng.binomial(n, p, size=4000), n, alpha) <= p
    assert covered.mean() >= 1 - alpha


def smoothing_linear_case(sigma: float):
    """A two-class linear model and points at known distances from its decision boundary."""
    model = seeded_init(lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), 5).eval()
    w = (model[1].weight[1] - model[1].weight[0]).detach().double()
    c = float((model[1].bias[1] - model[1].bias[0]).detach())
    base = torch.rand(40, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 0.4 + 0.3
    distance = torch.cat([torch.zeros(6), torch.linspace(0.1, 3.0, 34)]).double() * sigma
    side = torch.where(torch.arange(40) % 2 == 0, 1.0, -1.0).double()
    unit = w / w.norm()
    on_plane = base - ((base @ w + c) / w.norm()).unsqueeze(1) * unit
    x = (on_plane + (side * distance).unsqueeze(1) * unit).float().reshape(40, 1, 8, 8)
    y = (side > 0).long()
    return model, x, y, distance


def test_smoothing_radius_of_a_linear_model_approaches_the_distance_to_its_boundary():
    sigma = 0.5
    model, x, y, distance = smoothing_linear_case(sigma)
    mut = robustlab.wrap(model, bounds=(-5.0, 5.0))
    outcome = certify(mut, x, y, eps=0.0, norm="l2", method="smoothing", sigma=sigma)
    assert bool((outcome.radius <= distance + 1e-4).all())  # sound (each with probability 1 - alpha)
    # sigma * Phi^-1(p_A) is the distance; with n = 10,000 draws, a count 4 standard deviations low
    # still certifies at least this much:
    from scipy.stats import norm as gaussian
    n = 10_000
    p = gaussian.cdf(distance.numpy() / sigma)
    low_count = np.floor(n * p - 4 * np.sqrt(n * p * (1 - p)))
    floor = torch.from_numpy(np.maximum(sigma * gaussian.ppf(clopper_pearson_lower(low_count, n, 0.001)), 0))
    far = distance >= 0.5 * sigma
    assert bool((outcome.radius[far] >= floor[far]).all())
    assert bool((outcome.radius[far] >= 0.8 * distance[far].clamp_max(2.5 * sigma)).all())
    assert bool((outcome.prediction[far] == y[far]).all())
    assert bool(((outcome.prediction == y) | outcome.abstained).all())
    # on the boundary p_A is 1/2: every one abstains, and abstentions are reported as such
    assert bool(outcome.abstained[:6].all()) and not bool(outcome.abstained[far].any())
    assert bool((outcome.prediction[:6] == -1).all()) and bool((outcome.radius[:6] == 0).all())
    assert outcome.abstention_rate == pytest.approx(6 / 40)
    assert not bool(outcome.certified[:6].any())
    assert torch.equal(outcome.certified_at(1.0), (outcome.prediction == y) & (outcome.radius > 1.0))
    predicted = predict_smoothed(mut, x, torch.arange(40), sigma=sigma, n=2000, alpha=0.001)
    assert bool((predicted.prediction[:6] == -1).all())
    assert bool((predicted.prediction[distance > sigma] == y[distance > sigma]).all())


def test_smoothing_does_not_depend_on_batch_size_or_batch_composition():
    sigma = 0.5
    model, x, y, _ = smoothing_linear_case(sigma)
    mut = robustlab.wrap(model, bounds=(-5.0, 5.0))
    options = dict(eps=0.2, norm="l2", method="smoothing", sigma=sigma, n=1000, seed=3)
    a = certify(mut, x, y, batch_size=64, **options)
    b = certify(mut, x, y, batch_size=1000, **options)
    part = certify(mut, x[10:25], y[10:25], sample_ids=torch.arange(10, 25), batch_size=333, **options)
    assert torch.equal(a.radius, b.radius) and torch.equal(a.prediction, b.prediction)
    assert torch.equal(a.radius[10:25], part.radius) and torch.equal(a.certified[10:25], part.certified)
    other_seed = certify(mut, x, y, **dict(options, seed=4))
    assert not torch.equal(a.radius, other_seed.radius)


def noise_trained_mlp(train, sigma: float) -> nn.Module:
    """Gaussian data augmentation at sigma, as Cohen et al. train their base classifiers."""
    model = seeded_init(mlp, 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(25):
        order = torch.randperm(len(train.x), generator=generator)
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            noisy = train.x[idx] + sigma * torch.randn(train.x[idx].shape, generator=generator)
            optimiser.zero_grad()
            F.cross_entropy(model(noisy), train.y[idx]).backward()
            optimiser.step()
    return model.eval()


def test_smoothing_on_digits_reproduces_the_certified_accuracy_curves(train, test_split):
    x, y = test_split.x[:80], test_split.y[:80]
    radii = (0.0, 0.25, 0.5, 0.75, 1.0)
    curves, outcomes = {}, {}
    for sigma in (0.25, 0.5):
        mut = robustlab.wrap(noise_trained_mlp(train, sigma))
        outcome = certify(mut, x, y, norm="l2", method="smoothing", sigma=sigma, n=2000)
        outcomes[sigma] = outcome
        curves[sigma] = [float(outcome.certified_at(r).double().mean()) for r in radii]
        assert all(a >= b for a, b in zip(curves[sigma], curves[sigma][1:]))
        assert curves[sigma][0] > curves[sigma][2] + 0.3  # falls with the radius
        assert torch.equal(outcome.abstained, outcome.prediction == -1)
        assert bool((outcome.radius[outcome.abstained] == 0).all())
        assert not bool(outcome.certified[outcome.abstained].any())
    assert curves[0.25][0] > curves[0.5][0] + 0.05  # larger sigma: lower clean accuracy ...
    # ... and a longer tail: at n = 2000 no radius exceeds 2.70 sigma (p_A's bound is at most alpha^(1/n))
    assert curves[0.25][3] == 0.0 < curves[0.5][3]
    assert float(outcomes[0.25].radius.max()) <= 2.71 * 0.25 < float(outcomes[0.5].radius.max())
    assert int(outcomes[0.5].abstained.sum()) > int(outcomes[0.25].abstained.sum()) > 0  # more noise, more abstentions


def test_smoothed_classifier_is_a_differentiable_noisy_model_the_wrapper_accepts():
    sigma = 0.5
    model, x, y, _ = smoothing_linear_case(sigma)
    smoothed = SmoothedClassifier(model, sigma, draws=16, seed=0)
    z = x.clone().requires_grad_(True)
    out = smoothed(z)
    torch.testing.assert_close(torch.logsumexp(out, 1), torch.zeros(len(x)), atol=1e-5, rtol=0)  # log-probabilities
    (grad,) = torch.autograd.grad(out.gather(1, y.unsqueeze(1)).sum(), z)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    assert not torch.equal(smoothed(x), smoothed(x))  # fresh noise each call (EoT attacks average over it)
    with pytest.warns(UserWarning, match="not deterministic"):
        inspection = robustlab.wrap(smoothed, bounds=(-5.0, 5.0)).inspect(x)
    assert inspection.output_kind == "log_probs"
    mut = robustlab.wrap(model, bounds=(-5.0, 5.0))
    direct = certify(mut, x, y, method="smoothing", sigma=sigma, n=500)
    via = SmoothedClassifier(mut, sigma).certify(x, y, n=500)
    assert torch.equal(direct.radius, via.radius)


def test_certify_checks_its_arguments_before_any_work(natural_mlp):
    x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    bad = [dict(method="lp"), dict(norm="l1"), dict(eps=-1.0), dict(eps=2.0), dict(eps=None),
           dict(method="smoothing", sigma=0.0), dict(method="smoothing", sigma=0.5, n=0),
           dict(method="smoothing", sigma=0.5, alpha=1.5)]
    for options in bad:
        with pytest.raises(InputError):
            certify(natural_mlp, x, y, **{"eps": 0.1, **options})
    with pytest.raises(InputError, match="outside the bounds"):
        certify(natural_mlp, x + 2, y, eps=0.1)
    with pytest.raises(InputError, match="already carries"):
        certify(robustlab.wrap(natural_mlp), x, y, eps=0.1, bounds=(0, 1))
