"""Threat-model geometry, written once for every norm: random start, steepest step, projection.

Attacks work in the user's input space, inside a box (`Bounds`, scalar or per feature). A `Norm`
knows how to measure a perturbation, draw a random point in its ball, turn a gradient into the
steepest-ascent direction and project back into the ball. `contain` is the final, exact step
every attack output passes through: after it, the float64 distance between the returned input
and the clean one is within eps and every value is inside the bounds, so verification can use a
1e-6 relative tolerance even where float32 rounding would otherwise overshoot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from robustlab import seeding
from robustlab.errors import InputError, VerificationError

BALL_TOLERANCE = 1e-6  # relative; DESIGN/issue contract


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def expand_per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor so it broadcasts against a (B, ...) tensor."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class Bounds:
    """The input box. `low`/`high` are floats, or tensors shaped like one input (per feature)."""

    low: float | torch.Tensor = 0.0
    high: float | torch.Tensor = 1.0

    def __post_init__(self) -> None:
        low, high = torch.as_tensor(self.low, dtype=torch.float64), torch.as_tensor(self.high, dtype=torch.float64)
        if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
            raise InputError("bounds", f"must be finite numbers, got {self.low!r}, {self.high!r}")
        if (low >= high).any():
            raise InputError("bounds", f"low must be below high everywhere, got low={self.low!r}, high={self.high!r}")

    @property
    def is_scalar(self) -> bool:
        return not isinstance(self.low, torch.Tensor) and not isinstance(self.high, torch.Tensor)

    def tensors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high) on like's device and dtype, broadcastable against a batch like `like`."""
        def one(v: float | torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(v, dtype=like.dtype, device=like.device)
        return one(self.low), one(self.high)

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.tensors(x)
        return torch.minimum(torch.maximum(x, low), high)

    def width(self) -> float:
        """Largest per-feature width of the box (high - low)."""
        return float((torch.as_tensor(self.high, dtype=torch.float64) - torch.as_tensor(self.low, dtype=torch.float64)).max())

    def diameter_l2(self, input_shape: Sequence[int]) -> float:
        """L2 length of the box's diagonal: no L2 perturbation inside the box is longer."""
        width = torch.as_tensor(self.high, dtype=torch.float64) - torch.as_tensor(self.low, dtype=torch.float64)
        return float(torch.broadcast_to(width, tuple(input_shape)).square().sum().sqrt())

    def describe(self) -> str:
        if self.is_scalar:
            return f"[{float(self.low):g}, {float(self.high):g}]"
        return "per-feature bounds"

    def to_json(self) -> dict:
        def one(v: float | torch.Tensor) -> float | list:
            return v.tolist() if isinstance(v, torch.Tensor) else float(v)
        return {"low": one(self.low), "high": one(self.high)}


class Norm:
    """Geometry of one Lp ball. Subclasses: `Linf`, `L2`."""

    name: str = ""

    def measure(self, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def steepest(self, grad: torch.Tensor) -> torch.Tensor:
        """Unit-norm direction of steepest ascent for this norm."""
        raise NotImplementedError

    def project(self, delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Project delta into the ball of radius eps (a (B,) tensor)."""
        raise NotImplementedError

    def ascend(self, x: torch.Tensor, x_adv: torch.Tensor, grad: torch.Tensor, alpha: float, eps: torch.Tensor,
               low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """One projected steepest-ascent step: clip(x + project(x_adv + alpha * steepest(grad) - x)).

        The PGD step, written once for the audit's attacks and for adversarial training.
        """
        stepped = x_adv + alpha * self.steepest(grad)
        return torch.minimum(torch.maximum(x + self.project(stepped - x, eps), low), high)

    def random_start(self, eps: torch.Tensor, sample_ids: torch.Tensor, shape: tuple[int, ...],
                     *, seed: int, stream: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A point drawn uniformly from the ball, fixed per (seed, stream, sample).

        Computed in float64 and cast to `dtype` at the end, so it is finite in float16; rounding
        can still leave it up to one ulp outside the ball: callers project (then clip) it.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class Linf(Norm):
    name = "linf"

    def measure(self, delta: torch.Tensor) -> torch.Tensor:
        return flat(delta).abs().amax(dim=1)

    def steepest(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.sign()

    def project(self, delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        e = expand_per_sample(eps, delta)
        return torch.maximum(torch.minimum(delta, e), -e)

    def random_start(self, eps, sample_ids, shape, *, seed, stream, device, dtype):
        u = seeding.uniform(seed, stream, sample_ids, shape, device=device, dtype=torch.float64)
        return ((2.0 * u - 1.0) * expand_per_sample(eps.to(device=u.device, dtype=torch.float64), u)).to(dtype)


class L2(Norm):
    name = "l2"

    def measure(self, delta: torch.Tensor) -> torch.Tensor:
        return flat(delta).norm(dim=1)

    def steepest(self, grad: torch.Tensor) -> torch.Tensor:
        n = flat(grad).norm(dim=1).clamp_min(1e-12)
        return grad / expand_per_sample(n, grad)

    def project(self, delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        n = flat(delta).norm(dim=1)
        factor = torch.where(n > eps, eps / n.clamp_min(1e-30), torch.ones_like(n))
        return delta * expand_per_sample(factor, delta)

    def random_start(self, eps, sample_ids, shape, *, seed, stream, device, dtype):
        # Uniform in the L2 ball: a Gaussian direction times eps * U^(1/d).
        g = seeding.normal(seed, stream, sample_ids, shape, device=device, dtype=torch.float64)
        direction = g / expand_per_sample(flat(g).norm(dim=1).clamp_min(1e-12), g)
        d = math.prod(shape)
        u = seeding.uniform(seed, stream + 7_919, sample_ids, (1,), device=device, dtype=torch.float64).reshape(-1)
        radius = eps.to(device=u.device, dtype=torch.float64) * u.pow(1.0 / d)
        return (direction * expand_per_sample(radius, g)).to(dtype)


NORMS: dict[str, Norm] = {"linf": Linf(), "l2": L2()}

LOW_PRECISION = (torch.float16, torch.bfloat16)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype attacks keep their iterates in: the model's, but at least float32.

    A float16 / bfloat16 iterate rounds every step to a coarse grid (bfloat16 has 8 significant
    bits: near 1 its spacing is 2**-8, a third of PGD's default step at eps 0.1), so steps are
    distorted or lost; attacks step in float32 and cast to the model's dtype only for the forward
    pass (then `contain` the point they evaluate).
    """
    return torch.float32 if dtype in LOW_PRECISION else dtype


def get_norm(name: str | Norm) -> Norm:
    if isinstance(name, Norm):
        return name
    key = str(name).lower().replace("_", "").replace("-", "")
    key = {"inf": "linf", "linfinity": "linf", "2": "l2"}.get(key, key)
    if key not in NORMS:
        raise InputError("norm", f"unknown norm {name!r}; expected one of: linf, l2")
    return NORMS[key]


def contain(x: torch.Tensor, x_adv: torch.Tensor, eps: torch.Tensor | None, norm: Norm,
            bounds: Bounds, *, sync: bool = True) -> torch.Tensor:
    """Return x_adv moved (by at most float rounding) so it is exactly inside bounds and ball.

    Exactness is judged in float64 on the float values that will be returned. With sync (once
    per attack output) the L2 case stops as soon as every row fits, at the cost of a host sync
    per attempt; sync=False runs every attempt on the rows that still need it, with no host
    sync, for attacks that contain their iterates inside the loop. Both return the same values.
    """
    out = bounds.clip(x_adv)
    if eps is None:
        return out
    eps64 = eps.to(device=x.device, dtype=torch.float64)
    if isinstance(norm, Linf):
        # Clamp exactly in float64, round to the working dtype, then take one ulp toward x
        # wherever rounding stepped outside: the result is inside [x - eps, x + eps] exactly.
        e = expand_per_sample(eps64, x)
        x64 = x.double()
        clamped = torch.minimum(torch.maximum(out.double(), x64 - e), x64 + e).to(x.dtype)
        diff = clamped.double() - x64
        outside = (diff > e) | (diff < -e)
        return torch.where(outside, torch.nextafter(clamped, x), clamped)
    sync = sync or x.device.type == "cpu"  # a host sync costs nothing on the CPU: stop early there
    for attempt in range(8):
        n = norm.measure(out.double() - x.double())
        too_long = n > eps64
        if sync and not bool(too_long.any()):
            return out
        margin = 1e-7 * (10.0 ** attempt)
        shrink = torch.where(too_long, eps64 / n.clamp_min(1e-300) * (1.0 - margin), torch.ones_like(n))
        delta = (out.double() - x.double()) * expand_per_sample(shrink, x)
        out = torch.where(expand_per_sample(too_long, x), bounds.clip((x.double() + delta).to(x.dtype)), out)
    n = norm.measure(out.double() - x.double())
    out = torch.where(expand_per_sample(n > eps64, x), x, out)  # give up on that sample: clean input
    return out


def check_contained(x: torch.Tensor, x_adv: torch.Tensor, eps: torch.Tensor | None, norm: Norm,
                    bounds: Bounds, *, attack: str) -> None:
    """Raise VerificationError if any output leaves its ball (1e-6 relative) or the bounds."""
    if not torch.isfinite(x_adv).all():
        raise VerificationError(f"{attack}: returned non-finite adversarial inputs")
    low, high = bounds.tensors(x_adv)
    outside = flat((x_adv < low) | (x_adv > high)).any(dim=1)
    if bool(outside.any()):
        idx = torch.nonzero(outside).reshape(-1)[:5].tolist()
        raise VerificationError(f"{attack}: adversarial inputs outside the bounds {bounds.describe()} (batch rows {idx})")
    if eps is None:
        return
    size = norm.measure(x_adv.double() - x.double())
    limit = eps.to(device=size.device, dtype=torch.float64) * (1.0 + BALL_TOLERANCE)
    bad = size > limit
    if bool(bad.any()):
        i = int(torch.nonzero(bad).reshape(-1)[0])
        raise VerificationError(
            f"{attack}: perturbation of batch row {i} has {norm.name} norm {float(size[i]):.9g} "
            f"> eps {float(eps[i]):.9g} (+{BALL_TOLERANCE:g} relative)")
