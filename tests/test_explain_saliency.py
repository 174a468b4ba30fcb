"""robustlab.explain saliency: captum attributions, attribution shift, robustness metrics, sanity check.

References are independent of the code under test: completeness is recomputed from fresh forward
passes, rank statistics against scipy, top-k and SSIM against direct numpy formulations, the
shift against real PGD adversarials.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from robustlab.attacks import PGD
from robustlab.errors import InputError
from robustlab.explain.saliency import METHODS, Attribution, attribute, saliency_report
from robustlab.explain.sanity import DOES_NOT_REFLECT, REFLECTS, cascading_randomization
from robustlab.explain.similarity import spearman, ssim, ssim_window, topk_intersection
from robustlab.model import ModelUnderTest
from support import tiny_linear

pytestmark = pytest.mark.usefixtures("one_thread")

IG_COMPLETENESS_TOL = 1e-2  # relative; IG with 50 Gauss-Legendre steps on the digits CNN


@pytest.fixture
def mut(digits_module) -> ModelUnderTest:
    return ModelUnderTest(digits_module, bounds=(0.0, 1.0), name="digits-cnn")


def target_logit(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x).double().gather(1, y.reshape(-1, 1)).reshape(-1)


# ------------------------------------------------------------------------------ completeness
def test_integrated_gradients_completeness_on_digits_cnn(mut, digits_module, digits_correct):
    x, y = digits_correct.x[:100], digits_correct.y[:100]
    result = attribute(mut, x, y)  # default: IG, 50 steps, zero baseline (the box's lower corner)
    assert isinstance(result, Attribution) and result.method == "integrated_gradients"
    assert result.maps.shape == x.shape and result.maps.dtype == torch.float32
    # independent check: sum of attributions vs F_y(x) - F_y(0), from the raw module
    gap = target_logit(digits_module, x, y) - target_logit(digits_module, torch.zeros_like(x), y)
    relative = (result.maps.double().sum(dim=(1, 2, 3)) - gap).abs() / gap.abs()
    assert float(relative.max()) < IG_COMPLETENESS_TOL, float(relative.max())
    assert torch.allclose(result.completeness_error, relative, rtol=1e-3, atol=1e-6)
    # captum's own convergence delta agrees with the measured gap
    assert torch.allclose(result.delta.double().abs(), relative * gap.abs(), atol=1e-3)
    assert result.flagged is None


def test_deeplift_through_maxpool_is_flagged_but_not_through_avgpool(mut, digits_module, digits_correct):
    x, y = digits_correct.x[:64], digits_correct.y[:64]
    maxpool = attribute(mut, x, y, method="deeplift")
    gap = target_logit(digits_module, x, y) - target_logit(digits_module, torch.zeros_like(x), y)
    measured = (maxpool.maps.double().sum(dim=(1, 2, 3)) - gap).abs() / gap.abs()
    assert float((measured > 1e-2).double().mean()) > 0.5  # completeness demonstrably fails
    assert maxpool.flagged is not None and "deeplift" in maxpool.flagged and "completeness" in maxpool.flagged
    # the same trained weights with AvgPool instead of MaxPool: DeepLift's rules are exact
    avg = copy.deepcopy(digits_module)
    avg.features[4] = nn.AvgPool2d(2)
    exact = attribute(ModelUnderTest(avg.eval(), bounds=(0.0, 1.0)), x, y, method="deeplift")
    assert float(exact.completeness_error.max()) < 1e-4
    assert exact.flagged is None
    # DeepLift's hooks are gone afterwards
    assert all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
               for m in digits_module.modules())


def test_integrated_gradients_with_too_few_steps_is_flagged(mut, digits_correct):
    x, y = digits_correct.x[:32], digits_correct.y[:32]
    coarse = attribute(mut, x, y, n_steps=2, integration="riemann_trapezoid")
    assert coarse.flagged is not None and "n_steps" in coarse.flagged
    assert float(coarse.completeness_error.median()) > 1e-2


def test_normalisation_stays_inside_the_model(digits_module, digits_correct):
    """Attributions through ModelUnderTest(mean, std) equal those of a module that normalises itself."""
    x, y = digits_correct.x[:16], digits_correct.y[:16]

    class Normalised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = digits_module

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.inner((z - 0.3) / 0.2)

    wrapped = ModelUnderTest(digits_module, bounds=(0.0, 1.0), mean=0.3, std=0.2)
    inline = ModelUnderTest(Normalised().eval(), bounds=(0.0, 1.0))
    for method in ("integrated_gradients", "saliency", "occlusion", "deeplift"):
        a = attribute(wrapped, x, y, method=method).maps
        b = attribute(inline, x, y, method=method).maps
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), method


def test_every_method_runs_and_is_batch_size_invariant_where_deterministic(mut, digits_correct):
    x, y = digits_correct.x[:24], digits_correct.y[:24]
    with torch.no_grad():
        # occlusion maps are differences of logits, so they carry the logits' rounding, which depends on the
        # batch a forward pass runs in (by CPU: 1e-6 of the largest logit on some)
        rounding = 1e-6 * max(1.0, float(mut(x).abs().max()))
    for method in METHODS:
        whole = attribute(mut, x, y, method=method)
        assert whole.maps.shape == x.shape and bool(torch.isfinite(whole.maps).all()), method
        assert float(whole.maps.abs().sum()) > 0, method
        assert (whole.delta is not None) == (method in ("integrated_gradients", "deeplift", "gradient_shap"))
        assert (whole.completeness_error is not None) == (method in ("integrated_gradients", "deeplift"))
        if method not in ("smoothgrad", "gradient_shap"):
            parts = attribute(mut, x, y, method=method, batch_size=5)
            assert torch.allclose(whole.maps, parts.maps, rtol=1e-4, atol=rounding), method


# ------------------------------------------------------------------------------ attribution shift
def test_zero_perturbation_gives_no_shift(mut, digits_correct):
    x, y = digits_correct.x[:40], digits_correct.y[:40]
    with torch.no_grad():
        pred = mut(x).argmax(1)
    report = saliency_report(mut, x, y, {"none|0": (x.clone(), pred)}, robustness_metrics=False)
    rows = report.per_sample[report.per_sample["key"] == "none|0"]
    assert len(rows) == 40
    assert np.all(rows["spearman"].to_numpy() == pytest.approx(1.0, abs=1e-12))
    assert np.all(rows["topk_intersection"].to_numpy() == 1.0)
    assert not rows["fooled"].any()
    clean = report.per_sample[report.per_sample["key"] == "clean"]
    assert clean["spearman"].isna().all() and clean["topk_intersection"].isna().all()
    assert set(report.maps) == {"clean", "none|0"} and report.maps["clean"].shape == (8, 1, 8, 8)
    assert report.maps["clean"].dtype == np.float32


def test_shift_grows_with_eps_under_pgd(mut, digits_correct):
    x, y = digits_correct.x[:100], digits_correct.y[:100]
    adversarial = {}
    for eps in (0.0, 0.05, 0.1, 0.2):
        outcome = PGD(eps=eps)(mut, x, y)
        adversarial[f"pgd|{eps}"] = (outcome.x_adv, outcome.adv_pred)
    report = saliency_report(mut, x, y, adversarial, robustness_metrics=False)
    summary = report.summary.set_index("key")
    medians = [summary.loc[f"pgd|{eps}", "spearman_median"] for eps in (0.0, 0.05, 0.1, 0.2)]
    topk = [summary.loc[f"pgd|{eps}", "topk_mean"] for eps in (0.0, 0.05, 0.1, 0.2)]
    assert medians[0] == pytest.approx(1.0) and topk[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(medians, medians[1:])), medians
    assert topk[-1] < topk[1] < 1.0, topk
    assert summary.loc["pgd|0.2", "fooled_share"] > summary.loc["pgd|0.05", "fooled_share"]
    # the per-sample frame is tidy: one row per (sample, key), pred = the attack's adversarial prediction
    frame = report.per_sample
    assert len(frame) == 5 * 100 and not frame.duplicated(["sample", "key"]).any()
    rows = frame[frame["key"] == "pgd|0.2"]
    assert np.array_equal(rows["pred"].to_numpy(), adversarial["pgd|0.2"][1].numpy())
    assert {"spearman", "topk_intersection", "ig_delta", "completeness_error", "sensitivity_max",
            "infidelity"} <= set(frame.columns)
    assert report.flags == [] and summary["flagged"].isna().all()


def test_robustness_metrics_are_zero_for_gradients_of_a_linear_model(digits_correct):
    """Saliency (signed) of a linear model is its constant weight row: the explanation never moves
    (sensitivity 0) and predicts every output change exactly (infidelity 0)."""
    x, y = digits_correct.x[:20], digits_correct.y[:20]
    linear = ModelUnderTest(tiny_linear(), bounds=(0.0, 1.0))
    report = saliency_report(linear, x, y, {}, method="saliency", abs=False)
    clean = report.per_sample
    assert np.allclose(clean["sensitivity_max"], 0.0, atol=1e-12)
    assert np.allclose(clean["infidelity"], 0.0, atol=1e-6)
    with torch.no_grad():
        pred = linear(x).argmax(1)
    ig = saliency_report(linear, x, y, {"same": (x.clone(), pred)}, robustness_on="all").per_sample
    clean, same = ig[ig["key"] == "clean"], ig[ig["key"] == "same"]
    assert (clean["sensitivity_max"] > 1e-3).all() and (clean["infidelity"] > 0).all()  # IG maps x * w move with x
    for column in ("sensitivity_max", "infidelity"):  # same inputs, same per-sample perturbations
        assert np.allclose(clean[column].to_numpy(), same[column].to_numpy(), rtol=1e-6), column
    default = saliency_report(linear, x, y, {"same": (x.clone(), pred)}).per_sample  # robustness on clean only
    assert default.loc[default["key"] == "same", "sensitivity_max"].isna().all()


def test_seeded_methods_and_metrics_are_reproducible(mut, digits_correct):
    x, y = digits_correct.x[:16], digits_correct.y[:16]
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    for method in ("smoothgrad", "gradient_shap"):
        a = attribute(mut, x, y, method=method, seed=3).maps
        b = attribute(mut, x, y, method=method, seed=3).maps
        c = attribute(mut, x, y, method=method, seed=4).maps
        assert torch.equal(a, b), method
        assert not torch.equal(a, c), method
    # captum draws from the global RNGs: ours are seeded forks, the caller's states are untouched
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    first = saliency_report(mut, x, y, {}, seed=1, n_sensitivity=3).per_sample
    again = saliency_report(mut, x, y, {}, seed=1, n_sensitivity=3).per_sample
    batched = saliency_report(mut, x, y, {}, seed=1, n_sensitivity=3, batch_size=5).per_sample
    other = saliency_report(mut, x, y, {}, seed=2, n_sensitivity=3).per_sample
    for column in ("sensitivity_max", "infidelity"):
        assert np.array_equal(first[column], again[column]), column
        assert np.allclose(first[column], batched[column], rtol=1e-4), column  # perturbations seeded per sample
        assert not np.allclose(first[column], other[column]), column
        assert np.isfinite(first[column]).all()


# ------------------------------------------------------------------------------ similarity measures
def _random_maps(rng: np.random.Generator, n: int = 12, features: int = 40, ties: bool = True) -> np.ndarray:
    values = rng.normal(size=(n, features))
    return np.round(values, 0) if ties else values  # rounding makes many ties


def test_spearman_matches_scipy_including_ties():
    rng = np.random.default_rng(0)
    for ties in (False, True):
        a, b = _random_maps(rng, ties=ties), _random_maps(rng, ties=ties)
        b[0] = a[0] * 2 + 1  # a monotone transform: exactly 1
        ours = spearman(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        reference = np.array([stats.spearmanr(a[i], b[i]).statistic for i in range(len(a))])
        assert np.allclose(ours, reference, atol=1e-12)
        assert ours[0] == pytest.approx(1.0)
    # restricted to a per-sample mask: scipy on the selected features only
    a, b = _random_maps(rng), _random_maps(rng)
    mask = rng.random(a.shape) < 0.5
    ours = spearman(torch.from_numpy(a), torch.from_numpy(b), mask=torch.from_numpy(mask)).numpy()
    reference = np.array([stats.spearmanr(a[i][mask[i]], b[i][mask[i]]).statistic for i in range(len(a))])
    assert np.allclose(ours, reference, atol=1e-12)
    # a constant map has no rank correlation (as scipy: NaN)
    constant = spearman(torch.zeros(1, 5), torch.arange(5.0).reshape(1, 5))
    assert math.isnan(float(constant[0]))


def test_topk_intersection_matches_a_set_reference():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(10, 64))
    b[:3] = a[:3] * -3.0  # same |ranking|
    for k in (0.1, 5, 1.0):
        count = max(1, round(k * 64)) if isinstance(k, float) else k
        ours = topk_intersection(torch.from_numpy(a), torch.from_numpy(b), k).numpy()
        reference = [len(set(np.argsort(-np.abs(a[i]))[:count]) & set(np.argsort(-np.abs(b[i]))[:count])) / count
                     for i in range(10)]
        assert np.allclose(ours, reference)
        assert np.all(ours[:3] == 1.0)
    assert np.all(topk_intersection(torch.from_numpy(a), torch.from_numpy(b), 1.0).numpy() == 1.0)


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Direct loop over window positions of the documented formula (absolute, max-scaled maps)."""
    a, b = np.abs(a), np.abs(b)
    a = a / a.max() if a.max() > 0 else a
    b = b / b.max() if b.max() > 0 else b
    size, sigma = ssim_window(*a.shape)
    coords = np.arange(size) - (size - 1) / 2
    g = np.exp(-coords ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for i in range(a.shape[0] - size + 1):
        for j in range(a.shape[1] - size + 1):
            pa, pb = a[i:i + size, j:j + size], b[i:i + size, j:j + size]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_matches_the_documented_formula_and_its_properties():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 2, 12, 12)), rng.normal(size=(4, 2, 12, 12))
    ours = ssim(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    reference = [_ssim_reference(a[i].mean(axis=0), b[i].mean(axis=0)) for i in range(4)]
    assert np.allclose(ours, reference, atol=1e-10)
    small = rng.normal(size=(3, 8, 8))
    assert np.allclose(ssim(torch.from_numpy(small), torch.from_numpy(small * 5)).numpy(), 1.0)  # scale-free
    noisy = small + 0.1 * rng.normal(size=small.shape)
    close = ssim(torch.from_numpy(small), torch.from_numpy(noisy)).numpy()
    far = ssim(torch.from_numpy(small), torch.from_numpy(rng.normal(size=small.shape))).numpy()
    assert np.all(close > far) and np.all(close < 1.0)
    assert np.allclose(ssim(torch.from_numpy(a), torch.from_numpy(b)), ssim(torch.from_numpy(b), torch.from_numpy(a)))


# ------------------------------------------------------------------------------ sanity check
def _input_itself(model, x, target):
    return x.clone()


def _edges(model, x, target):
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).reshape(1, 1, 3, 3)
    return nn.functional.conv2d(x, kernel, padding=1)


