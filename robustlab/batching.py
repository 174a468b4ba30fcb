"""Run work over a data set in batches, halving the batch size on out-of-memory.

Because all randomness is seeded per sample (robustlab.seeding), the batch size chosen here never
changes a result, only the speed. Given a `desc`, a run shows a progress bar over the samples
(robustlab.progress), advanced from Python counters after each batch: no host sync.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

from robustlab import progress
from robustlab.log import get_logger

T = TypeVar("T")
_log = get_logger(__name__)

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

    def run(self, n: int, fn: Callable[[int, int], T], *, desc: str | None = None) -> list[T]:
        """fn over [0, n) batch by batch; with `desc`, a progress bar counts the samples done."""
        results: list[T] = []
        start = 0
        with progress.bar(desc, total=n, unit="sample") if desc is not None else progress.OFF as bar:
            while start < n:
                stop = min(n, start + self.batch_size)
                try:
                    results.append(fn(start, stop))
                except Exception as error:  # noqa: BLE001 - re-raised unless it is an OOM we can back off from
                    if not (self.automatic and is_out_of_memory(error)) or self.batch_size == 1:
                        raise
                    self.batch_size = max(1, self.batch_size // 2)
                    _log.debug("out of memory at batch size %d on %s; retrying with %d", stop - start,
                               self.device, self.batch_size)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                bar.update(stop - start)
                start = stop
        return results
