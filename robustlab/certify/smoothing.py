"""Randomised smoothing (Cohen, Rosenfeld and Kolter 2019): PREDICT and CERTIFY, and the smoothed
classifier as a module that attacks can run on.

The smoothed classifier g(x) = argmax_c P(f(x + sigma z) = c), z ~ N(0, I), is robust within
L2 radius sigma * Phi^-1(p_A) around x when class A has probability p_A > 1/2 under the noise.
CERTIFY estimates it as in the paper: n0 draws choose A, n fresh draws give a one-sided
Clopper-Pearson lower bound of p_A at level 1 - alpha, and below 1/2 it abstains. PREDICT returns
the top class when a two-sided binomial test separates it from the runner-up at level alpha.

Noise is drawn per sample from robustlab.seeding in fixed blocks of DRAW_BLOCK draws (one stream
per block), so a sample's noise, hence every count, radius and abstention, depends on the seed
and its sample id only, never on the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn

from robustlab import seeding
from robustlab.batching import default_batch_size
from robustlab.model import ModelUnderTest

DRAW_BLOCK = 100  # draws per noise stream: part of what a seed means, not a batch size
SELECT_STREAM = 0x5E1EC7 << 8  # n0 selection draws; block b uses stream SELECT_STREAM + b
ESTIMATE_STREAM = 0xE5717A << 8  # n estimation draws
PREDICT_STREAM = 0x93ED1C << 8
ABSTAIN = -1


@dataclass
class SmoothingResult:
    """Per-sample CERTIFY (or PREDICT) results, on the CPU."""

    prediction: torch.Tensor  # class, or ABSTAIN (-1)
    radius: torch.Tensor  # float64 certified L2 radius; 0 where abstained
    p_lower: torch.Tensor  # float64 lower confidence bound of p_A (CERTIFY), or p-value (PREDICT)
    counts: torch.Tensor  # (n, classes) int64 counts of the estimation draws

    @property
    def abstained(self) -> torch.Tensor:
        return self.prediction == ABSTAIN


def class_counts(model: ModelUnderTest, x: torch.Tensor, sample_ids: torch.Tensor, *, sigma: float, draws: int,
                 seed: int, stream: int, batch_size: int | None = None) -> torch.Tensor:
    """(N, classes) int64: how often the base classifier predicts each class on x + sigma * noise."""
    n, shape = len(x), tuple(x.shape[1:])
    if model.inspection is None:
        model.inspect(x)
    k = model.num_classes
    counts = torch.zeros(n, k, dtype=torch.int64, device=model.device)
    per_forward = batch_size or default_batch_size(model.device, math.prod(shape))
    samples = max(1, per_forward // DRAW_BLOCK)
    with torch.no_grad():
        for s0 in range(0, n, samples):
            xs, ids = x[s0:s0 + samples], sample_ids[s0:s0 + samples]
            for block in range(math.ceil(draws / DRAW_BLOCK)):
                m = min(DRAW_BLOCK, draws - block * DRAW_BLOCK)
                noise = seeding.normal(seed, stream + block, ids, (m, *shape), device=model.device, dtype=x.dtype)
                noisy = (xs.unsqueeze(1) + sigma * noise).reshape(-1, *shape)
                preds = torch.cat([model(part).argmax(1) for part in noisy.split(per_forward)])
                rows = torch.arange(len(xs), device=model.device).repeat_interleave(m)
                counts[s0:s0 + len(xs)] += torch.bincount(rows * k + preds, minlength=len(xs) * k).reshape(-1, k)
    return counts.cpu()


def clopper_pearson_lower(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) lower confidence bound of a binomial proportion: Beta(alpha; k, n-k+1)."""
    from scipy.stats import beta

    k = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(alpha, k, trials - k + 1)
    return np.where(k > 0, bound, 0.0)


