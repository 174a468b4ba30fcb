#!/usr/bin/env python
"""The standard cascade against the reference AutoAttack: robust accuracy and wall time, side by side.

Same models, same samples, same device, one process. For each (model, norm, eps):
- robustlab's `Cascade(suite="standard")` (APGD-CE, APGD-T, FAB-T, Square-5000),
- torchattacks' port of AutoAttack, version "standard" (APGD-CE, APGD-T, FAB-T, Square-5000),
- fra31/auto-attack itself when `--fra31 DIR` points at a checkout of it (not on PyPI; the
  search tool's `fetch github:fra31/auto-attack` brings one),
each timed once after a warm-up, robust accuracy judged here by a fresh forward pass. Also APGD-CE
(100 iterations) against its floor: 101 forward+backward passes of the bare module on the same batch,
and the robust-sample floor: what any faithful standard AutoAttack must spend on the samples it
cannot break (their APGD-CE and APGD-T gradient passes and 5000 Square queries, FAB-T left out),
measured on the bare module. Where the reference's time is under twice that floor, no faithful
implementation can take half the reference's time.

Models: the undefended digits CNN (robustlab.demo.digits_cnn) and PGD-trained copies (Linf eps
0.2, L2 eps 1.0; `robustlab.defenses.adversarial_training`, 15 epochs, seed 1), cached under
$ROBUSTLAB_CACHE/bench/. Not part of the test suite:

    python bench/autoattack.py [--n 300] [--threads 2] [--fra31 /path/to/auto-attack]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from robustlab.attacks import APGD, Cascade
from robustlab.data import digits_split
from robustlab.demo import cache_dir, digits_cnn
from robustlab.model import ModelUnderTest
from robustlab.training import seeded_init
from robustlab.zoo import DigitsCNN

CASES = [("undefended", "linf", 0.1), ("undefended", "linf", 0.2), ("undefended", "l2", 0.5),
         ("undefended", "l2", 1.0), ("pgd-at-linf", "linf", 0.1), ("pgd-at-linf", "linf", 0.2),
         ("pgd-at-l2", "l2", 0.5), ("pgd-at-l2", "l2", 1.0)]


def model(kind: str) -> torch.nn.Module:
    from safetensors.torch import load_file, save_file

    from robustlab.defenses import adversarial_training

    if kind == "undefended":
        module = digits_cnn()[0]
    else:
        path = cache_dir() / "bench" / f"{kind}-v1.safetensors"
        module = seeded_init(DigitsCNN, 1)
        if path.exists():
            module.load_state_dict(load_file(str(path)))
        else:
            norm, eps = ("linf", 0.2) if kind == "pgd-at-linf" else ("l2", 1.0)
            adversarial_training(module, digits_split("train"), method="pgd", eps=eps, norm=norm, steps=7,
                                 epochs=15, seed=1)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def robust(module, x_adv, x, y) -> float:
    with torch.no_grad():
        return float(((module(x_adv).argmax(1) == y) & (module(x).argmax(1) == y)).double().mean())


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def floor_seconds(module, x, y, passes: int) -> float:
    """`passes` forward+backward passes of the bare module, input gradients only."""
    def run():
        for _ in range(passes):
            xr = x.detach().clone().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(module(xr), y, reduction="sum")
            torch.autograd.grad(loss, xr)
    return timed(run)[1]


ROBUST_GRADIENT_PASSES = 100 + 9 * 100  # APGD-CE, then APGD-T's 9 targets x 100 iterations
ROBUST_QUERIES = 5000  # Square's budget


def robust_floor_seconds(module, x, y, *, measured: int = 20) -> float:
    """A lower bound on what ANY faithful standard AutoAttack spends on the samples it cannot break.

    A robust sample goes through every member to the end of its budget: APGD-CE's and APGD-T's
    gradient passes and Square's 5000 forward queries (FAB-T's passes left out, so this is a lower
    bound). Measured on the bare module with `measured` passes of each kind, scaled.
    """
    if len(x) == 0:
        return 0.0
    backward = floor_seconds(module, x, y, measured) / measured

    def forwards():
        with torch.no_grad():
            for _ in range(5 * measured):
                module(x)
    forward = timed(forwards)[1] / (5 * measured)
    return ROBUST_GRADIENT_PASSES * backward + ROBUST_QUERIES * forward


def fra31_autoattack(directory: str | None):
    if not directory:
        return None
    sys.path.insert(0, directory)
    try:
        from autoattack import AutoAttack  # type: ignore[import-not-found]
    except Exception as error:  # noqa: BLE001 - optional reference
        print(f"fra31/auto-attack unavailable from {directory}: {error}")
        return None
    return AutoAttack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--fra31", default=None, help="path of a fra31/auto-attack checkout")
    parser.add_argument("--cases", default=None, help="comma-separated indices into CASES (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import torchattacks

    original = fra31_autoattack(args.fra31)
    test = digits_split("test")
    x, y = test.x[:args.n].contiguous(), test.y[:args.n]
    chosen = CASES if args.cases is None else [CASES[int(i)] for i in args.cases.split(",")]
    rows = []
    for kind, norm, eps in chosen:
        module = model(kind)
        mut = ModelUnderTest(module, bounds=(0.0, 1.0), name=kind)
        Cascade(eps=eps, norm=norm, suite="quick")(mut, x[:8], y[:8])  # warm-up
        outcome, ours_s = timed(lambda: Cascade(eps=eps, norm=norm)(mut, x, y, seed=0))
        with torch.no_grad():
            correct = module(x).argmax(1) == y
        ours = float((~outcome.success & correct).double().mean())
        big = "Linf" if norm == "linf" else "L2"
        ta = torchattacks.AutoAttack(module, norm=big, eps=eps, version="standard", n_classes=10, seed=0)
        x_ta, ta_s = timed(lambda: ta(x, y))
        row = {"model": kind, "norm": norm, "eps": eps, "robustlab": ours, "torchattacks": robust(module, x_ta, x, y),
               "robustlab_s": ours_s, "torchattacks_s": ta_s, "members": outcome.member_seconds}
        if original is not None:
            reference = original(module, norm=big, eps=eps, version="standard", seed=0, verbose=False, device="cpu")
            x_fr, fr_s = timed(lambda: reference.run_standard_evaluation(x, y, bs=len(x)))
            row.update(fra31=robust(module, x_fr, x, y), fra31_s=fr_s)
        _, apgd_s = timed(lambda: APGD(eps=eps, norm=norm, steps=100)(mut, x, y))
        survivors = ~outcome.success & correct
        row["robust_floor_s"] = robust_floor_seconds(module, x[survivors], y[survivors])
        row["apgd_floor"] = apgd_s / floor_seconds(module, x, y, 101)
        rows.append(row)
        print(row, flush=True)
    print()
    head = "| model | norm | eps | robustlab | torchattacks AA |" + (" fra31 AA |" if original else "") + \
        " robustlab s | torchattacks s | time ratio |" + (" fra31 s | ratio |" if original else "") + " APGD-CE / floor | robust-sample floor s | reference / that floor |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        cells = [r["model"], r["norm"], f"{r['eps']:g}", f"{r['robustlab']:.3f}", f"{r['torchattacks']:.3f}"]
        if original:
            cells.append(f"{r['fra31']:.3f}")
        cells += [f"{r['robustlab_s']:.1f}", f"{r['torchattacks_s']:.1f}", f"{r['robustlab_s'] / r['torchattacks_s']:.2f}x"]
        if original:
            cells += [f"{r['fra31_s']:.1f}", f"{r['robustlab_s'] / r['fra31_s']:.2f}x"]
        cells.append(f"{r['apgd_floor']:.2f}x")
        reference_s = r.get("fra31_s", r["torchattacks_s"])
        cells += [f"{r['robust_floor_s']:.1f}",
                  f"{reference_s / r['robust_floor_s']:.2f}x" if r["robust_floor_s"] else "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
