"""The layers bound propagation knows, each with its interval (IBP) and backward (CROWN) rule.

A model is certified as a chain of these ops (see `graph.trace`). Every op maps one tensor to one
tensor, per sample, and knows three things:
- `forward(x)`: what the layer computes (used to check the trace against the model);
- `interval(lo, hi)`: a box containing the outputs of every input in the box [lo, hi];
- `backward(A, b, ...)`: given a linear function A . out + b of its output, a linear function of
  its input that is a lower bound of it (exact for affine layers; a linear relaxation for ReLU
  and max-pool, which needs the bounds of the layer's input).

Upper bounds are lower bounds of the negated function, so only lower bounds are written. Shapes:
inputs/bounds are (N, *in_shape); coefficient tensors A are (N, S, *shape) for S specification rows
per sample, and b is (N, S). Weights are read from the module at every call (converted to the
working dtype there), so a traced chain follows the training of its model and stays differentiable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.nn.grad  # conv2d_input; torch.nn does not expose its grad submodule to type checkers
from torch import nn


def _rows(a: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(N, S, *shape) -> (N * S, *shape): the layer's transposed map runs on rows as a batch."""
    return a.reshape(-1, *shape)


def _dot(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum over the per-sample dims of a (N, S, *shape) times v, one tensor for every sample
    broadcastable to shape (a bias): (N, S), as a matrix-vector product."""
    return a.flatten(2) @ torch.broadcast_to(v, a.shape[2:]).reshape(-1)


def _dot_per_sample(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same with v per sample, (N, 1, *shape): a batched matrix-vector product."""
    rows = a.flatten(2)
    return torch.bmm(rows, v.reshape(v.shape[0], -1, 1).expand(rows.shape[0], -1, 1)).squeeze(2)


class Op:
    """One layer of a certified chain."""

    affine = False

    def __init__(self, name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        self.name = name
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def interval(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.in_shape} -> {self.out_shape})"


class Affine(Op):
    """y = L(x) + bias. On a box the exact output box is L(mid) + bias +- |L|(radius)."""

    affine = True
    elementwise = False  # maps each input value to one output value (no mixing)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """L(x) on a batch (B, *in_shape) -> (B, *out_shape), without the bias."""
        raise NotImplementedError

    def linear_abs(self, r: torch.Tensor) -> torch.Tensor:
        """|L|(r): the entrywise absolute value of L's matrix applied to r."""
        raise NotImplementedError

    def linear_sq(self, v: torch.Tensor) -> torch.Tensor:
        """L with every matrix entry squared, applied to v: squared L2 norms of the rows of a block
        with one mixing layer come from it (the exact L2 bound of a first layer)."""
        raise NotImplementedError

    def bias(self, like: torch.Tensor) -> torch.Tensor | None:
        """The bias, broadcastable to (B, *out_shape), in like's dtype and device; None if zero."""
        return None

    def transpose(self, a: torch.Tensor) -> torch.Tensor:
        """L^T on a batch of rows (R, *out_shape) -> (R, *in_shape). L is linear, so its vector-
        Jacobian product at any point is exactly L^T a; layers with a direct form override this."""
        with torch.enable_grad():
            z = torch.zeros((a.shape[0], *self.in_shape), dtype=a.dtype, device=a.device, requires_grad=True)
            (g,) = torch.autograd.grad(self.linear(z), z, a, create_graph=a.requires_grad)
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        b = self.bias(x)
        return y if b is None else y + b

    def interval(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mid = self.forward((hi + lo) / 2)
        rad = self.linear_abs((hi - lo) / 2)
        return mid - rad, mid + rad

    def backward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, s = a.shape[:2]
        bias = self.bias(a)
        if bias is not None:  # broadcast on the trailing dims: (out,) for Linear, (C, 1, 1) for Conv2d
            b = b + _dot(a, bias)
        return self.transpose(_rows(a, self.out_shape)).reshape(n, s, *self.in_shape), b


class Dense(Affine):
    """nn.Linear (on the last dimension, like the module)."""

    def __init__(self, name: str, module: nn.Linear, in_shape, out_shape, dtype: torch.dtype) -> None:
        super().__init__(name, in_shape, out_shape)
        self.module, self.dtype = module, dtype

    def _w(self) -> torch.Tensor:
        return self.module.weight.to(self.dtype)

    def linear(self, x):
        return x @ self._w().T

    def linear_abs(self, r):
        return r @ self._w().abs().T

    def linear_sq(self, v):
        return v @ self._w().square().T

    def transpose(self, a):
        return a @ self._w()

    def bias(self, like):
        b = self.module.bias
        return None if b is None else b.to(like.dtype)


class Matrix(Affine):
    """A fixed matrix on flat per-sample vectors (the wrapper's binary logit [0, z])."""

    def __init__(self, name: str, matrix: torch.Tensor, in_shape, out_shape) -> None:
        super().__init__(name, in_shape, out_shape)
        self.matrix = matrix

    def linear(self, x):
        return x @ self.matrix.to(x).T

    def linear_abs(self, r):
        return r @ self.matrix.to(r).abs().T

    def linear_sq(self, v):
        return v @ self.matrix.to(v).square().T

    def transpose(self, a):
        return a @ self.matrix.to(a)


class Conv(Affine):
    """nn.Conv2d with zero padding. Its transpose is the input gradient of the convolution."""

    def __init__(self, name: str, module: nn.Conv2d, in_shape, out_shape, dtype: torch.dtype) -> None:
        super().__init__(name, in_shape, out_shape)
        self.module, self.dtype = module, dtype

    def _conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        m = self.module
        return F.conv2d(x, w, None, m.stride, m.padding, m.dilation, m.groups)

    def linear(self, x):
        return self._conv(x, self.module.weight.to(self.dtype))

    def linear_abs(self, r):
        return self._conv(r, self.module.weight.to(self.dtype).abs())

    def linear_sq(self, v):
        return self._conv(v, self.module.weight.to(self.dtype).square())

    def transpose(self, a):
        m = self.module
        if isinstance(m.padding, str):  # 'same' may pad asymmetrically: let autograd place it
            return super().transpose(a)
        return torch.nn.grad.conv2d_input((a.shape[0], *self.in_shape), m.weight.to(self.dtype), a,
                                          m.stride, m.padding, m.dilation, m.groups)

    def bias(self, like):
        b = self.module.bias
        return None if b is None else b.to(like.dtype).reshape(-1, 1, 1)


class Scale(Affine):
    """x * scale + shift, per channel or per feature: batch norm in eval mode, the wrapper's
    mean/std normalisation. scale/shift are callables so a training model's values are current."""

    elementwise = True

    def __init__(self, name: str, scale_shift, in_shape) -> None:
        super().__init__(name, in_shape, in_shape)
        self.scale_shift = scale_shift  # () -> (scale, shift), broadcastable to (1, *in_shape)

    def linear(self, x):
        return x * self.scale_shift()[0].to(x)

    def linear_abs(self, r):
        return r * self.scale_shift()[0].to(r).abs()

    def linear_sq(self, v):
        return v * self.scale_shift()[0].to(v).square()

    def transpose(self, a):
        return a * self.scale_shift()[0].to(a)

    def bias(self, like):
        return self.scale_shift()[1].to(like)

    def backward(self, a, b):
        scale, shift = self.scale_shift()
        shape = (1, 1, *self.in_shape)
        b = b + _dot(a, torch.broadcast_to(shift.to(a), (1, *self.in_shape))[0])
        return a * torch.broadcast_to(scale.to(a), (1, *self.in_shape)).reshape(shape), b


def batch_norm_scale_shift(module: nn.modules.batchnorm._BatchNorm, rank: int):
    """A BatchNorm in eval mode as per-channel scale and shift (channels on dim 1 of the batch)."""
    def scale_shift() -> tuple[torch.Tensor, torch.Tensor]:
        assert module.running_mean is not None and module.running_var is not None
        scale = torch.rsqrt(module.running_var.double() + module.eps)
        if module.weight is not None:
            scale = scale * module.weight.double()
        shift = -module.running_mean.double() * scale
        if module.bias is not None:
            shift = shift + module.bias.double()
        view = (-1, *([1] * (rank - 1)))
        return scale.reshape(view), shift.reshape(view)
    return scale_shift


class Reshape(Affine):
    """Flatten, view, reshape: the per-sample values in the same (row-major) order."""

    elementwise = True

    def linear(self, x):
        return x.reshape(x.shape[0], *self.out_shape)

    def linear_abs(self, r):
        return self.linear(r)

    def linear_sq(self, v):
        return self.linear(v)

    def transpose(self, a):
        return a.reshape(a.shape[0], *self.in_shape)

    def backward(self, a, b):
        return a.reshape(*a.shape[:2], *self.in_shape), b


class Pool(Affine):
    """Average pooling (AvgPool2d, AdaptiveAvgPool2d): linear with non-negative weights, so |L| = L."""

    def __init__(self, name: str, pool, in_shape, out_shape) -> None:
        super().__init__(name, in_shape, out_shape)
        self.pool = pool  # the functional form, x -> pooled x

    def linear(self, x):
        return self.pool(x)

    def linear_abs(self, r):
        return self.pool(r)


class ReLU(Op):
    """The CROWN relaxation of Zhang et al. 2018: for an unstable neuron (l < 0 < u) the upper
    line through (l, 0) and (u, u), and the adaptive lower line y >= a z with a = 1 when u >= -l,
    else 0 (the choice of smaller area). Stable neurons are exact."""

    def forward(self, x):
        return torch.relu(x)

    def interval(self, lo, hi):
        return lo.clamp_min(0), hi.clamp_min(0)

    def backward(self, a, b, lo, hi):
        lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
        active, inactive = lo >= 0, hi <= 0
        unstable = ~(active | inactive)
        width = torch.where(unstable, hi - lo, torch.ones_like(hi))
        upper = torch.where(active, torch.ones_like(hi), torch.where(unstable, hi / width, torch.zeros_like(hi)))
        intercept = torch.where(unstable, -lo * upper, torch.zeros_like(hi))
        lower = torch.where(active | (unstable & (hi >= -lo)), torch.ones_like(hi), torch.zeros_like(hi))
        b = b + _dot_per_sample(a.clamp_max(0), intercept)
        return a * torch.where(a >= 0, lower, upper), b


class MaxPool(Op):
    """nn.MaxPool2d (any kernel, stride, padding, dilation; not ceil_mode). IBP: the max of the
    bounds. CROWN (the relaxation auto_LiRPA uses without optimised slopes): per window,
    max >= x_k for the element k with the largest lower bound; max <= x_k as well when l_k is at
    least every other element's upper bound (the window is decided), else max <= max_j u_j."""

    def __init__(self, name: str, module: nn.MaxPool2d, in_shape, out_shape) -> None:
        super().__init__(name, in_shape, out_shape)
        self.module = module

    def forward(self, x):
        m = self.module
        return F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode)

    def interval(self, lo, hi):
        return self.forward(lo), self.forward(hi)

    def _pair(self, v) -> tuple[int, int]:
        return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))

    def _windows(self, t: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, K, L): the K elements of each of the L windows (-inf padded)."""
        (kh, kw), (sh, sw) = self._pair(self.module.kernel_size), self._pair(self.module.stride)
        ph, pw = self._pair(self.module.padding)
        padded = F.pad(t, (pw, pw, ph, ph), value=-math.inf)
        cols = F.unfold(padded, (kh, kw), dilation=self._pair(self.module.dilation), stride=(sh, sw))
        return cols.reshape(t.shape[0], t.shape[1], kh * kw, -1)

    def backward(self, a, b, lo, hi):
        n, s = a.shape[:2]
        c, h, w = self.in_shape
        lw, uw = self._windows(lo), self._windows(hi)
        lmax, k = lw.max(dim=2, keepdim=True)
        umax = uw.max(dim=2).values
        others = uw.scatter(2, k, -math.inf).max(dim=2).values
        decided = (lmax.squeeze(2) >= others).reshape(n, 1, c, -1)
        a = a.reshape(n, s, c, -1)
        neg = a.clamp_max(0)
        # A+ takes the lower line x_k; A- the upper one: x_k where decided, else the constant umax.
        coef = torch.where(decided, a, a.clamp_min(0))
        b = b + (torch.where(decided, torch.zeros_like(neg), neg) * umax.reshape(n, 1, c, -1)).flatten(2).sum(2)
        onehot = torch.zeros(n, s, c, lw.shape[2], lw.shape[3], dtype=a.dtype, device=a.device)
        onehot = onehot.scatter(3, k.unsqueeze(1).expand(n, s, c, 1, lw.shape[3]), coef.unsqueeze(3))
        (kh, kw), (ph, pw) = self._pair(self.module.kernel_size), self._pair(self.module.padding)
        folded = F.fold(onehot.reshape(n * s, c * kh * kw, -1), (h + 2 * ph, w + 2 * pw), (kh, kw),
                        dilation=self._pair(self.module.dilation), stride=self._pair(self.module.stride))
        return folded[:, :, ph:ph + h, pw:pw + w].reshape(n, s, c, h, w), b