def certify_smoothed(model: ModelUnderTest, x: torch.Tensor, sample_ids: torch.Tensor, *, sigma: float,
                     n0: int = 100, n: int = 10_000, alpha: float = 0.001, seed: int = 0,
                     batch_size: int | None = None) -> SmoothingResult:
    """CERTIFY of Cohen et al. 2019 for every sample: (class or ABSTAIN, L2 radius)."""
    from scipy.stats import norm

    selection = class_counts(model, x, sample_ids, sigma=sigma, draws=n0, seed=seed, stream=SELECT_STREAM,
                             batch_size=batch_size)
    top = selection.argmax(1)  # ties: the lowest class index
    counts = class_counts(model, x, sample_ids, sigma=sigma, draws=n, seed=seed, stream=ESTIMATE_STREAM,
                          batch_size=batch_size)
    p_lower = clopper_pearson_lower(counts.gather(1, top.unsqueeze(1)).squeeze(1).numpy(), n, alpha)
    certified = p_lower > 0.5
    radius = np.where(certified, sigma * norm.ppf(np.where(certified, p_lower, 0.75)), 0.0)
    prediction = torch.where(torch.from_numpy(certified), top, torch.full_like(top, ABSTAIN))
    return SmoothingResult(prediction, torch.from_numpy(radius), torch.from_numpy(p_lower), counts)


def predict_smoothed(model: ModelUnderTest, x: torch.Tensor, sample_ids: torch.Tensor, *, sigma: float,
                     n: int = 10_000, alpha: float = 0.001, seed: int = 0,
                     batch_size: int | None = None) -> SmoothingResult:
    """PREDICT of Cohen et al. 2019: the top class if a two-sided binomial test of the top two
    counts rejects equality at level alpha, else ABSTAIN (wrong with probability at most alpha)."""
    from scipy.stats import binomtest

    counts = class_counts(model, x, sample_ids, sigma=sigma, draws=n, seed=seed, stream=PREDICT_STREAM,
                          batch_size=batch_size)
    top2 = counts.topk(2, dim=1)
    pvalues = torch.tensor([binomtest(int(a), int(a + b), 0.5).pvalue if a + b > 0 else 1.0
                            for a, b in top2.values.tolist()], dtype=torch.float64)
    prediction = torch.where(pvalues <= alpha, top2.indices[:, 0], torch.full((len(x),), ABSTAIN))
    return SmoothingResult(prediction, torch.zeros(len(x), dtype=torch.float64), pvalues, counts)


class SmoothedClassifier(nn.Module):
    """The smoothed classifier as a module: forward(x) is log of the mean softmax of the base over
    `draws` fresh Gaussian draws (the soft smoothed classifier of Salman et al. 2019), random and
    differentiable, so EoT attacks (e.g. PGD with eot_samples) can attack the smoothed prediction.
    Its outputs are log-probabilities. `certify`/`predict` run Cohen et al.'s procedures.

    base: an nn.Module taking inputs in the user's space, or a ModelUnderTest (its normalisation
    applies). seed fixes the forward noise's generator (a fresh draw every call).
    """

    def __init__(self, base: nn.Module | ModelUnderTest, sigma: float, *, draws: int = 1, seed: int = 0) -> None:
        super().__init__()
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive number, got {sigma!r}")
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise ValueError(f"draws must be a positive integer, got {draws!r}")
        self._wrapped = base if isinstance(base, ModelUnderTest) else None
        self.base = base.module if isinstance(base, ModelUnderTest) else base
        self.sigma, self.draws, self.seed = float(sigma), draws, seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self.training = False  # nothing of its own to train; the base keeps its own mode

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return self._wrapped(x) if self._wrapped is not None else self.base(x)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.draws, *x.shape)
        noise = torch.randn(shape, generator=self._generator(x.device), device=x.device, dtype=x.dtype)
        logits = self._base((x.unsqueeze(0) + self.sigma * noise).reshape(-1, *x.shape[1:]))
        logp = torch.log_softmax(logits.reshape(self.draws, len(x), -1), dim=2)
        return torch.logsumexp(logp, dim=0) - math.log(self.draws)

    def certify(self, x, y, **options):
        """certify(self's base, x, y, method="smoothing", sigma=self.sigma, ...): a CertifyOutcome."""
        from .api import certify

        # unwrapped, base is the nn.Module given (only a wrapped one's module may be a plain callable)
        model = self._wrapped if self._wrapped is not None else cast(nn.Module, self.base)
        return certify(model, x, y, method="smoothing", sigma=self.sigma, **options)
