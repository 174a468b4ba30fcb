"""Automatic batch size: halve on out-of-memory, finish the work, never change results."""

from __future__ import annotations

import pytest
import torch

from robustlab.batching import BatchRunner


def test_backs_off_on_out_of_memory_and_covers_every_sample():
    seen: list[tuple[int, int]] = []

    def work(start: int, stop: int) -> list[int]:
        if stop - start > 24:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        seen.append((start, stop))
        return list(range(start, stop))

    runner = BatchRunner(None, torch.device("cpu"), values_per_sample=4096)
    assert runner.batch_size == 256  # 1M input values per CPU batch
    parts = runner.run(1000, work)
    assert [i for part in parts for i in part] == list(range(1000))
    assert runner.batch_size == 16  # 256 -> 128 -> 64 -> 32 -> 16
    assert all(stop - start <= 16 for start, stop in seen)


def test_explicit_batch_size_is_respected_and_errors_propagate():
    runner = BatchRunner(8, torch.device("cpu"))

    def oom(start: int, stop: int):
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        runner.run(20, oom)  # the user fixed the batch size: no silent change
    assert runner.batch_size == 8

    def other(start: int, stop: int):
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError):
        BatchRunner(None, torch.device("cpu")).run(20, other)


def test_cpu_default_scales_with_input_size():
    from robustlab.batching import default_batch_size

    cpu = torch.device("cpu")
    assert default_batch_size(cpu, 64) == 4096  # digits: everything in one batch
    assert default_batch_size(cpu, 3 * 32 * 32) == 341
    assert default_batch_size(cpu, 3 * 224 * 224) == 32
