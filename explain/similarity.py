"""How alike two attribution maps are, per sample (pure torch; no captum).

Used to measure how much an attack shifts an explanation (clean vs adversarial map) and how much a
model randomisation changes it (Adebayo et al. 2018). Every function takes two batches of maps of
the same shape, samples first, and returns one float64 value per sample.

- `spearman`: Spearman rank correlation of the flattened maps, ties ranked by their average rank
  (as `scipy.stats.spearmanr`); optionally restricted to a per-sample mask of informative features,
  so a large constant background (zero attributions where the input is zero) cannot dominate it.
- `topk_intersection`: share of the k most important features (largest |attribution|) shared.
- `ssim`: structural similarity (Wang et al. 2004) of the 2-D maps, channels averaged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from robustlab.errors import InputError

Tensor = torch.Tensor


def _pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    a = torch.as_tensor(a)
    b = torch.as_tensor(b)
    if a.shape != b.shape:
        raise InputError("b", f"maps must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < 2:
        raise InputError("a", f"must be a batch of maps (samples first, at least 2 dimensions), got shape {tuple(a.shape)}")
    if a.shape[0] and a[0].numel() == 0:
        raise InputError("a", "maps have no features")
    a64, b64 = a.detach().reshape(len(a), -1).double(), b.detach().reshape(len(b), -1).double()
    if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):
        raise InputError("a" if not torch.isfinite(a64).all() else "b", "contains NaN or infinite values")
    return a64, b64


def average_ranks(values: Tensor) -> Tensor:
    """1-based ranks along the last dimension; tied values share the mean of their ranks."""
    ordered, _ = torch.sort(values, dim=-1)
    below = torch.searchsorted(ordered.contiguous(), values.contiguous(), right=False)
    at_most = torch.searchsorted(ordered.contiguous(), values.contiguous(), right=True)
    return (below + 1 + at_most).to(torch.float64) / 2.0


def _pearson(a: Tensor, b: Tensor, weight: Tensor | None = None) -> Tensor:
    """Row-wise Pearson correlation (weights 0/1 select features). NaN where a row is constant."""
    if weight is None:
        weight = torch.ones_like(a)
    count = weight.sum(dim=1, keepdim=True)
    mean_a = (a * weight).sum(dim=1, keepdim=True) / count
    mean_b = (b * weight).sum(dim=1, keepdim=True) / count
    da, db = (a - mean_a) * weight, (b - mean_b) * weight
    cov = (da * db).sum(dim=1)
    var = (da * da).sum(dim=1) * (db * db).sum(dim=1)
    out = cov / var.sqrt()
    return torch.where(var > 0, out, torch.full_like(out, math.nan))


def spearman(a: Tensor, b: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Per-sample Spearman rank correlation of the flattened maps a and b (float64, shape (N,)).

    Ties get average ranks, as in `scipy.stats.spearmanr`. With `mask` (bool, same shape as the maps
    or broadcastable to them), only the features where it is True are ranked and correlated, per
    sample. NaN where a map is constant on the compared features (correlation undefined) or fewer
    than two features are compared.
    """
    a64, b64 = _pair(a, b)
    if mask is None:
        return _pearson(average_ranks(a64), average_ranks(b64))
    m = torch.as_tensor(mask).to(torch.bool)
    try:
        m = torch.broadcast_to(m, torch.as_tensor(a).shape).reshape(len(a64), -1)
    except RuntimeError:
        raise InputError("mask", f"shape {tuple(m.shape)} does not fit maps of shape {tuple(torch.as_tensor(a).shape)}") from None
    # Features outside the mask all rank below every feature inside it, so the ranks inside are the
    # ranks among masked features shifted by a per-sample constant, which a correlation ignores.
    low = torch.tensor(-math.inf, dtype=torch.float64)
    ra = average_ranks(torch.where(m, a64, low))
    rb = average_ranks(torch.where(m, b64, low))
    out = _pearson(ra, rb, m.double())
    return torch.where(m.sum(dim=1) >= 2, out, torch.full_like(out, math.nan))


