#!/usr/bin/env python
"""Work, not time: the model passes robustlab's cascade and the original AutoAttack spend, and the floor.

Wall time on a shared 2-core machine moves with the load; the number of passes through the model
does not. A counting wrapper records, per run, the per-sample forward passes taken with autograd
(each followed by a backward: one gradient pass) and those without (Square's queries, checks). The
robust-sample floor is what ANY faithful standard AutoAttack must spend on the samples nobody
breaks: APGD-CE's 100 and APGD-T's 9 x 100 gradient passes, FAB-T's 9 x 100 (a forward and a
Jacobian each; counted as one gradient pass, so this is a lower bound) and Square's 5000 queries.
If the reference's own work is under twice that floor, no faithful implementation can take half
its time by doing less; only by making each pass cheaper.

    python bench/autoattack_work.py --fra31 /path/to/auto-attack [--cases 4,5] [--n 300]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

import importlib.util
from pathlib import Path

from robustlab.attacks import Cascade
from robustlab.data import digits_split
from robustlab.model import ModelUnderTest

# bench/autoattack.py's models and cases, loaded under another name: fra31's package is `autoattack` too
_spec = importlib.util.spec_from_file_location("bench_autoattack", Path(__file__).with_name("autoattack.py"))
assert _spec is not None and _spec.loader is not None
bench_autoattack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_autoattack)
CASES, fra31_autoattack, model = bench_autoattack.CASES, bench_autoattack.fra31_autoattack, bench_autoattack.model

GRADIENT_PASSES_PER_ROBUST = 100 + 9 * 100 + 9 * 100  # APGD-CE, APGD-T, FAB-T
QUERIES_PER_ROBUST = 5000  # Square
# one gradient pass costs about this many no-grad forwards (forward + backward, measured on the
# digits CNN: a no-grad forward is 0.44-0.56 of an input-gradient forward+backward; bench/RESULTS.md)
GRADIENT_PASS_IN_FORWARDS = 2.0


class Counting(torch.nn.Module):
    """The module, counting the samples it is called on with and without autograd."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.with_grad = 0
        self.without_grad = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.with_grad += len(x)
        else:
            self.without_grad += len(x)
        return self.module(x)

    def reset(self) -> None:
        self.with_grad = self.without_grad = 0


@dataclass
class Work:
    gradient: int
    forward: int

    @property
    def units(self) -> float:
        """In no-grad forward passes."""
        return GRADIENT_PASS_IN_FORWARDS * self.gradient + self.forward


def robust_floor(robust: int) -> Work:
    return Work(GRADIENT_PASSES_PER_ROBUST * robust, QUERIES_PER_ROBUST * robust)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--fra31", required=True, help="path of a fra31/auto-attack checkout")
    parser.add_argument("--cases", default=None, help="comma-separated indices into bench/autoattack.py's CASES")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    original = fra31_autoattack(args.fra31)
    if original is None:
        sys.exit("fra31/auto-attack could not be imported")
    test = digits_split("test")
    x, y = test.x[:args.n].contiguous(), test.y[:args.n]
    chosen = CASES if args.cases is None else [CASES[int(i)] for i in args.cases.split(",")]
    print("| model | norm | eps | robust (robustlab / fra31) | robustlab work | fra31 work | robust-sample floor "
          "| robustlab / fra31 | fra31 / floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, norm, eps in chosen:
        counting = Counting(model(kind)).eval()
        mut = ModelUnderTest(counting, bounds=(0.0, 1.0), name=kind)
        mut.inspect(x)
        counting.reset()
        outcome = Cascade(eps=eps, norm=norm)(mut, x, y, seed=0)
        ours = Work(counting.with_grad, counting.without_grad)
        with torch.no_grad():
            correct = counting.module(x).argmax(1) == y
        robust_ours = int((~outcome.success & correct).sum())
        counting.reset()
        reference = original(counting, norm="Linf" if norm == "linf" else "L2", eps=eps, version="standard", seed=0,
                             verbose=False, device="cpu")
        x_adv = reference.run_standard_evaluation(x, y, bs=len(x))
        theirs = Work(counting.with_grad, counting.without_grad)
        with torch.no_grad():
            robust_theirs = int(((counting.module(x_adv).argmax(1) == y) & correct).sum())
        floor = robust_floor(min(robust_ours, robust_theirs))
        ratio_floor = f"{theirs.units / floor.units:.2f}x" if floor.units else "-"
        print(f"| {kind} | {norm} | {eps:g} | {robust_ours / args.n:.3f} / {robust_theirs / args.n:.3f} "
              f"| {ours.gradient:,} grad + {ours.forward:,} fwd | {theirs.gradient:,} grad + {theirs.forward:,} fwd "
              f"| {floor.gradient:,} grad + {floor.forward:,} fwd | {ours.units / theirs.units:.2f}x | {ratio_floor} |",
              flush=True)
    print(f"\nwork in no-grad forward passes, a gradient pass counted as {GRADIENT_PASS_IN_FORWARDS:g}")


if __name__ == "__main__":
    main()
