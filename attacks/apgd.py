"""APGD (Auto-PGD, Croce and Hein, ICML 2020, Algorithm 1): PGD without a step size to tune.

    x_0 = clip(x + eps * random direction)                         (random start on the ball)
    x_1 = P(x_0 + eta * steepest(grad f(x_0)))                      eta = 2 eps
    for k = 1 .. steps - 1:
        z     = P(x_k + eta * steepest(grad f(x_k)))
        x_k+1 = P(x_k + a (z - x_k) + (1 - a)(x_k - x_k-1))       momentum a = 0.75
        at each checkpoint w_j (the first after 22% of the steps, then every
        max(previous gap - 3%, 6%) of the steps): halve eta, and restart from the best point
        so far, for every sample whose objective rose in at most rho = 75% of the steps since
        the last checkpoint, or whose step size was not halved last time and whose best
        objective has not improved since.

P is the projection onto the eps ball followed by clipping to the box. Success is judged as
misclassification (untargeted) or hitting the target (targeted), on the same forward pass the
gradient comes from. A fooled sample leaves the run with the iterate that fooled it (on an
accelerator, where leaving costs a host sync, at the next checkpoint with its latest fooling
iterate): the rest of its trajectory cannot change the result, and the others' do not depend on it.

Two members of the standard cascade (robustlab.attacks.cascade) are built on it:
- `APGD` ("apgd-ce"): the cross-entropy loss (or "dlr", "margin"), untargeted or toward given targets;
- `APGDT` ("apgd-t"): the targeted DLR loss toward each of the `n_targets` most likely wrong
  classes in turn, judged untargeted (any misclassification counts), as in AutoAttack. All targets
  of a sample run in one batch where memory allows, not in a Python loop over targets; with
  targets given (a targeted audit) it ascends the targeted DLR toward those targets.

Differences from the reference code (fra31/auto-attack, autopgd_base.py), all deliberate:
- randomness is per sample (robustlab.seeding keyed by seed, restart, target rank and sample id),
  so results do not depend on batch size or order;
- fooled samples leave the batch (the reference runs all of them for every iteration): on the
  undefended digits CNN at Linf eps 0.2 APGD-CE took 2.9 s for 300 samples, now a fraction;
- on accelerators the loop syncs with the host only at checkpoints; restarts and target groups
  run only on the samples still not fooled (one sync between them, as the reference);
- the oscillation count of the first checkpoint compares the first step with the starting point
  (the reference compares it with a zero-filled row);
- iterates of float16 / bfloat16 models are kept in float32 and cast for each forward pass, so a
  step smaller than one half-precision ulp still moves the iterate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from robustlab import seeding
from robustlab.batching import default_batch_size
from robustlab.errors import InputError
from robustlab.threat import expand_per_sample, flat

from .base import Attack, Perturbed
from .gradient import expected_loss_and_gradient
from .losses import LOSSES, succeeded

APGD_STREAM = 9_000_000  # + 64 * restart + target rank; see robustlab.seeding
RHO = 0.75
MOMENTUM = 0.75
INITIAL_STEP = 2.0  # eta_0 = 2 eps (Linf and L2)
SYNC_FREE_DEVICES = ("cpu",)  # a host sync per iteration costs nothing here: fooled samples leave at once


def checkpoint_schedule(steps: int) -> tuple[int, int, int]:
    """(first checkpoint gap, decrease of the gap, smallest gap), in iterations, as published."""
    return max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)


@dataclass(frozen=True)
class APGD(Attack):
    name: ClassVar[str] = "apgd-ce"

    steps: int = 100
    restarts: int = 1
    loss: str = "ce"
    rho: float = RHO
    eot_samples: int = 1  # EoT: gradient = mean over this many passes (randomised models)

    def validate(self) -> None:
        for field in ("steps", "restarts", "eot_samples"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(field, f"must be a positive integer, got {value!r}")
        if self.loss not in LOSSES:
            raise InputError("loss", f"expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not 0 < self.rho < 1:
            raise InputError("rho", f"must be in (0, 1), got {self.rho!r}")
        if self.geometry.name not in ("linf", "l2"):
            raise InputError("norm", f"{self.name} supports linf and l2, got {self.norm!r}")

    def _perturb(self, model, x, y, targets, sample_ids, eps, seed) -> Perturbed:
        best, found = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
        calls = 0
        for restart in range(self.restarts):
            idx = torch.arange(len(x), device=x.device) if restart == 0 else torch.nonzero(~found).reshape(-1)
            if idx.numel() == 0:
                break
            tb = None if targets is None else targets[idx]
            adv, hit, evaluations = run_apgd(self, model, x[idx], y[idx], tb, tb, sample_ids[idx], eps, seed,
                                             stream=APGD_STREAM + 64 * restart)
            best[idx] = torch.where(expand_per_sample(hit, adv), adv.to(best.dtype), best[idx])
            found[idx] = found[idx] | hit
            calls += evaluations
        return Perturbed(best, gradient_calls=calls)


@dataclass(frozen=True)
class APGDT(APGD):
    """Targeted-DLR APGD over the most likely wrong classes, judged as an untargeted attack."""

    name: ClassVar[str] = "apgd-t"

    loss: str = "dlr"
    n_targets: int = 9  # the 2nd .. (n_targets+1)-th most likely classes; fewer when there are fewer

    def validate(self) -> None:
        super().validate()
        if isinstance(self.n_targets, bool) or not isinstance(self.n_targets, int) or self.n_targets < 1:
            raise InputError("n_targets", f"must be a positive integer, got {self.n_targets!r}")

    def _perturb(self, model, x, y, targets, sample_ids, eps, seed) -> Perturbed:
        if targets is not None:  # a targeted audit: the given target only, judged targeted
            return super()._perturb(model, x, y, targets, sample_ids, eps, seed)
        with torch.no_grad():
            logits = model(x)
        k = min(self.n_targets, logits.shape[1] - 1)
        ranked = logits.argsort(dim=1, descending=True)
        # The most likely classes other than the label (the reference takes ranks 2..k+1 of the
        # clean logits, which equals this for correctly classified samples).
        others = ranked[ranked != y.unsqueeze(1)].reshape(len(x), -1)[:, :k]
        best, found = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
        calls = len(x)
        for restart in range(self.restarts):
            for ranks in target_groups(k, len(x), default_batch_size(x.device, x[0].numel())):
                idx = torch.nonzero(~found).reshape(-1)
                if idx.numel() == 0:
                    break
                n = len(idx)
                rows = idx.repeat(len(ranks))  # rank-major: rows [r * n + i] attack sample idx[i]
                aims = torch.cat([others[idx, r] for r in ranks])
                eps_n = torch.full((n,), float(eps), dtype=torch.float64, device=x.device)
                start = torch.cat([_start(self.geometry.name, eps_n, sample_ids[idx], tuple(x.shape[1:]), seed,
                                          APGD_STREAM + 64 * restart + 1 + r, _working(x).dtype) for r in ranks])
                adv, hit, evaluations = run_apgd(self, model, x[rows], y[rows], aims, None, sample_ids[rows], eps,
                                                 seed, stream=0, start=start)
                hits = hit.reshape(len(ranks), n)
                first_hit = hits.float().argmax(dim=0)  # the most likely target that worked
                chosen = adv.reshape(len(ranks), n, *x.shape[1:])[first_hit, torch.arange(n, device=x.device)]
                any_hit = hits.any(dim=0)
                best[idx] = torch.where(expand_per_sample(any_hit, chosen), chosen.to(best.dtype), best[idx])
                found[idx] = found[idx] | any_hit
                calls += evaluations
        return Perturbed(best, gradient_calls=calls)


def target_groups(k: int, n: int, rows: int) -> list[list[int]]:
    """Target ranks attacked together: the most likely wrong class first, on its own (it fools most
    of the samples that fall at all), then the others in as few batches as `rows` allows, each on
    the samples still not fooled."""
    rest = list(range(1, k))
    size = max(1, rows // max(1, n))
    return [[0]] + [rest[i:i + size] for i in range(0, len(rest), size)]


def _working(x: torch.Tensor) -> torch.Tensor:
    """Iterates in at least float32: half-precision steps would round away."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _start(norm: str, eps_t: torch.Tensor, ids: torch.Tensor, shape: tuple[int, ...], seed: int, stream: int,
           dtype: torch.dtype) -> torch.Tensor:
    """The reference's random start: a random direction scaled to the ball's radius (Linf: max |.| = eps)."""
    if norm == "linf":
        t = 2.0 * seeding.uniform(seed, stream, ids, shape, device=ids.device, dtype=torch.float64) - 1.0
        scale = flat(t).abs().amax(dim=1)
    else:
        t = seeding.normal(seed, stream, ids, shape, device=ids.device, dtype=torch.float64)
        scale = flat(t).norm(dim=1)
    return (t / expand_per_sample(scale.clamp_min(1e-12), t) * expand_per_sample(eps_t.double(), t)).to(dtype)


