#!/usr/bin/env python
"""Throughput of robustlab's adversarial training against its floor, measured side by side.

One epoch of PGD-AT with k inner steps needs, per batch, at least k forward+backward passes for the
inner maximisation (input gradients, model in eval mode) and one forward+backward for the weights
(parameter gradients, train mode): the floor, (k + 1) forward+backward passes. Both are timed on the
same model, data, batch order and batch size, in interleaved rounds; the ratio is the median of the
per-round ratios (robustlab epoch / floor epoch), which cancels the drifts of a shared machine.

The floor omits what any real trainer also does (the optimiser step, shuffling, projection onto the
eps ball), so it cannot be beaten; the target is robustlab <= 1.1x the floor.

    python bench/adversarial_training.py                 # digits CNN and ResNet-18, CPU
    python bench/adversarial_training.py --models digits --rounds 3
    python bench/adversarial_training.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from resnet import resnet18  # noqa: E402

from robustlab.data import Dataset, digits_split  # noqa: E402
from robustlab.defenses import adversarial_training  # noqa: E402
from robustlab.training import seeded_init  # noqa: E402
from robustlab.zoo import DigitsCNN  # noqa: E402

TARGET = 1.10


def workload(name: str, device: torch.device) -> tuple[Callable[[], torch.nn.Module], Dataset, int, float]:
    """(model factory, training data, batch size, eps)."""
    if name == "digits":
        return (lambda: seeded_init(DigitsCNN, 0).to(device)), digits_split("train"), 64, 0.2
    generator = torch.Generator().manual_seed(0)
    n = 256 if device.type == "cuda" else 64
    x = torch.rand(n, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    return (lambda: seeded_init(resnet18, 0).to(device)), Dataset(x, y, "random CIFAR-shaped"), 32, 8 / 255


def floor_epoch(model: torch.nn.Module, data: Dataset, batch_size: int, steps: int, device: torch.device,
                epochs: int = 1) -> float:
    """(steps + 1) forward+backward passes per batch and nothing else; seconds."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    x_all, y_all = data.x.to(device), data.y.to(device)
    _sync(device)
    started = time.perf_counter()
    for start in [s for _ in range(epochs) for s in range(0, len(data), batch_size)]:
        idx = order[start:start + batch_size].to(device)
        x, y = x_all[idx], y_all[idx]
        model.eval()
        for _ in range(steps):
            z = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(z), y, reduction="none").sum(), z)
            x = x + 0.0 * grad  # keep the dependency, no projection work
        model.train()
        F.cross_entropy(model(x.detach()), y).backward()
    _sync(device)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def robustlab_epoch(model: torch.nn.Module, data: Dataset, batch_size: int, steps: int, eps: float,
                    epochs: int = 1) -> float:
    started = time.perf_counter()
    adversarial_training(model, data, method="pgd", eps=eps, steps=steps, epochs=epochs, batch_size=batch_size, seed=0)
    _sync(next(model.parameters()).device)
    return time.perf_counter() - started


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--models", default="digits,resnet")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per timing (default: digits 3, resnet 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# adversarial training throughput, PGD-AT {args.steps} steps, {platform.processor() or 'cpu'}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {device}")
    print(f"{'model':<8} {'batches':>7} {'floor s':>9} {'robustlab s':>12} {'x floor':>8}  target <= {TARGET}x "
          "(median of paired per-round ratios)")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        factory, data, batch_size, eps = workload(name, device)
        floor_model, our_model = factory(), factory()
        floor_epoch(floor_model, data, batch_size, 1, device)  # warm-up
        robustlab_epoch(our_model, data, batch_size, 1, eps)
        floors, ours, ratios = [], [], []
        epochs = args.epochs or (3 if name == "digits" else 1)
        for r in range(args.rounds):
            pair = [("floor", lambda: floor_epoch(floor_model, data, batch_size, args.steps, device, epochs)),
                    ("ours", lambda: robustlab_epoch(our_model, data, batch_size, args.steps, eps, epochs))]
            times = dict((label, run()) for label, run in (pair if r % 2 == 0 else pair[::-1]))
            floors.append(times["floor"])
            ours.append(times["ours"])
            ratios.append(times["ours"] / times["floor"])
        batches = epochs * -(-len(data) // batch_size)
        ratio = statistics.median(ratios)
        print(f"{name:<8} {batches:>7} {statistics.median(floors):>9.3f} {statistics.median(ours):>12.3f} "
              f"{ratio:>7.3f}x  {'met' if ratio <= TARGET else 'NOT met'}  (per-round ratios "
              f"{min(ratios):.3f}..{max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
