"""Square attack (Andriushchenko, Croce, Flammarion and Hein, ECCV 2020): score-based random search.

Uses only the model's logits (forward passes under torch.no_grad(), never a gradient), so it is the
black-box check on models whose gradients are masked or shattered. Per sample, per restart:

    x_best = clip(x + init)                                   (1 query)
    for i in 1..queries-1, while the sample is not yet fooled:
        s = window side for p_selection(p_init, i, queries)   (fraction p of the features)
        x_new = x_best with one random s x s window re-drawn  (Linf: a +-eps constant per channel;
                                                               L2: the paper's pseudo-Gaussian bumps,
                                                               with the mass of a second window moved in)
        keep x_new if its loss is lower                       (1 query)

Linf is Algorithm 1 of the paper (vertical-stripe init); L2 is Algorithm 3 (grid of pseudo-Gaussian
bumps init), both as in the authors' reference code (max-andr/square-attack, attack.py), including the
piecewise-constant p schedule rescaled from 10000 iterations to `queries` (rescale=True; AutoAttack's
standard Square, `PUBLISHED`, uses the absolute schedule with p_init 0.8 and 5000 queries). Differences,
all deliberate:
- Randomness is per sample, from robustlab.seeding keyed by (seed, restart, iteration, sample id),
  so a sample's result does not depend on its batch mates (the reference draws one window position
  per iteration for the whole batch in L2, and from one global numpy stream in Linf). The draws of
  DRAW_BLOCK iterations are hashed at once.
- A candidate whose loss equals the best one is accepted (the reference: strictly lower). In
  float32 ties are rare and nothing changes; a bfloat16 model's logits are so coarse that most
  candidates tie, and walking across those plateaus lowered Square's robust accuracy on the
  digits CNN from 0.673 to 0.667 (float32: 0.652; 6 seeds, 150 samples, 100 queries).
- Window positions are uniform over every position that fits (the reference's randint excludes the
  last row and column).
- Linf: the reference redraws the window's signs until they change x_best; here a fixed number of
  redraws, then the negated signs (which always change a constant window), all vectorised.
- L2 init: the tiles of side max(H // 5, 1) cover the image centred (the reference starts the grid
  at (H - 5 s) // 2 and lets it run off the image when H is not a multiple of 5); each tile's bump
  is transposed at random per sample and tile (the reference: per tile, the same for the batch).
- Inputs that are not (N, C, H, W): (N, D) is a 1 x D image of one channel, (N, C, L) a 1 x L image
  of C channels, more dims are flattened to (N, C, 1, prod(rest)). Windows on a 1 x W image are
  1 x s segments covering about a fraction p of the features.

Every query is on a contained point (robustlab.threat.contain: exactly inside ball and box, in the
model's dtype), the point finalize returns, so a success in the loop is the verified one; and the
loss is computed on logits widened to float32 for half-precision models (bfloat16 logits are too
coarse to tell most candidates apart, so the random search stalled).

Success is judged by argmax (robustlab.attacks.losses.succeeded); a sample that succeeds is never
queried again. `loss` is the objective minimised (as a negated robustlab objective): "margin"
(the paper's untargeted loss) or "ce" (the paper's targeted loss); default "margin" for both.
Restarts re-run the attack from a fresh init on the samples still not fooled and keep the per-sample
lowest loss. `Perturbed.gradient_calls` holds the number of FORWARD QUERIES (no gradient is ever
taken), summed over the batch; it is what the check "white-box beats black-box" reports as cost.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar, TypedDict

import torch

from robustlab import seeding
from robustlab.errors import InputError
from robustlab.threat import LOW_PRECISION, contain

from .base import Attack, Perturbed
from .losses import LOSSES, objective, succeeded

SQUARE_STREAM = 7_000_000  # robustlab.seeding streams: SQUARE_STREAM + 16 * (restart * (queries + 1) + iteration) + slot
DRAW_BLOCK = 64  # iterations whose step draws are hashed at once (stream: iteration = block index, DRAW_SLOT)
DRAW_SLOT = 15
LINF_SIGN_TRIES = 4  # fresh sign draws for a window that would not change x_best, before negating them
DEFAULT_P_INIT = {"linf": 0.05, "l2": 0.1}  # the paper's standard values


# AutoAttack's Square (fra31/auto-attack, autoattack.py, version "standard"): the published defaults.
# Use them wherever a Square run decides a verdict (robustlab.integrity's black-box probe and adaptive Square).
class SquareSettings(TypedDict):
    """Square's schedule settings (the fields of Square that PUBLISHED fixes)."""

    queries: int
    p_init: float
    rescale: bool


