"""Per-sample randomness that does not depend on batch size, device or order of work.

Every random number robustlab draws for a sample (a PGD random start, a random target class) is a
pure function of (run seed, stream, sample index, element index), computed with an integer hash
on tensors. So sample 17 gets the same random start whether it is attacked alone, in a batch of
256, on the CPU or on a GPU: results are reproducible and batch-size invariant, and no per-sample
`torch.Generator` loop is needed.
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for 0 <= x < 2**32, without int64 overflow."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (Wellons' lowbias32) on an int64 tensor of values < 2**32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_key(seed: int, stream: int) -> int:
    """Fold a run seed and a stream id (what the numbers are for) into one 32-bit key.

    Pure Python integers (the same values as _mix32 on tensors): attacks call this once per
    iteration, where building a tensor cost more than the draw itself.
    """
    key = (seed & _MASK32) ^ _mul32_int(stream + 1, 0x9E3779B9)
    return _mix32_int(_mix32_int(key) ^ ((seed >> 32) & _MASK32))


def _mul32_int(x: int, constant: int) -> int:
    return (x * constant) & _MASK32


def _mix32_int(x: int) -> int:
    """_mix32 on one Python integer below 2**32."""
    x ^= x >> 16
    x = _mul32_int(x, 0x7FEB352D)
    x ^= x >> 15
    x = _mul32_int(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(
    seed: int,
    stream: int,
    sample_ids: torch.Tensor,
    shape: tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniform numbers in [0, 1) of shape (len(sample_ids), *shape), fixed per sample id.

    Drawn as 24-bit fractions in float64 and cast once at the end: casting the 24-bit integers to
    float16 first made 99.6% of them inf (float16 tops out at 65504), so PGD's random start was
    the all-white image. The cast rounds to the nearest value of `dtype`; where that is 1 (float16,
    bfloat16) it is clamped to the largest value below 1, so the interval stays half-open. float32
    and float64 values are exactly those of the 24-bit fractions, as before.
    """
    device = sample_ids.device if device is None else device
    key = stream_key(seed, stream)
    ids = sample_ids.to(device=device, dtype=torch.int64).reshape(-1, *([1] * len(shape)))
    per_sample = _mix32((ids & _MASK32) ^ key)
    count = math.prod(shape)
    element = torch.arange(count, device=device, dtype=torch.int64).reshape(1, *shape)
    bits = _mix32((per_sample + _mul32(element, 0x9E3779B9)) & _MASK32)
    u = ((bits >> 8).to(torch.float64) * (1.0 / (1 << 24))).to(dtype)
    if torch.finfo(dtype).eps > 2.0 ** -23:  # under 24 significant bits: 1 - 2**-24 may round to 1
        u = torch.minimum(u, torch.nextafter(torch.ones((), dtype=dtype, device=device),
                                             torch.zeros((), dtype=dtype, device=device)))
    return u


def normal(
    seed: int,
    stream: int,
    sample_ids: torch.Tensor,
    shape: tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal numbers (Box-Muller on two independent uniform streams), computed in float64
    and cast once at the end, so low-precision dtypes get the rounded float64 draw."""
    u1 = uniform(seed, 2 * stream + 1_000_003, sample_ids, shape, device=device, dtype=torch.float64)
    u2 = uniform(seed, 2 * stream + 1_000_004, sample_ids, shape, device=device, dtype=torch.float64)
    radius = torch.sqrt(-2.0 * torch.log1p(-u1))  # 1 - u1 is in (0, 1]: no log(0)
    return (radius * torch.cos(2.0 * math.pi * u2)).to(dtype)