def run_apgd(attack: APGD, model, x: torch.Tensor, y: torch.Tensor, aims: torch.Tensor | None,
             judged: torch.Tensor | None, ids: torch.Tensor, eps: float, seed: int, *, stream: int,
             start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One APGD run on a batch: (first fooling iterate, else the best-objective point; fooled mask;
    gradient evaluations spent, summed over samples).

    aims: the targets the objective ascends toward (None: untargeted objective); judged: the
    targets success is judged against (None: misclassification). APGD-T ascends toward aims and
    is judged untargeted; everything else has aims == judged. start: the random start's
    perturbation, when the caller draws it (APGD-T: one stream per target rank).

    A fooled sample leaves the batch (see _Active): its trajectory no longer matters, and each
    sample's iterates depend only on itself, so the others' are unchanged.
    """
    norm = attack.geometry.name
    xw = _working(x)
    low, high = (b.to(xw.dtype) for b in model.bounds.tensors(xw))
    eps_t = torch.full((len(x),), float(eps), dtype=xw.dtype, device=x.device)

    def project(s: "_Active", v: torch.Tensor) -> torch.Tensor:
        if norm == "linf":
            e = expand_per_sample(s.eps, s.x)
            return torch.minimum(torch.maximum(torch.minimum(torch.maximum(v, s.x - e), s.x + e), low), high)
        delta = v - s.x
        length = flat(delta).norm(dim=1)
        factor = torch.where(length > s.eps, s.eps / length.clamp_min(1e-12), torch.ones_like(length))
        return torch.minimum(torch.maximum(s.x + delta * expand_per_sample(factor, delta), low), high)

    def steepest(g: torch.Tensor) -> torch.Tensor:
        if norm == "linf":
            return g.sign()
        return g / expand_per_sample(flat(g).norm(dim=1).clamp_min(1e-12), g)

    def evaluate(s: "_Active", point: torch.Tensor):
        logits, value, grad = expected_loss_and_gradient(model, point, s.y, s.aims, attack.loss, attack.eot_samples)
        return value.to(xw.dtype), grad.to(xw.dtype), succeeded(logits, s.y, s.judged)

    steps = attack.steps
    gap, decrease, smallest = checkpoint_schedule(steps)
    if start is None:
        start = _start(norm, eps_t, ids, tuple(x.shape[1:]), seed, stream, xw.dtype)
    result = xw.clone()
    found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    s = _Active(rows=torch.arange(len(x), device=x.device), x=xw, y=y, aims=aims, judged=judged, eps=eps_t)
    s.x_adv = project(s, xw + start)
    value, s.grad, hit = evaluate(s, s.x_adv)
    evaluations = s.size * attack.eot_samples
    s.best_value, s.x_best, s.grad_best = value.clone(), s.x_adv.clone(), s.grad.clone()
    s.step = torch.full((len(x),), INITIAL_STEP * float(eps), dtype=xw.dtype, device=x.device)
    s.previous_value = value
    s.increases = torch.zeros(len(x), dtype=xw.dtype, device=x.device)
    s.best_at_last_check = s.best_value.clone()
    s.reduced_last_check = torch.ones(len(x), dtype=torch.bool, device=x.device)
    s.x_old = s.x_adv
    s = _retire(s, hit, s.x_adv, result, found)
    prune_every_step = x.device.type in SYNC_FREE_DEVICES  # elsewhere fooled samples leave at checkpoints
    since_check = 0
    for i in attack.progress(range(steps)):
        if s.size == 0:
            break
        z = project(s, s.x_adv + expand_per_sample(s.step, s.x) * steepest(s.grad))
        a = 1.0 if i == 0 else MOMENTUM
        x_new = project(s, s.x_adv + a * (z - s.x_adv) + (1.0 - a) * (s.x_adv - s.x_old))
        s.x_old, s.x_adv = s.x_adv, x_new
        value, s.grad, hit = evaluate(s, s.x_adv)
        evaluations += s.size * attack.eot_samples
        point = s.x_adv  # where `hit` was judged (the checkpoint below may move x_adv)
        s.increases = s.increases + (value > s.previous_value).to(xw.dtype)
        s.previous_value = value
        improved = value > s.best_value
        s.x_best = torch.where(expand_per_sample(improved, s.x), s.x_adv, s.x_best)
        s.grad_best = torch.where(expand_per_sample(improved, s.x), s.grad, s.grad_best)
        s.best_value = torch.where(improved, value, s.best_value)
        since_check += 1
        checkpoint = since_check == gap
        if checkpoint:
            oscillating = s.increases <= gap * attack.rho
            stalled = ~s.reduced_last_check & (s.best_at_last_check >= s.best_value)
            reduce = oscillating | stalled
            s.reduced_last_check = reduce
            s.best_at_last_check = s.best_value.clone()
            s.step = torch.where(reduce, s.step / 2.0, s.step)
            s.x_adv = torch.where(expand_per_sample(reduce, s.x), s.x_best, s.x_adv)
            s.grad = torch.where(expand_per_sample(reduce, s.x), s.grad_best, s.grad)
            gap = max(gap - decrease, smallest)
            since_check = 0
            s.increases = torch.zeros_like(s.increases)
        if prune_every_step or checkpoint or i == steps - 1:
            s = _retire(s, hit, point, result, found)
        else:  # no host sync: remember the successes until the next checkpoint
            s.pending_x = point if s.pending_x is None else torch.where(expand_per_sample(hit, s.x), point, s.pending_x)
            s.pending = hit if s.pending is None else (s.pending | hit)
    result[s.rows] = s.x_best  # never fooled: the best-objective point
    return result, found, evaluations


@dataclass
class _Active:
    """The samples of an APGD run still not fooled, and their state (rows: their places in the batch)."""

    rows: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    aims: torch.Tensor | None
    judged: torch.Tensor | None
    eps: torch.Tensor
    x_adv: torch.Tensor = torch.empty(0)
    x_old: torch.Tensor = torch.empty(0)
    grad: torch.Tensor = torch.empty(0)
    x_best: torch.Tensor = torch.empty(0)
    grad_best: torch.Tensor = torch.empty(0)
    best_value: torch.Tensor = torch.empty(0)
    previous_value: torch.Tensor = torch.empty(0)
    increases: torch.Tensor = torch.empty(0)
    best_at_last_check: torch.Tensor = torch.empty(0)
    reduced_last_check: torch.Tensor = torch.empty(0)
    step: torch.Tensor = torch.empty(0)
    pending: torch.Tensor | None = None  # successes since the last retirement, and where they happened
    pending_x: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.rows)


def _retire(s: _Active, hit: torch.Tensor, point: torch.Tensor, result: torch.Tensor, found: torch.Tensor) -> _Active:
    """Move the samples fooled (hit at point, or pending) into (result, found); return the others' state.

    A sample's fooling point is the iterate where it was fooled; between retirements (accelerators
    only retire at checkpoints) the latest fooling iterate is kept in pending_x.
    """
    fooled = hit if s.pending is None else (s.pending | hit)
    if s.pending_x is not None:
        point = torch.where(expand_per_sample(hit, s.x), point, s.pending_x)
    if not bool(fooled.any()):
        s.pending, s.pending_x = None, None
        return s
    done = torch.nonzero(fooled).reshape(-1)
    result[s.rows[done]] = point[done]
    found[s.rows[done]] = True
    keep = torch.nonzero(~fooled).reshape(-1)
    fields: dict[str, Any] = {}
    for name in ("rows", "x", "y", "aims", "judged", "eps", "x_adv", "x_old", "grad", "x_best",
                 "grad_best", "best_value", "previous_value", "increases", "best_at_last_check",
                 "reduced_last_check", "step"):
        value = getattr(s, name)
        fields[name] = None if value is None else value[keep]
    return _Active(**fields)