PUBLISHED: SquareSettings = {"queries": 5000, "p_init": 0.8, "rescale": False}


def p_selection(p_init: float, it: int, n_iters: int, rescale: bool = True) -> float:
    """The paper's piecewise-constant schedule of p at iteration it (0-based) of n_iters.

    rescale: stretch the schedule to n_iters as if it were 10000 (max-andr/square-attack); False: the
    absolute schedule of AutoAttack (resc_schedule=False), where p keeps halving at fixed iterations
    and stays at p_init / 512 after iteration 8000.
    """
    if rescale:
        it = int(it / n_iters * 10000)
    for limit, divisor in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
                           (6000, 128), (8000, 256)):
        if it <= limit:
            return p_init / divisor
    return p_init / 512


@dataclass(frozen=True)
class Square(Attack):
    name: ClassVar[str] = "square"

    norm: str = "linf"
    eps: float | None = None
    queries: int = 1000  # max forward queries per sample, per restart (the init counts as one)
    p_init: float | None = None  # fraction of features changed at first; None: 0.05 (linf), 0.1 (l2)
    restarts: int = 1
    loss: str = "margin"
    rescale: bool = True  # p's schedule stretched to `queries` (see p_selection); PUBLISHED: False

    def validate(self) -> None:
        for name in ("queries", "restarts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(name, f"must be a positive integer, got {value!r}")
        if self.p_init is not None and (isinstance(self.p_init, bool) or not isinstance(self.p_init, (int, float))
                                        or not 0 < self.p_init <= 1):
            raise InputError("p_init", f"must be a number in (0, 1], got {self.p_init!r}")
        if not isinstance(self.rescale, bool):
            raise InputError("rescale", f"must be True or False, got {self.rescale!r}")
        if self.loss not in LOSSES:
            raise InputError("loss", f"expected one of {', '.join(LOSSES)}, got {self.loss!r}")

    @property
    def initial_p(self) -> float:
        return float(self.p_init) if self.p_init is not None else DEFAULT_P_INIT[self.geometry.name]

    # ------------------------------------------------------------------ driver
    def _perturb(self, model, x, y, targets, sample_ids, eps, seed) -> Perturbed:
        n = len(x)
        queries = torch.zeros(n, dtype=torch.int64, device=x.device)
        if eps == 0 or n == 0:
            return Perturbed(x.clone(), gradient_calls=queries)
        shape = x.shape
        xc = _canonical(x)
        best = xc.clone()
        best_loss = torch.full((n,), float("inf"), dtype=torch.float64, device=x.device)
        done = torch.zeros(n, dtype=torch.bool, device=x.device)
        low, high = (_canonical_bound(b, shape) for b in model.bounds.tensors(x))
        for restart in range(self.restarts):
            idx = torch.nonzero(~done).reshape(-1)
            if idx.numel() == 0:
                break
            run = _Run(self, model, shape, low, high, eps, seed, restart)
            xb, lb, db, qb = run.attack(xc[idx], y[idx], None if targets is None else targets[idx], sample_ids[idx])
            better = db | (lb < best_loss[idx])
            best[idx] = torch.where(better.reshape(-1, 1, 1, 1), xb, best[idx])
            best_loss[idx] = torch.where(better, lb, best_loss[idx])
            done[idx] = db
            queries[idx] += qb
        return Perturbed(best.reshape(shape), gradient_calls=queries)


class _Run:
    """One restart of the Square attack on a batch in canonical (N, C, H, W) layout."""

    def __init__(self, attack: Square, model, shape, low, high, eps: float, seed: int, restart: int) -> None:
        self.config, self.model, self.shape = attack, model, shape
        self.low, self.high, self.eps, self.seed, self.restart = low, high, eps, seed, restart
        self.linf = attack.geometry.name == "linf"
        self.block, self.table = -1, torch.empty(0)

    def stream(self, iteration: int, slot: int) -> int:
        return SQUARE_STREAM + 16 * (self.restart * (self.config.queries + 1) + iteration) + slot

    def uniform(self, iteration: int, slot: int, ids: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor):
        return seeding.uniform(self.seed, self.stream(iteration, slot), ids, shape, device=like.device,
                               dtype=torch.float64)

    def slots(self, c: int) -> int:
        """Uniform numbers a step uses per sample: Linf a window position (2) and LINF_SIGN_TRIES
        sign draws per channel; L2 two window positions (4), a transpose flag and a sign per channel."""
        return 2 + LINF_SIGN_TRIES * c if self.linf else 5 + c

    def draws(self, it: int, act: torch.Tensor, everyone: bool, ids: torch.Tensor, slots: int) -> torch.Tensor:
        """The step's uniform numbers for the active samples, (len(act), slots).

        Drawn for every sample of the run DRAW_BLOCK iterations at a time (one hash over the block,
        not ~45 small tensor ops per iteration); the numbers of (sample, iteration) are fixed by
        the sample id alone, so the result still does not depend on batch mates. float32 holds
        the 24-bit fractions exactly.
        """
        block, row = divmod(it, DRAW_BLOCK)
        if block != self.block:
            self.block = block
            self.table = seeding.uniform(self.seed, self.stream(block, DRAW_SLOT), ids, (DRAW_BLOCK, slots),
                                         device=ids.device, dtype=torch.float32)
        u = self.table[:, row]
        return u if everyone else u[act]

    def clip(self, v: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(v, self.low.to(v.dtype)), self.high.to(v.dtype))

    def contained(self, x: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        """candidate exactly inside ball and box, as finalize would return it (no host sync)."""
        shape = (-1, *self.shape[1:])
        eps = torch.full((len(x),), float(self.eps), dtype=torch.float64, device=x.device)
        return contain(x.reshape(shape), candidate.reshape(shape), eps, self.config.geometry, self.model.bounds,
                       sync=False).reshape(candidate.shape)

    def loss(self, x: torch.Tensor, y, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to minimise, success) with one forward query per row."""
        with torch.no_grad():
            logits = self.model(x.reshape(-1, *self.shape[1:]))
        wide = logits.float() if logits.dtype in LOW_PRECISION else logits
        value = -objective(self.config.loss, wide, y, targets).double()
        return value, succeeded(logits, y, targets)

    def attack(self, x, y, targets, ids):
        n, c, h, w = x.shape
        best = self.contained(x, self.clip(x + self.init(x, ids)))
        best_loss, done = self.loss(best, y, targets)
        queries = torch.ones(n, dtype=torch.int64, device=x.device)
        if self.linf:  # every Linf candidate pixel is x +- eps, contained: compute both planes once
            self.faces = (self.contained(x, self.clip(x + self.eps)), self.contained(x, self.clip(x - self.eps)))
        total, slots = self.config.queries, self.slots(c)
        for it in self.config.progress(range(1, total), "queries", "query"):
            act = torch.nonzero(~done).reshape(-1)
            if act.numel() == 0:
                break
            p = p_selection(self.config.initial_p, it - 1, total, self.config.rescale)
            everyone = act.numel() == n  # skip the gathers and scatters while no sample is done
            xa, ba = (x, best) if everyone else (x[act], best[act])
            ya = y if everyone else y[act]
            ta = None if targets is None else (targets if everyone else targets[act])
            u = self.draws(it, act, everyone, ids, slots)
            if self.linf:
                candidate = self.linf_step(act, ba, u, p, everyone)
            else:
                candidate = self.contained(xa, self.l2_step(xa, ba, u, p))
            value, hit = self.loss(candidate, ya, ta)
            old_loss = best_loss if everyone else best_loss[act]
            accepted = (value <= old_loss) | hit  # ties accepted (see the module docstring); successes always
            new_best = torch.where(accepted.reshape(-1, 1, 1, 1), candidate, ba)
            new_loss = torch.where(accepted, value, old_loss)
            if everyone:
                best, best_loss, done = new_best, new_loss, hit
            else:
                best[act], best_loss[act], done[act] = new_best, new_loss, hit
            queries[act] += 1
        return best, best_loss, done, queries

    # ------------------------------------------------------------------ initialisation
    def init(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.linf:  # vertical stripes of +-eps: one sign per (channel, column)
            u = self.uniform(0, 0, ids, (c, 1, w), x)
            return torch.where(u < 0.5, -self.eps, self.eps).to(x.dtype)
        tile_h, tile_w = (max(h // 5, 1),) * 2 if h > 1 else (1, max(w // 5, 1))
        nh, nw = h // tile_h, w // tile_w
        bump = _bump(tile_h, tile_w, x.device)
        flip = self.uniform(0, 1, ids, (nh, nw, 1, 1), x) < 0.5
        tiles = torch.where(flip, bump.transpose(0, 1), bump) if tile_h == tile_w else bump.expand(n, nh, nw, -1, -1)
        grid = tiles.permute(0, 1, 3, 2, 4).reshape(n, 1, nh * tile_h, nw * tile_w)
        signs = torch.where(self.uniform(0, 2, ids, (c, nh, nw), x) < 0.5, -1.0, 1.0)
        signs = signs.repeat_interleave(tile_h, dim=2).repeat_interleave(tile_w, dim=3)
        delta = torch.zeros_like(x, dtype=torch.float64)
        top, left = (h - nh * tile_h) // 2, (w - nw * tile_w) // 2
        delta[:, :, top:top + nh * tile_h, left:left + nw * tile_w] = grid * signs
        delta = delta / _norm(delta).clamp_min(1e-30) * self.eps
        return delta.to(x.dtype)

    # ------------------------------------------------------------------ steps
    def window(self, p: float, h: int, w: int, c: int, minimum: int, odd: bool,
               cap_below_size: bool) -> tuple[int, int]:
        """Window (height, width) covering about a fraction p of each channel's features."""
        if h == 1:
            side = max(int(round(p * w)), minimum)
            if odd and side % 2 == 0:
                side += 1
            return 1, max(1, min(side, w - 1 if cap_below_size and w > 1 else w))
        side = max(int(round(math.sqrt(p * h * w))), minimum)
        if odd and side % 2 == 0:
            side += 1
        limit = min(h, w) - 1 if cap_below_size else min(h, w)
        side = max(1, min(side, limit))
        return side, side

    def linf_step(self, act, best, u, p, everyone: bool):
        """best with one s x s window set to x +- eps (one sign per channel), contained.

        The signs are redrawn (LINF_SIGN_TRIES times, then negated) where they would leave the
        window unchanged, as the reference redraws them until the candidate differs from x_best.
        """
        n, c, h, w = best.shape
        up, down = self.faces if everyone else (self.faces[0][act], self.faces[1][act])
        size = self.window(p, h, w, c, minimum=1, odd=False, cap_below_size=True)
        top, left = _positions(u[:, :2], size, h, w)
        mask = _window_mask(top, left, size, h, w)  # (n, 1, h, w)
        draws = (u[:, 2:] < 0.5).reshape(n, LINF_SIGN_TRIES, c)  # True: +eps
        # Whether the window of channel k would change with +eps / -eps: then the first try whose
        # signs change some channel is taken, as a loop of redraws would, without a loop.
        changes_up = ((best != up) & mask).flatten(2).any(dim=2)  # (n, c)
        changes_down = ((best != down) & mask).flatten(2).any(dim=2)
        changes = torch.where(draws, changes_up.unsqueeze(1), changes_down.unsqueeze(1)).any(dim=2)  # (n, tries)
        # the first changing try; none: the last try's signs negated (they always change the window)
        first = torch.where(changes.any(dim=1), changes.to(torch.uint8).argmax(dim=1), LINF_SIGN_TRIES - 1)
        positive = draws.gather(1, first.reshape(n, 1, 1).expand(n, 1, c)).squeeze(1)
        positive = torch.where(changes.any(dim=1, keepdim=True), positive, ~positive)
        return torch.where(mask, torch.where(positive.reshape(n, c, 1, 1), up, down), best)

    def l2_step(self, x, best, u, p):
        n, c, h, w = x.shape
        x64, delta = x.double(), (best.double() - x.double())
        size = self.window(p, h, w, c, minimum=3, odd=True, cap_below_size=False)
        top1, left1 = _positions(u[:, 0:2], size, h, w)
        top2, left2 = _positions(u[:, 2:4], size, h, w)
        mask1 = _window_mask(top1, left1, size, h, w)
        mask2 = _window_mask(top2, left2, size, h, w)
        old = _take(delta, top1, left1, size)  # (n, c, sh, sw)
        norm_window1 = old.square().sum(dim=(2, 3), keepdim=True).sqrt()
        norm_image = _norm(delta)
        norm_windows = (delta * (mask1 | mask2)).square().sum(dim=(2, 3), keepdim=True).sqrt()
        bump = _bump(*size, x.device)
        if size[0] == size[1]:
            flip = (u[:, 4] < 0.5).reshape(n, 1, 1, 1)
            bump = torch.where(flip, bump.transpose(0, 1), bump)
        signs = torch.where((u[:, 5:5 + c] < 0.5).reshape(n, c, 1, 1), -1.0, 1.0)
        new = bump * signs + old / (1e-10 + norm_window1)
        budget = ((self.eps ** 2 - norm_image.square()).clamp_min(0.0) / c + norm_windows.square()).sqrt()
        new = new / new.square().sum(dim=(2, 3), keepdim=True).sqrt().clamp_min(1e-30) * budget
        delta = torch.where(mask2, 0.0, delta)
        delta = _put(delta, top1, left1, new)
        delta = delta / _norm(delta).clamp_min(1e-30) * self.eps
        return self.clip((x64 + delta).to(x.dtype))


# ---------------------------------------------------------------------------- helpers
def _canonical(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) view: (N, D) -> (N, 1, 1, D); (N, C, L) -> (N, C, 1, L); (N, C, ...) -> (N, C, 1, prod)."""
    if x.dim() == 2:
        return x.reshape(len(x), 1, 1, -1)
    if x.dim() == 3:
        return x.unsqueeze(2)
    if x.dim() == 4:
        return x
    return x.reshape(len(x), x.shape[1], 1, -1)


def _canonical_bound(b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A scalar bound, or a per-feature one shaped like one input, in the canonical layout (1, C, H, W)."""
    if b.dim() == 0:
        return b.reshape(1, 1, 1, 1)
    return _canonical(torch.broadcast_to(b, tuple(shape[1:])).unsqueeze(0))


def _norm(delta: torch.Tensor) -> torch.Tensor:
    return delta.square().sum(dim=(1, 2, 3), keepdim=True).sqrt()


def _positions(u: torch.Tensor, size: tuple[int, int], h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left corners uniform over every position where a window of `size` fits, from u (n, 2)."""
    top = (u[:, 0] * (h - size[0] + 1)).floor().long().clamp_max(h - size[0])
    left = (u[:, 1] * (w - size[1] + 1)).floor().long().clamp_max(w - size[1])
    return top, left


def _window_mask(top, left, size, h, w) -> torch.Tensor:
    rows = torch.arange(h, device=top.device)
    cols = torch.arange(w, device=top.device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size[0])
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size[1])
    return (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)


def _index(t: torch.Tensor, top, left, size):
    n, c = t.shape[:2]
    b = torch.arange(n, device=t.device).reshape(n, 1, 1, 1)
    ch = torch.arange(c, device=t.device).reshape(1, c, 1, 1)
    r = (top[:, None] + torch.arange(size[0], device=t.device)).reshape(n, 1, size[0], 1)
    col = (left[:, None] + torch.arange(size[1], device=t.device)).reshape(n, 1, 1, size[1])
    return b, ch, r, col


def _take(t: torch.Tensor, top, left, size) -> torch.Tensor:
    return t[_index(t, top, left, size)]


def _put(t: torch.Tensor, top, left, size_values: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    out[_index(t, top, left, tuple(size_values.shape[2:]))] = size_values
    return out


@functools.lru_cache(maxsize=64)
def _bump_cpu(h: int, w: int) -> torch.Tensor:
    """The paper's pseudo-Gaussian perturbation of a window: two halves of opposite sign, unit L2 norm
    (meta_pseudo_gaussian_pert in the reference code; split along the rows, or along the columns of
    a 1 x w window)."""
    out = torch.zeros(h, w, dtype=torch.float64)
    if h >= 2:
        out[: h // 2] = _rectangles(h // 2, w)
        out[h // 2:] = -_rectangles(h - h // 2, w)
    else:
        out[:, : w // 2] = _rectangles(1, w // 2)
        out[:, w // 2:] = -_rectangles(1, w - w // 2)
    return out / out.square().sum().sqrt().clamp_min(1e-30)


def _rectangles(h: int, w: int) -> torch.Tensor:
    """Concentric rectangles weighted 1 / (k + 1)^2, unit L2 norm (pseudo_gaussian_pert_rectangles)."""
    out = torch.zeros(h, w, dtype=torch.float64)
    if h == 0 or w == 0:
        return out
    r, c = h // 2, w // 2
    for k in range(max(h // 2 + 1, w // 2 + 1)):
        out[max(r, 0):min(r + 2 * k + 1, h), max(c, 0):min(c + 2 * k + 1, w)] += 1.0 / (k + 1) ** 2
        r, c = r - 1, c - 1
    return out / out.square().sum().sqrt()


def _bump(h: int, w: int, device) -> torch.Tensor:
    return _bump_cpu(h, w).to(device)
