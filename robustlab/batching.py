"""Run work over a data set in batches, halving the batch size on out-of-memory.

Because all randomness is seeded per sample (robustlab.seeding), the batch size chosen here never
changes a result, only the speed.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")

DEFAULT_GPU_BATCH = 1024  # halved on out-of-memory until it fits
CPU_INPUT_VALUES = 1 << 20  # ~1M input values per CPU batch: all digits at once, 341 CIFAR images, 32 at 224x224
CPU_BATCH_RANGE = (32, 4096)


def default_batch_size(device: torch.device, values_per_sample: int = 1) -> int:
    """GPU: start large and back off on OOM. CPU: OOM is not catchable, so size by input volume."""
    if device.type == "cuda":
        return DEFAULT_GPU_BATCH
    low, high = CPU_BATCH_RANGE
    return max(low, min(high, CPU_INPUT_VALUES // max(1, values_per_sample)))


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


class BatchRunner:
    """Calls fn(start, stop) over [0, n) in chunks; remembers the largest batch size that fit."""

    def __init__(self, batch_size: int | None, device: torch.device, values_per_sample: int = 1) -> None:
        self.automatic = batch_size is None
        self.batch_size = batch_size or default_batch_size(device, values_per_sample)
        self.device = device

    def run(self, n: int, fn: Callable[[int, int], T]) -> list[T]:
        results: list[T] = []
        start = 0
        while start < n:
            stop = min(n, start + self.batch_size)
            try:
                results.append(fn(start, stop))
            except Exception as error:  # noqa: BLE001 - re-raised unless it is an OOM we can back off from
                if not (self.automatic and is_out_of_memory(error)) or self.batch_size == 1:
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            start = stop
        return results