def test_cascading_randomization_separates_model_dependent_methods(mut, digits_module, digits_correct):
    x, y = digits_correct.x[:32], digits_correct.y[:32]
    before = {k: v.clone() for k, v in digits_module.state_dict().items()}
    frame = cascading_randomization(mut, x, y, methods=("integrated_gradients", "saliency", _input_itself, _edges),
                                    seed=0, threshold=0.5)
    verdicts = frame.attrs["verdicts"]
    assert verdicts["integrated_gradients"] == REFLECTS and verdicts["saliency"] == REFLECTS
    assert verdicts["_input_itself"] == DOES_NOT_REFLECT and verdicts["_edges"] == DOES_NOT_REFLECT
    layers = frame.attrs["layers"]
    assert layers == ["classifier.3", "classifier.1", "features.2", "features.0"]  # logits first
    final = frame[frame["step"] == len(layers)].set_index("method")
    start = frame[frame["step"] == 0].set_index("method")
    for method in ("integrated_gradients", "saliency"):
        assert start.loc[method, "spearman_median"] == pytest.approx(1.0)
        assert final.loc[method, "spearman_median"] < 0.45, final.loc[method]
        assert final.loc[method, "ssim_median"] < 0.5
    assert final.loc["_edges", "spearman_median"] == pytest.approx(1.0)
    assert len(frame) == 4 * (len(layers) + 1)
    # the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in digits_module.state_dict().items())


