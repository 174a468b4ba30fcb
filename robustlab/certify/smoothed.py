"""The smoothed classifier audited as a model of its own: attacked rows beside its certificate.

Randomised smoothing certifies the smoothed classifier g, not the base model, so its certified
accuracy is a lower bound of g's robust accuracy only. The matching upper bound comes from attacks
on g's prediction: EoT-PGD on the soft smoothed classifier (Salman et al. 2019), whose forward is
the log of the mean softmax of the base over `SMOOTHED_DRAWS` Gaussian draws (SmoothedClassifier),
each PGD step averaging `EOT_SAMPLES` such forwards, and each outcome verified by the expected
prediction over EOT_VERIFY_DRAWS fresh forwards (robustlab.attacks.base.finalize).

The audit names the smoothed model `smoothed_name(model, sigma)` ("mlp+smoothing0.25"). Its clean
prediction is Cohen et al.'s PREDICT (n draws, alpha): a sample it abstains on is not correctly
classified, so abstentions count as not robust in every row, attacked or certified.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from robustlab.attacks.pgd import PGD
from robustlab.model import ModelUnderTest

from .smoothing import SmoothedClassifier, predict_smoothed

SMOOTHED_DRAWS = 8  # m: noise draws in one forward of the soft smoothed classifier
EOT_SAMPLES = 4     # forwards averaged per PGD step (m * EOT_SAMPLES draws per gradient)


@dataclass(frozen=True)
class EoTPGD(PGD):
    """PGD with EoT over the smoothed classifier's noise: the attack on the smoothed prediction."""

    name: ClassVar[str] = "eot-pgd"

    eot_samples: int = EOT_SAMPLES


def smoothed_name(model: str, sigma: float) -> str:
    """The smoothed classifier's model name in results: 'mlp+smoothing0.25'."""
    return f"{model}+smoothing{sigma:g}"


def smoothed_model(base: ModelUnderTest, sigma: float, *, seed: int = 0,
                   draws: int = SMOOTHED_DRAWS) -> ModelUnderTest:
    """The soft smoothed classifier of `base` as a ModelUnderTest (same bounds, classes and device;
    the base's normalisation applies inside), inspected; `smoothing_of` keeps the base for PREDICT
    and CERTIFY. Its forward pass is random on purpose: the warning saying so is not repeated."""
    module = SmoothedClassifier(base, sigma, draws=draws, seed=seed)
    mut = ModelUnderTest(module, name=smoothed_name(base.name, sigma), bounds=base.bounds, classes=base.classes,
                         output="log_probs", device=base.device,
                         source=f"randomised smoothing of {base.name} (sigma={sigma:g}, {draws} draws per forward)")
    mut.smoothing_of = base  # type: ignore[attr-defined]
    mut.smoothing_sigma = float(sigma)  # type: ignore[attr-defined]
    return mut


def inspect_quietly(mut: ModelUnderTest, x: torch.Tensor) -> None:
    """inspect() without its 'forward pass is not deterministic' warning: a smoothed classifier is random."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not deterministic.*")
        mut.inspect(x)


def base_of(mut: ModelUnderTest) -> ModelUnderTest | None:
    """The base model of a smoothed classifier built by `smoothed_model`, else None."""
    return getattr(mut, "smoothing_of", None)


def smoothed_prediction(mut: ModelUnderTest, x: torch.Tensor, sample_ids: torch.Tensor, *, n: int = 10_000,
                        alpha: float = 0.001, seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """PREDICT (Cohen et al. 2019) of a smoothed model's base: the class per sample, -1 where it abstains."""
    base = base_of(mut)
    if base is None:
        raise ValueError(f"{mut.name!r} is not a smoothed classifier built by smoothed_model")
    sigma = float(getattr(mut, "smoothing_sigma"))
    if not math.isfinite(sigma):
        raise ValueError(f"{mut.name!r} has no noise level")
    with torch.no_grad(), base.evaluating():
        result = predict_smoothed(base, base.to_device(x), sample_ids.to(base.device), sigma=sigma, n=n,
                                  alpha=alpha, seed=seed, batch_size=batch_size)
    return result.prediction


def broken_certified(outcome, blocks) -> int:
    """How many samples a smoothing certificate certifies that a verified attack broke (blocks: the
    harness's per-(attack, eps) results at eps or smaller, each with `attacked` and `robust` of shape
    (sets, n)). Not an error as for IBP/CROWN: the certificate holds with probability 1 - alpha, for
    the hard smoothed classifier, and the attacks verify the soft one."""
    certified = outcome.certified.cpu().bool()
    broken = torch.zeros_like(certified)
    for block in blocks:
        broken |= (block.attacked & ~block.robust).any(dim=0).cpu() & certified
    return int(broken.sum())
