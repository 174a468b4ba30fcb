"""certify(model, x, y, eps=..., norm=..., method=...): per-sample certificates, checked at the boundary.

An attack can only show that a sample is not robust; a certificate shows that it is. The two meet
in the audit as a bracket [certified accuracy, attacked robust accuracy], so a certificate must
be sound before it is anything else: bounds run in float64, the traced layers are checked against
the model's own outputs before any bound is trusted, a margin bound must clear the model's own
float rounding, and a certified sample the model itself misclassifies stops the run (it would be
a bug in the bounds).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robustlab.attacks.base import check_eps_fits, validate_batch
from robustlab.errors import InputError, VerificationError
from robustlab.model import ModelUnderTest
from robustlab.threat import get_norm

from .bounds import InputSet, margin_spec, spec_lower
from .graph import Chain, UnsupportedLayerError, chain_for
from .smoothing import ABSTAIN, certify_smoothed

METHODS = ("ibp", "crown", "smoothing")
CHUNK = 256  # samples bounded together


def _half(mut: ModelUnderTest) -> bool:
    return mut.amp or mut.dtype in (torch.float16, torch.bfloat16)


def _trace_tolerance(mut: ModelUnderTest) -> float:
    """How far, relative to the largest logit, the model's outputs may be from the chain's."""
    return 1e-2 if _half(mut) else 1e-4


def _rounding(mut: ModelUnderTest) -> float:
    """The margin, relative to the largest logit, a certificate must clear: the bounds are exact
    for the network in float64, the model computes in its own dtype, and an attack on it must
    never break a certified sample by float rounding."""
    return 1e-2 if _half(mut) else 1e-5 if mut.dtype == torch.float32 else 1e-12


@dataclass
class CertifyOutcome:
    """Per-sample certificates for one threat model; tensors on the CPU.

    certified: robust at eps. IBP/CROWN: proven (every input in the eps ball, inside the bounds
        for Linf, is classified y, with a margin bound above the model's float rounding: 1e-5 of
        its largest logit in float32). Smoothing: the smoothed classifier returns y with radius > eps,
        which holds with probability at least 1 - alpha over the noise draws.
    prediction: IBP/CROWN: the model's clean prediction. Smoothing: CERTIFY's class, or -1 where
        it abstained.
    abstained: smoothing's abstentions (p_A's lower bound not above 1/2); all False otherwise.
    labels: the y certified against.
    radius: smoothing only: certified L2 radius (0 where abstained), also for a wrong class.
    margin_lower: IBP/CROWN only: min over j != y of the lower bound of logit[y] - logit[j].
    """

    method: str
    norm: str
    eps: float
    certified: torch.Tensor
    prediction: torch.Tensor
    abstained: torch.Tensor
    labels: torch.Tensor
    sample_ids: torch.Tensor
    seconds: float
    radius: torch.Tensor | None = None
    margin_lower: torch.Tensor | None = None
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.certified.numel())

    @property
    def certified_accuracy(self) -> float:
        return float(self.certified.double().mean()) if self.n else float("nan")

    @property
    def abstention_rate(self) -> float:
        return float(self.abstained.double().mean()) if self.n else float("nan")

    @property
    def seconds_per_sample(self) -> float:
        return self.seconds / max(1, self.n)

    def certified_at(self, eps: float) -> torch.Tensor:
        """Smoothing: which samples are certified at another eps, from the same radii (one CERTIFY
        run gives the whole certified-accuracy-vs-radius curve)."""
        if self.radius is None:
            raise InputError("eps", f"{self.method} certificates hold for the eps they were computed at "
                                    f"({self.eps:g}); run certify again for another eps")
        limit = eps if self.norm == "l2" else eps * math.sqrt(float(self.options["input_dims"]))
        return (self.prediction == self.labels) & (self.radius > limit)


def certify(model: ModelUnderTest | nn.Module, x, y, *, eps: float | None = None, norm: str = "linf",
            method: str = "ibp", bounds=None, mean=None, std=None, sigma: float | None = None,
            n0: int = 100, n: int = 10_000, alpha: float = 0.001, seed: int = 0, sample_ids=None,
            batch_size: int | None = None, dtype: torch.dtype = torch.float64) -> CertifyOutcome:
    """Certify each sample (x, y) at eps in the norm ("linf" or "l2").

    method: "ibp" (interval bound propagation), "crown" (linear relaxation, backward bounds) or
        "smoothing" (randomised smoothing with noise sigma: the certificate is for the smoothed
        classifier, an L2 radius; Linf eps is checked through the L2 ball of radius eps*sqrt(d)).
    model: a ModelUnderTest, or an nn.Module wrapped here with bounds/mean/std (mean/std are
        certified as an affine first layer).
    n0, n, alpha, seed, batch_size: smoothing's selection and estimation draws, confidence, noise
        seed (per sample with sample_ids) and noisy inputs per forward pass.
    dtype: the bounds' arithmetic (float64: rounding far below any margin worth certifying).

    Raises InputError on bad arguments and UnsupportedLayerError (an InputError) naming the layer
    IBP/CROWN cannot handle, before any work.
    """
    if method not in METHODS:
        raise InputError("method", f"expected one of {', '.join(METHODS)}, got {method!r}")
    geometry = get_norm(norm)
    if geometry.name not in ("linf", "l2"):
        raise InputError("norm", f"certification supports linf and l2, got {norm!r}")
    mut = _wrapped(model, bounds, mean, std)
    xs, ys, _, ids = validate_batch(mut, x, y, None, sample_ids)
    eps = _checked_eps(eps, method, geometry, mut, xs)
    if method == "smoothing":
        _check_smoothing(sigma, n0, n, alpha)
    elif not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputError("dtype", f"must be a floating torch dtype, got {dtype!r}")
    started = time.perf_counter()
    with torch.no_grad(), mut.evaluating():
        if method == "smoothing":
            assert sigma is not None
            outcome = _smoothing(mut, xs, ys, ids, eps, geometry.name, float(sigma), n0, n, alpha, seed, batch_size)
        else:
            outcome = _bounds(mut, xs, ys, ids, eps, geometry.name, method, dtype)
    outcome.seconds = time.perf_counter() - started
    return outcome


def _wrapped(model, bounds, mean, std) -> ModelUnderTest:
    if isinstance(model, ModelUnderTest):
        given = [name for name, v in (("bounds", bounds), ("mean", mean), ("std", std)) if v is not None]
        if given:
            raise InputError(given[0], "the ModelUnderTest already carries its bounds and normalisation; "
                                       "pass them to robustlab.wrap instead")
        return model
    if not isinstance(model, nn.Module):
        raise InputError("model", "expected a robustlab ModelUnderTest or a torch.nn.Module, "
                                  f"got {type(model).__name__}")
    return ModelUnderTest(model, bounds=bounds, mean=mean, std=std)


def _checked_eps(eps, method: str, geometry, mut: ModelUnderTest, x: torch.Tensor) -> float:
    if eps is None:
        if method != "smoothing":
            raise InputError("eps", f"{method} certifies one budget: give eps")
        return 0.0
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise InputError("eps", f"must be a finite number >= 0, got {eps!r}")
    check_eps_fits(float(eps), geometry, mut, tuple(x.shape[1:]))
    return float(eps)


def _check_smoothing(sigma, n0, n, alpha) -> None:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise InputError("sigma", f"smoothing needs a noise level sigma > 0, got {sigma!r}")
    for name, value in (("n0", n0), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(name, f"must be a positive number of noise draws, got {value!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise InputError("alpha", f"must be in (0, 1), got {alpha!r}")


def _bounds(mut: ModelUnderTest, x, y, ids, eps: float, norm: str, method: str, dtype) -> CertifyOutcome:
    chain = chain_for(mut, dtype=dtype)
    notes = list(chain.notes)
    margins, preds, scales = [], [], []
    for a in range(0, len(x), CHUNK):
        xb, yb = mut.to_device(x[a:a + CHUNK]), y[a:a + CHUNK].to(mut.device)
        logits = mut(xb)
        _check_trace(chain, mut, xb, logits)
        low, high = mut.bounds.tensors(xb.to(dtype))
        inputs = InputSet(xb.to(dtype), eps, norm, low, high)
        margins.append(spec_lower(chain, inputs, margin_spec(yb, chain.num_classes, dtype=dtype), method).min(1).values)
        preds.append(logits.argmax(1))
        scales.append(logits.detach().abs().amax(1).double())
    margin_lower, prediction = torch.cat(margins).cpu(), torch.cat(preds).cpu()
    certified = margin_lower > _rounding(mut) * torch.cat(scales).cpu()
    near = int(((margin_lower > 0) & ~certified).sum())
    if near:
        notes.append(f"{near} samples with a positive margin bound within the model's float rounding "
                     f"({_rounding(mut):g} of its largest logit) not certified")
    wrong = certified & (prediction != y)
    if wrong.any():  # x itself is in the ball: a certified sample must be classified correctly
        i = int(torch.nonzero(wrong)[0])
        raise VerificationError(f"{method} certified sample {int(ids[i])} at {norm} eps {eps:g} (margin lower bound "
                                f"{float(margin_lower[i]):.3g}) but the model misclassifies it: a bug in the bounds")
    return CertifyOutcome(method, norm, eps, certified, prediction, torch.zeros_like(certified), y, ids, 0.0,
                          margin_lower=margin_lower, options={"dtype": str(dtype)}, notes=notes)


def _check_trace(chain: Chain, mut: ModelUnderTest, x: torch.Tensor, logits: torch.Tensor) -> None:
    """The traced layers must compute the model's logits (up to a constant per row: a dropped final
    log_softmax), or the bounds would certify some other function."""
    traced = chain.forward(x.to(chain.dtype))
    centred = [t.double() - t.double().mean(1, keepdim=True) for t in (traced, logits)]
    scale = float(centred[1].abs().max().clamp_min(1e-12))
    gap = float((centred[0] - centred[1]).abs().max())
    if not gap <= _trace_tolerance(mut) * scale:
        raise UnsupportedLayerError("<model>", type(mut.module).__name__,
                                    f"the traced layers do not compute the model's outputs (they differ by {gap:.3g}, "
                                    f"logits up to {scale:.3g}); its forward does something the trace cannot see")


def _smoothing(mut: ModelUnderTest, x, y, ids, eps: float, norm: str, sigma: float, n0: int, n: int, alpha: float,
               seed: int, batch_size: int | None) -> CertifyOutcome:
    result = certify_smoothed(mut, mut.to_device(x), ids.to(mut.device), sigma=sigma, n0=n0, n=n, alpha=alpha,
                              seed=seed, batch_size=batch_size)
    dims = math.prod(x.shape[1:])
    limit = eps if norm == "l2" else eps * math.sqrt(dims)
    certified = (result.prediction == y) & (result.radius > limit)
    notes = [] if norm == "l2" else [f"Linf eps certified through the L2 ball of radius eps * sqrt({dims})"]
    options = {"sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "seed": seed, "input_dims": dims}
    return CertifyOutcome("smoothing", norm, eps, certified, result.prediction, result.prediction == ABSTAIN, y, ids,
                          0.0, radius=result.radius, options=options, notes=notes)