def test_informative_region_keeps_the_background_from_hiding_the_change(mut, digits_correct):
    """IG maps are zero wherever a digit's pixel is zero, for every model: over all pixels they look
    alike after randomisation; on the informative region they do not."""
    x, y = digits_correct.x[:24], digits_correct.y[:24]
    on_region = cascading_randomization(mut, x, y, methods=("integrated_gradients",), region="input")
    on_all = cascading_randomization(mut, x, y, methods=("integrated_gradients",), region="all")
    last = len(on_region.attrs["layers"])
    rho_region = float(on_region.loc[on_region["step"] == last, "spearman_median"].iloc[0])
    rho_all = float(on_all.loc[on_all["step"] == last, "spearman_median"].iloc[0])
    assert rho_all > 0.8 and rho_region < 0.5, (rho_all, rho_region)
    assert on_all.attrs["verdicts"]["integrated_gradients"] == DOES_NOT_REFLECT
    assert on_region.attrs["verdicts"]["integrated_gradients"] == REFLECTS


def test_cascading_randomization_is_seeded(mut, digits_correct):
    x, y = digits_correct.x[:8], digits_correct.y[:8]
    a = cascading_randomization(mut, x, y, methods=("saliency", "smoothgrad"), seed=5)
    b = cascading_randomization(mut, x, y, methods=("saliency", "smoothgrad"), seed=5)
    c = cascading_randomization(mut, x, y, methods=("saliency", "smoothgrad"), seed=6)
    assert a.equals(b)
    assert not np.allclose(a["spearman_median"], c["spearman_median"])


