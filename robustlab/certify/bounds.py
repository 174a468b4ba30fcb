"""IBP and CROWN lower bounds of linear functions of the logits (spec . logits) over an input set.

IBP (Gowal et al. 2018) pushes a box through the chain layer by layer. Two places are bounded
exactly instead, since no nonlinearity intervenes there:
- the first affine block (up to the first nonlinearity), on the input set itself: for Linf the box
  clipped to the bounds, for L2 the ball through the dual norm of the weight rows (intersected
  with the clipped Linf box, which contains the L2 ball too);
- the last affine block with the specification folded in (the elision of the last layer), on the
  box of the last nonlinearity's output: margins logit[y] - logit[j] are bounded as one linear
  function, which is tighter than subtracting separate logit bounds.

CROWN (Zhang et al. 2018) bounds every pre-activation layer, then the specification, by a
backward pass through the whole chain: linear relaxations of ReLU (adaptive lower slope) and
max-pool, each needing the bounds of its input (the earlier CROWN bounds, intersected with IBP's,
both being sound), and concretisation on the input set with the dual norm.

Only unstable ReLU inputs need CROWN bounds (a stable neuron's relaxation is exact whatever its
bounds), so only they are bounded past the first block. Backward passes run over chunks of neurons
so no coefficient tensor exceeds ELEMENT_BUDGET values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .graph import Chain
from .ops import Affine, Op, ReLU

METHODS = ("ibp", "crown")
NORMS = ("linf", "l2")
ELEMENT_BUDGET = 1 << 23  # values per coefficient tensor (8M float64: 64 MB)


@dataclass
class InputSet:
    """The inputs within eps of x (N, *shape) in the norm, inside the box [low, high]."""

    x: torch.Tensor
    eps: float
    norm: str
    low: torch.Tensor
    high: torch.Tensor

    def box(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The Linf ball clipped to the bounds: the set itself for Linf, a superset for L2."""
        return torch.maximum(self.x - self.eps, self.low), torch.minimum(self.x + self.eps, self.high)

    def lower(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """A lower bound of a . x' + b over the set, per row: (N, S). Exact for Linf; for L2 the
        larger of the ball's bound (dual norm) and the clipped box's (both sets contain the set)."""
        lo, hi = self.box()
        bound = box_lower(a, b, lo, hi)
        if self.norm == "l2":
            rows = a.flatten(2)
            ball = b + _per_sample(rows, self.x) - self.eps * torch.linalg.vector_norm(rows, dim=2)
            bound = torch.maximum(bound, ball)
        return bound


def _per_sample(rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """rows (N, S, D) . v (N, *shape) per sample -> (N, S)."""
    return torch.bmm(rows, v.reshape(len(v), -1, 1)).squeeze(2)


def box_lower(a: torch.Tensor, b: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """min of a . z + b over the box lo <= z <= hi (exact): a . mid - |a| . radius + b."""
    rows = a.flatten(2)
    return b + _per_sample(rows, (hi + lo) / 2) - _per_sample(rows.abs(), (hi - lo) / 2)


def margin_spec(y: torch.Tensor, num_classes: int, *, dtype: torch.dtype) -> torch.Tensor:
    """C (N, K-1, K): the rows e_y - e_j for every j != y, in the order of j."""
    n = len(y)
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    others = torch.arange(num_classes, device=y.device).expand(n, -1)
    others = others[others != y.unsqueeze(1)].reshape(n, num_classes - 1)
    return eye[y].unsqueeze(1) - eye[others]


def spec_lower(chain: Chain, inputs: InputSet, spec: torch.Tensor, method: str) -> torch.Tensor:
    """Lower bounds (N, S) of spec . logits, spec (N, S, K), for every input in the set."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    bounds = layer_bounds(chain, inputs, method)
    start = 0 if method == "crown" else _after_last_nonlinear(chain.ops)
    a, b = _backward(chain.ops, start, len(chain.ops), spec.to(inputs.x.dtype), bounds)
    return inputs.lower(a, b) if start == 0 else box_lower(a, b, *bounds[start])


def layer_bounds(chain: Chain, inputs: InputSet, method: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Bounds of every node: [0] the input set's box, [i + 1] the output of op i."""
    ops = chain.ops
    bounds = [inputs.box()]
    for i, op in enumerate(ops):
        lo, hi = op.interval(*bounds[i])
        feeds_nonlinear = i + 1 < len(ops) and not ops[i + 1].affine and op.affine
        if feeds_nonlinear and all(o.affine for o in ops[:i + 1]):
            lo, hi = _first_block_bounds(ops, i + 1, bounds, inputs, lo, hi)
        elif feeds_nonlinear and method == "crown":
            unstable = (lo < 0) & (hi > 0) if isinstance(ops[i + 1], ReLU) else None
            lo, hi = _node_bounds(ops, i + 1, bounds, inputs, lo, hi, unstable)
        bounds.append((lo, hi))
    return bounds


def _after_last_nonlinear(ops: list[Op]) -> int:
    return max((i + 1 for i, op in enumerate(ops) if not op.affine), default=0)


def _backward(ops: list[Op], start: int, stop: int, a: torch.Tensor, bounds: list[tuple[torch.Tensor, torch.Tensor]],
              b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """a . node[stop] + b >= A . node[start] + B for every input of the set: (A, B)."""
    if b is None:
        b = torch.zeros(a.shape[:2], dtype=a.dtype, device=a.device)
    for i in range(stop - 1, start - 1, -1):
        op = ops[i]
        a, b = op.backward(a, b) if op.affine else op.backward(a, b, *bounds[i])  # type: ignore[attr-defined]
    return a, b


def _first_block_bounds(ops: list[Op], k: int, bounds: list[tuple[torch.Tensor, torch.Tensor]], inputs: InputSet,
                        lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact bounds of node k when ops[:k] are all affine. With at most one mixing layer, IBP on the
    clipped box is exact for Linf, and for L2 the rows' norms come from the squared weights:
    center +- eps ||row||_2 (intersected with the box's bounds). Otherwise backward passes."""
    block = [op for op in ops[:k] if isinstance(op, Affine)]
    if sum(not op.elementwise for op in block) > 1:
        return _node_bounds(ops, k, bounds, inputs, lo, hi, None)
    if inputs.norm == "linf":
        return lo, hi
    try:
        squares = torch.ones_like(inputs.x[:1])
        center = inputs.x
        for op in block:
            squares, center = op.linear_sq(squares), op.forward(center)
    except NotImplementedError:  # a layer without squared weights (average pooling)
        return _node_bounds(ops, k, bounds, inputs, lo, hi, None)
    radius = inputs.eps * squares.clamp_min(0).sqrt()
    return torch.maximum(lo, center - radius), torch.minimum(hi, center + radius)


def _node_bounds(ops: list[Op], k: int, bounds: list[tuple[torch.Tensor, torch.Tensor]], inputs: InputSet,
                 lo: torch.Tensor, hi: torch.Tensor, only: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Node k's bounds by backward passes from +-identity rows to the input set, intersected with
    (lo, hi). `only` (N, *shape) marks the neurons that need them, per sample; each sample's rows
    are its own marked neurons (padded with unmarked ones, whose bounds are just as sound)."""
    n, shape = len(lo), lo.shape[1:]
    m = math.prod(shape)
    lo, hi = lo.reshape(n, m).clone(), hi.reshape(n, m).clone()
    if only is None:
        order = torch.arange(m, device=lo.device).expand(n, m)
    else:
        marked = only.reshape(n, m)
        count = int(marked.sum(1).max())
        if count == 0:
            return lo.reshape(n, *shape), hi.reshape(n, *shape)
        order = torch.argsort((~marked).to(torch.int8), dim=1, stable=True)[:, :count]
    split = _after_last_nonlinear(ops[:k])
    widest = max([math.prod(inputs.x.shape[1:])] + [math.prod(op.out_shape) for op in ops[:k]])
    per_chunk = max(1, ELEMENT_BUDGET // (2 * n * widest))
    for chunk in order.split(per_chunk, dim=1):
        r = chunk.shape[1]
        a = torch.zeros(n, r, m, dtype=lo.dtype, device=lo.device).scatter_(2, chunk.unsqueeze(2), 1.0)
        # Affine layers map -a to -(their map of a): the upper-bound rows split off at the first
        # nonlinearity only.
        a, b = _backward(ops, split, k, a.reshape(n, r, *shape), bounds)
        a, b = _backward(ops, 0, split, torch.cat([a, -a], 1), bounds, torch.cat([b, -b], 1))
        low = inputs.lower(a, b)
        lo.scatter_(1, chunk, torch.maximum(lo.gather(1, chunk), low[:, :r]))
        hi.scatter_(1, chunk, torch.minimum(hi.gather(1, chunk), -low[:, r:]))
    return lo.reshape(n, *shape), hi.reshape(n, *shape)