def _k_of(k: float | int, features: int) -> int:
    """A float is a fraction of the features in (0, 1]; an int is a count."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k):
        raise InputError("k", f"expected a fraction in (0, 1] (float) or a count >= 1 (int), got {k!r}")
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise InputError("k", f"a fraction (float) must be in (0, 1], got {k!r}; pass an int for a count")
        return max(1, int(round(k * features)))
    if not 1 <= k <= features:
        raise InputError("k", f"a count must be between 1 and the number of features ({features}), got {k!r}")
    return int(k)


def top_indices(values: Tensor, k: int) -> Tensor:
    """Indices of the k largest |values| per row; ties broken by the lower feature index."""
    order = torch.sort(values.abs(), dim=1, descending=True, stable=True).indices
    return order[:, :k]


def topk_intersection(a: Tensor, b: Tensor, k: float | int) -> Tensor:
    """Per-sample share of the top-k features by |attribution| that a and b have in common.

    k: a fraction of the features in (0, 1] (rounded, at least 1; a float 1.0 means all), or an
    int count. Ties at the cut-off are broken by feature index (a stable sort), deterministically.
    """
    a64, b64 = _pair(a, b)
    features = a64.shape[1]
    count = _k_of(k, features)
    n = len(a64)
    in_a = torch.zeros(n, features, dtype=torch.bool)
    in_b = torch.zeros(n, features, dtype=torch.bool)
    in_a.scatter_(1, top_indices(a64, count).cpu(), True)
    in_b.scatter_(1, top_indices(b64, count).cpu(), True)
    return (in_a & in_b).sum(dim=1).double() / count


def _gaussian_window(size: int, sigma: float) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """Window size and Gaussian sigma used for maps of this size: Wang et al.'s 11 x 11, sigma 1.5,
    shrunk (odd size, sigma scaled alike) to fit small maps such as 8 x 8 digits."""
    size = min(11, height, width)
    size = size if size % 2 == 1 else size - 1
    return size, 1.5 * size / 11.0


def _as_images(maps: Tensor) -> Tensor:
    if maps.dim() == 2:
        raise InputError("a", f"ssim needs 2-D maps per sample ((N, H, W) or (N, C, H, W)), got shape {tuple(maps.shape)}")
    if maps.dim() == 3:
        return maps
    if maps.dim() == 4:
        return maps.mean(dim=1)
    raise InputError("a", f"ssim needs maps shaped (N, H, W) or (N, C, H, W), got shape {tuple(maps.shape)}")


def ssim(a: Tensor, b: Tensor, *, absolute: bool = True) -> Tensor:
    """Per-sample structural similarity of 2-D maps (channels averaged), float64, shape (N,).

    Formulation: each map is averaged over channels, made absolute (`absolute=True`, as Adebayo et
    al. compare importance), and scaled by its largest magnitude so it lies in [0, 1] ([-1, 1]
    signed; data range L = 1 resp. 2). Local means, variances and covariance use a Gaussian window
    (`ssim_window`: 11 x 11, sigma 1.5, shrunk for small maps) at every position where it fits
    (no padding); SSIM = mean over positions of
    (2 mu_a mu_b + C1)(2 cov + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2)),
    C1 = (0.01 L)^2, C2 = (0.03 L)^2 (population moments, as skimage with
    gaussian_weights=True, use_sample_covariance=False). An all-zero map stays zero.
    Note: windows where both maps are constant score 1, so a large shared background raises SSIM;
    compare ranks on the informative region (`spearman(..., mask=...)`) when that matters.
    """
    _pair(a, b)
    ia = _as_images(torch.as_tensor(a).detach().double())
    ib = _as_images(torch.as_tensor(b).detach().double())
    if absolute:
        ia, ib = ia.abs(), ib.abs()

    def scaled(m: Tensor) -> Tensor:
        peak = m.abs().reshape(len(m), -1).amax(dim=1).reshape(-1, 1, 1)
        return m / torch.where(peak > 0, peak, torch.ones_like(peak))

    ia, ib = scaled(ia), scaled(ib)
    data_range = 1.0 if absolute else 2.0
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    size, sigma = ssim_window(ia.shape[-2], ia.shape[-1])
    w = _gaussian_window(size, sigma).to(ia.device).reshape(1, 1, size, size)

    def filt(z: Tensor) -> Tensor:
        return F.conv2d(z.unsqueeze(1), w).squeeze(1)

    mu_a, mu_b = filt(ia), filt(ib)
    var_a = filt(ia * ia) - mu_a ** 2
    var_b = filt(ib * ib) - mu_b ** 2
    cov = filt(ia * ib) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return value.reshape(len(value), -1).mean(dim=1)