# ------------------------------------------------------------------------------ bad input
def test_bad_input_is_refused_before_work(mut, digits_correct):
    x, y = digits_correct.x[:6], digits_correct.y[:6]
    pred = y.clone()

    def refused(argument: str, fn, *args, **kwargs) -> InputError:
        with pytest.raises(InputError) as info:
            fn(*args, **kwargs)
        assert info.value.argument == argument, (argument, str(info.value))
        return info.value

    refused("method", attribute, mut, x, y, method="gradcam")
    refused("n_stpes", attribute, mut, x, y, n_stpes=10)
    refused("n_steps", attribute, mut, x, y, n_steps=0)
    nan = x.clone()
    nan[2, 0, 3, 3] = float("nan")
    assert "NaN" in str(refused("x", attribute, mut, nan, y))
    refused("x", attribute, mut, x * 3, y)  # outside the bounds
    refused("target", attribute, mut, x, torch.full((6,), 10))
    refused("target", attribute, mut, x, y[:5])
    refused("model", attribute, mut.module, x, y)
    refused("seed", attribute, mut, x, y, seed=-1)
    error = refused("adversarial['pgd|0.1']", saliency_report, mut, x, y, {"pgd|0.1": (x[:5], pred[:5])})
    assert "same samples" in str(error)
    refused("adversarial['pgd|0.1']", saliency_report, mut, x, y, {"pgd|0.1": (nan, pred)})
    refused("adversarial['pgd|0.1'] adv_pred", saliency_report, mut, x, y, {"pgd|0.1": (x, pred[:3])})
    refused("adversarial", saliency_report, mut, x, y, {"clean": (x, pred)})
    refused("top_k", saliency_report, mut, x, y, {}, top_k=1.5)
    refused("top_k", saliency_report, mut, x, y, {}, top_k=0)
    refused("robustness_on", saliency_report, mut, x, y, {}, robustness_on="everything")
    refused("methods", cascading_randomization, mut, x, y, methods=("saliency", "lime"))
    refused("threshold", cascading_randomization, mut, x, y, threshold=1.5)
    refused("region", cascading_randomization, mut, x, y, region="background")
    refused("b", spearman, torch.zeros(2, 4), torch.zeros(2, 5))
    refused("k", topk_intersection, torch.zeros(2, 4), torch.zeros(2, 4), 9)
