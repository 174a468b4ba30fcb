"""The attack contract, and the one place where every attack output is checked and packaged.

`Attack.__call__(model, x, y, targets=None)` validates its inputs, runs the attack batch by batch
on the model's device, then, for every batch:
1. `contain`s the output exactly inside the eps ball and the bounds,
2. re-checks containment and raises `VerificationError` on any violation (a bug, never a row),
3. decides success by a fresh forward pass on exactly the tensor it returns; for an attack run
   with EoT (`eot_samples` > 1, a randomised model) by the expected prediction over
   EOT_VERIFY_DRAWS fresh passes (see `finalize`).
Subclasses only implement `_perturb`, which may be as naive as the paper's pseudo-code.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, TypeVar

import numpy as np
import torch

from robustlab import distributed, journal, progress
from robustlab.batching import BatchRunner
from robustlab.errors import InputError
from robustlab.log import get_logger
from robustlab.model import ModelUnderTest
from robustlab.threat import Norm, check_contained, contain, expand_per_sample, get_norm

from .gradient import draw_logits
from .losses import succeeded

# Fresh forward passes that verify an attack run with EoT: one draw of a randomised model says
# little (an iterate at the expected decision boundary fools about half of them).
EOT_VERIFY_DRAWS = 100

T = TypeVar("T")
A = TypeVar("A", bound="Attack")  # replace() keeps the attack's own class
_log = get_logger(__name__)


@dataclass
class Perturbed:
    """What `_perturb` returns for one batch."""

    x_adv: torch.Tensor
    gradient_calls: torch.Tensor | int  # per-sample input-gradient evaluations, summed over the batch


@dataclass
class AttackOutcome:
    """Verified result of one attack on n samples (all tensors on the CPU).

    success: untargeted, the prediction differs from the label; targeted, it equals the target.
    Verified with several draws (EoT attacks), the prediction is the expected one (argmax of the
    mean softmax) and success_probability the fraction of those draws the attack fooled; with
    one pass it is success as 0.0 / 1.0 (None in outcomes assembled elsewhere).
    Norms are those of the returned perturbation x_adv - x, measured in float64.
    """

    attack: str
    norm: str
    eps: float | None
    x_adv: torch.Tensor
    adv_pred: torch.Tensor
    adv_confidence: torch.Tensor
    success: torch.Tensor
    l2: torch.Tensor
    linf: torch.Tensor
    targets: torch.Tensor | None
    gradient_calls: int
    seconds: float
    batch_size: int
    success_probability: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return int(self.success.numel())

    @property
    def success_rate(self) -> float:
        return float(self.success.double().mean()) if self.n else float("nan")

    @property
    def expected_success_rate(self) -> float:
        """Mean per-sample success probability (a randomised model's expected success rate)."""
        if self.success_probability is None:
            return self.success_rate
        return float(self.success_probability.double().mean()) if self.n else float("nan")


@dataclass(frozen=True)
class Attack:
    """Base of all attacks. Configuration lives in dataclass fields; see subclasses."""

    name: ClassVar[str] = "attack"
    minimal: ClassVar[bool] = False  # True: finds the smallest perturbation, needs no eps

    norm: str = "linf"
    eps: float | None = None

    @property
    def label(self) -> str:
        """The attack's name in results rows (subclasses add what tells configurations apart)."""
        return self.name

    def replace(self: A, **changes: Any) -> A:
        return dataclasses.replace(self, **changes)

    def config(self) -> dict:
        return {"attack": self.name, **dataclasses.asdict(self)}

    @property
    def geometry(self) -> Norm:
        return get_norm(self.norm)

    @property
    def verification_draws(self) -> int:
        """Forward passes that verify each output: EOT_VERIFY_DRAWS when run with EoT, else 1."""
        return EOT_VERIFY_DRAWS if getattr(self, "eot_samples", 1) > 1 else 1

    # ---------------------------------------------------------------- contract
    def __call__(
        self,
        model: ModelUnderTest,
        x: torch.Tensor | np.ndarray,
        y: torch.Tensor | np.ndarray,
        targets: torch.Tensor | np.ndarray | None = None,
        *,
        sample_ids: torch.Tensor | np.ndarray | None = None,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> AttackOutcome:
        """Attack the samples (x, y) (toward `targets` if given) and return a verified outcome."""
        x, y, targets, sample_ids, eps = self.prepare(model, x, y, targets, sample_ids)
        with journal.unit(self, model, x, y, targets, sample_ids, seed) as unit:
            if unit.outcome is not None:  # finished before an interruption (robustlab.journal)
                return unit.outcome
            outcome = self._attack_all(model, x, y, targets, sample_ids, eps, seed, batch_size)
            unit.record(outcome)
        return outcome

    def _attack_all(self, model: ModelUnderTest, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None,
                    sample_ids: torch.Tensor, eps: float | None, seed: int, batch_size: int | None) -> AttackOutcome:
        """All samples, in batches; under torch.distributed each rank its block of batches (robustlab.distributed)."""
        runner = BatchRunner(batch_size, model.device, x[0].numel())
        started = time.perf_counter()

        def block(a: int, b: int) -> list[dict]:
            return runner.run(b - a, lambda i, j: self._attack_slice(
                model, x[a + i:a + j], y[a + i:a + j], None if targets is None else targets[a + i:a + j],
                sample_ids[a + i:a + j], eps, seed), desc=self.label)

        with model.evaluating():
            parts = distributed.run_parts(len(x), runner.batch_size, block)
        seconds = time.perf_counter() - started
        outcome = _concat(self.name, self.geometry.name, eps, parts, targets, seconds, runner.batch_size)
        _log.debug("%s eps=%s on %s: %d samples in batches of %d, %d gradient calls, %.2fs", self.label, eps,
                   model.name, len(x), runner.batch_size, outcome.gradient_calls, seconds)
        return outcome

    def progress(self, iterable: Iterable[T], what: str = "steps", unit: str = "step") -> Iterable[T]:
        """An attack's inner loop (`for i in self.progress(range(steps))`): a progress bar of its
        iterations when bars are on (robustlab.progress), the iterable itself when off."""
        return progress.steps(iterable, f"{self.label} {what}", unit=unit)

    def prepare(self, model: ModelUnderTest, x, y, targets,
                sample_ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, float | None]:
        """Every check before work starts: the model, inputs, labels, targets, ids, eps, options.
        Returns (x, y, targets, sample_ids, eps) as the attack will use them."""
        if not isinstance(model, ModelUnderTest):
            raise InputError("model", f"expected a robustlab ModelUnderTest, got {type(model).__name__}; "
                                      "wrap it with robustlab.wrap(module, bounds=...)")
        x, y, targets, sample_ids = validate_batch(model, x, y, targets, sample_ids)
        eps = self._validated_eps(model, x)
        self.validate()
        return x, y, targets, sample_ids, eps

    def validate(self) -> None:
        """Subclasses check their own options here (raise InputError)."""

    def _validated_eps(self, model: ModelUnderTest, x: torch.Tensor) -> float | None:
        norm = self.geometry
        if self.eps is None:
            if self.minimal:
                return None
            raise InputError("eps", f"{self.name} needs an epsilon (the perturbation budget)")
        eps = self.eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise InputError("eps", f"must be a finite number >= 0, got {eps!r}")
        check_eps_fits(eps, norm, model, tuple(x.shape[1:]))
        return float(eps)

    def _attack_slice(self, model, x, y, targets, ids, eps, seed):
        x = model.to_device(x)
        y = y.to(model.device)
        targets = None if targets is None else targets.to(model.device)
        ids = ids.to(model.device)
        eps_t = None if eps is None else torch.full((len(x),), eps, dtype=torch.float64, device=model.device)
        result = self._perturb(model, x, y, targets, ids, eps, seed)
        return finalize(model, x, y, targets, result.x_adv.detach(), eps_t, self.geometry,
                        attack=self.name, gradient_calls=result.gradient_calls, draws=self.verification_draws,
                        sample_ids=ids)

    def _perturb(self, model: ModelUnderTest, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None,
                 sample_ids: torch.Tensor, eps: float | None, seed: int) -> Perturbed:
        raise NotImplementedError


def finalize(model: ModelUnderTest, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None,
             x_adv: torch.Tensor, eps: torch.Tensor | None, norm: Norm, *, attack: str,
             gradient_calls: torch.Tensor | int, draws: int = 1, sample_ids: torch.Tensor | None = None) -> dict:
    """Contain, verify and re-check one batch. Returns CPU tensors for packaging.

    draws > 1 (randomised models): the prediction is the expected one, the argmax of the mean
    softmax over `draws` fresh passes (it decides success, like one pass does for a deterministic
    model), and success_probability the fraction of the draws that were fooled. NaN or infinite
    outputs stop the audit naming the samples (sample_ids), instead of scoring them as class 0.
    """
    x_adv = contain(x, x_adv.to(x.dtype), eps, norm, model.bounds)
    check_contained(x, x_adv, eps, norm, model.bounds, attack=attack)
    logits = draw_logits(model, x_adv, draws)
    model.require_finite(logits, sample_ids=sample_ids, what=f"adversarial inputs of {attack}")
    probs = torch.softmax(logits.double(), dim=2).mean(0)
    confidence, pred = probs.max(dim=1)
    k = len(logits)
    fooled = succeeded(logits.reshape(k * len(x), -1), y.repeat(k), None if targets is None else targets.repeat(k))
    success = fooled if k == 1 else succeeded(probs, y, targets)
    delta = x_adv.double() - x.double()
    return {
        "x_adv": x_adv.cpu(),
        "adv_pred": pred.cpu(),
        "adv_confidence": confidence.cpu(),
        "success": success.cpu(),
        "success_probability": fooled.reshape(k, len(x)).double().mean(0).cpu(),
        "l2": delta.reshape(len(x), -1).norm(dim=1).cpu(),
        "linf": delta.reshape(len(x), -1).abs().amax(dim=1).cpu() if delta.numel() else torch.zeros(len(x)),
        "gradient_calls": int(gradient_calls) if not isinstance(gradient_calls, torch.Tensor) else int(gradient_calls.sum()),
    }


def _concat(attack: str, norm: str, eps: float | None, parts: list[dict], targets, seconds: float,
            batch_size: int, gradient_calls: int | None = None) -> AttackOutcome:
    def cat(key: str) -> torch.Tensor:
        return torch.cat([p[key] for p in parts]) if parts else torch.empty(0)
    return AttackOutcome(
        attack=attack, norm=norm, eps=eps,
        x_adv=cat("x_adv"), adv_pred=cat("adv_pred").long(), adv_confidence=cat("adv_confidence"),
        success=cat("success").bool(), l2=cat("l2"), linf=cat("linf"),
        targets=None if targets is None else targets.cpu(),
        gradient_calls=sum(p["gradient_calls"] for p in parts) if gradient_calls is None else gradient_calls,
        seconds=seconds, batch_size=batch_size,
        success_probability=cat("success_probability").double() if all("success_probability" in p for p in parts) else None)


def restrict(outcome: AttackOutcome, model: ModelUnderTest, x: torch.Tensor, y: torch.Tensor,
             eps: float, norm: str | Norm, *, batch_size: int | None = None) -> AttackOutcome:
    """Evaluate a minimal-perturbation outcome (e.g. CW) under budget eps.

    Each perturbation is projected onto the eps ball (a no-op where it already fits), contained,
    verified and re-checked by a fresh forward pass: a success counts only if the projected input
    still fools the model. Never inflates robustness: it can only find more adversarials than
    discarding the out-of-budget ones.
    """
    geometry = get_norm(norm)

    def projected(xb: torch.Tensor, a: int, b: int, eps_t: torch.Tensor) -> torch.Tensor:
        # Where the perturbation fits it is kept bit for bit (xb + (x_adv - xb) rounds in float16 /
        # bfloat16, which can undo a minimal success); elsewhere projected in float64, then cast.
        adv = model.to_device(outcome.x_adv[a:b])
        delta = adv.double() - xb.double()
        fits = expand_per_sample(geometry.measure(delta) <= eps_t, xb)
        return torch.where(fits, adv, (xb.double() + geometry.project(delta, eps_t)).to(xb.dtype))

    return _recheck(outcome, model, x, y, float(eps), geometry, projected, label=f"{outcome.attack}@{eps:g}",
                    batch_size=batch_size)


def transfer(outcome: AttackOutcome, model: ModelUnderTest, x: torch.Tensor, y: torch.Tensor, *,
             batch_size: int | None = None) -> AttackOutcome:
    """Evaluate adversarial inputs made on another model (a surrogate) on `model` itself.

    Contained, verified and re-checked by a fresh forward pass of `model`; no gradient of `model`
    is ever taken, so it is the way to audit non-differentiable models (a vote ensemble).
    """
    return _recheck(outcome, model, x, y, outcome.eps, get_norm(outcome.norm),
                    lambda xb, a, b, eps_t: model.to_device(outcome.x_adv[a:b]),
                    label=f"{outcome.attack} (transfer)", batch_size=batch_size)


def _recheck(outcome: AttackOutcome, model: ModelUnderTest, x, y, eps: float | None, geometry: Norm, candidates,
             *, label: str, batch_size: int | None) -> AttackOutcome:
    """Run candidate inputs for an earlier outcome's samples through `finalize`, batch by batch."""
    x, y, targets, _ = validate_batch(model, x, y, outcome.targets, None)
    if eps is not None:
        check_eps_fits(eps, geometry, model, tuple(x.shape[1:]))
    runner = BatchRunner(batch_size, model.device, x[0].numel())
    started = time.perf_counter()

    def one(a: int, b: int) -> dict:
        xb = model.to_device(x[a:b])
        eps_t = None if eps is None else torch.full((b - a,), float(eps), dtype=torch.float64, device=model.device)
        tb = None if targets is None else targets[a:b].to(model.device)
        return finalize(model, xb, y[a:b].to(model.device), tb, candidates(xb, a, b, eps_t), eps_t, geometry,
                        attack=label, gradient_calls=0)

    with model.evaluating():
        parts = runner.run(len(x), one)
    return _concat(outcome.attack, geometry.name, eps, parts, outcome.targets,
                   outcome.seconds + time.perf_counter() - started, runner.batch_size,
                   gradient_calls=outcome.gradient_calls)


# ---------------------------------------------------------------------------- validation
def check_eps_fits(eps: float, norm: Norm, model: ModelUnderTest, input_shape: tuple[int, ...]) -> None:
    """Refuse budgets larger than the input box: almost always a units mistake (8 vs 8/255)."""
    if norm.name == "linf":
        limit = model.bounds.width()
        if eps > limit * (1 + 1e-9):
            hint = f"; did you mean {eps:g}/255 = {eps / 255:.4g}?" if eps >= 1 and limit <= 1 else ""
            raise InputError("eps", f"{eps:g} is larger than the input range {limit:g} "
                                    f"(bounds {model.bounds.describe()}){hint}")
    else:
        limit = model.bounds.diameter_l2(input_shape)
        if eps > limit * (1 + 1e-9):
            raise InputError("eps", f"L2 budget {eps:g} exceeds the diagonal of the input box ({limit:.4g}); "
                                    "no perturbation inside the bounds is that large")


def _as_tensor(name: str, value, dtype=None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(np.asarray(value), dtype=dtype)
    except (TypeError, ValueError) as error:
        raise InputError(name, f"cannot be converted to a tensor: {error}") from None


def validate_labels(name: str, labels, n: int, num_classes: int) -> torch.Tensor:
    t = _as_tensor(name, labels)
    if t.is_floating_point():
        if not torch.isfinite(t).all() or (t != t.round()).any():
            raise InputError(name, "must be integer class indices, got non-integer values")
        t = t.long()
    if t.dtype == torch.bool or not (t.dtype.is_floating_point or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise InputError(name, f"must be integer class indices, got dtype {t.dtype}")
    t = t.long().reshape(-1) if t.dim() <= 1 else t
    if t.dim() != 1:
        raise InputError(name, f"must be one class index per sample (shape ({n},)), got shape {tuple(t.shape)}; "
                               "one-hot labels? pass labels.argmax(1)")
    if len(t) != n:
        raise InputError(name, f"has {len(t)} entries but there are {n} inputs")
    if n and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        bad = t[(t < 0) | (t >= num_classes)]
        raise InputError(name, f"values must be in [0, {num_classes - 1}] for a {num_classes}-class model; "
                               f"found {bad[:5].tolist()}")
    return t


CHECK_VALUES = 1 << 22  # input values checked at a time: the masks of a 10,000-image set never exist at once


def _check_values(model: ModelUnderTest, t: torch.Tensor) -> None:
    """No NaN or infinite values, nothing outside the bounds: checked in chunks of rows (bounded memory)."""
    low, high = model.bounds.tensors(t)
    rows_at_once = max(1, CHECK_VALUES // max(1, t[0].numel()))
    bad_rows = torch.zeros(len(t), dtype=torch.bool)
    outside = torch.zeros(len(t), dtype=torch.bool)
    for a in range(0, len(t), rows_at_once):
        chunk = t[a:a + rows_at_once]
        flat = chunk.reshape(len(chunk), -1)
        bad_rows[a:a + len(chunk)] = ~torch.isfinite(flat).all(dim=1).cpu()
        outside[a:a + len(chunk)] = ((chunk < low) | (chunk > high)).reshape(len(chunk), -1).any(dim=1).cpu()
    if bad_rows.any():
        rows = torch.nonzero(bad_rows).reshape(-1)
        raise InputError("x", f"contains NaN or infinite values (in {len(rows)} samples, e.g. index {int(rows[0])})")
    if outside.any():
        rows = torch.nonzero(outside).reshape(-1)
        raise InputError("x", f"{len(rows)} samples lie outside the bounds {model.bounds.describe()} "
                              f"(data range [{float(t.min()):.4g}, {float(t.max()):.4g}], e.g. index {int(rows[0])}); "
                              "set bounds to your input domain, and keep normalisation inside the model (mean/std)")


def validate_inputs(model: ModelUnderTest, x) -> torch.Tensor:
    t = _as_tensor("x", x)
    if not t.is_floating_point():
        raise InputError("x", f"must be floating point inputs in the bounds {model.bounds.describe()}, got dtype {t.dtype}"
                              + ("; scale integer images to the bounds first (e.g. x / 255)" if t.dtype == torch.uint8 else ""))
    if t.dim() < 2:
        raise InputError("x", f"must be a batch (samples first) of at least 2 dimensions, got shape {tuple(t.shape)}")
    if len(t) == 0:
        raise InputError("x", "is empty: no samples to attack")
    _check_values(model, t)
    return t


def validate_batch(model: ModelUnderTest, x, y, targets, sample_ids):
    """Check inputs, labels, targets and ids; inspect the model if not done yet.

    Inputs are converted to the model's dtype here, once: a float32 model can only ever see
    float32 values, so those are the clean inputs that balls, bounds and norms refer to.
    """
    x = validate_inputs(model, x)
    x = validate_inputs(model, x.to(model.dtype)) if x.dtype != model.dtype else x
    if model.inspection is None:
        model.inspect(x)
    elif tuple(x.shape[1:]) != model.inspection.input_shape:
        raise InputError("x", f"inputs have shape {tuple(x.shape[1:])} but the model was inspected with "
                              f"{model.inspection.input_shape}")
    k = model.num_classes
    y = validate_labels("y", y, len(x), k)
    if targets is not None:
        targets = validate_labels("targets", targets, len(x), k)
    if sample_ids is None:
        sample_ids = torch.arange(len(x))
    else:
        sample_ids = _as_tensor("sample_ids", sample_ids).long().reshape(-1)
        if len(sample_ids) != len(x):
            raise InputError("sample_ids", f"has {len(sample_ids)} entries but there are {len(x)} inputs")
    return x, y, targets, sample_ids
