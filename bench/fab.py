#!/usr/bin/env python
"""What FAB-T adds after APGD-CE and APGD-T: samples it breaks that they miss, and what it costs.

For each (PGD-trained digits CNN, norm, eps), on the first --n test samples, in one process:
1. APGD-CE, then APGD-T on what APGD-CE left: the first two members of robustlab's standard cascade
   (attacks.cascade.members("standard", norm)), seed 0, run member by member as the cascade does;
2. on the samples both missed (robust so far): robustlab's FAB-T (attacks.fab.FABT, AutoAttack's
   settings: 9 targets, 100 steps) at that eps, timed (after a warm-up), and the reference
   torchattacks.FAB (multi-targeted, same settings) on the same samples, timed;
3. Square (the cascade's third member, 5000 queries) on the same samples, so the table says how
   many of FAB-T's samples the cascade would have broken anyway, and the time Square saves when
   it only runs on what FAB-T left.
Success is judged here by a fresh forward pass of the bare module (reference outputs included).

Models as in tests/test_attack_cascade.py: `adversarial_training(seeded_init(DigitsCNN, 1), method
="pgd", eps=0.2 (Linf) / 1.0 (L2), steps=7, epochs=15, seed=1)` trained on one thread, cached under
$ROBUSTLAB_CACHE/bench/. Not part of the test suite:

    python bench/fab.py [--n 300] [--threads 1] [--extra] [--no-square] [--no-reference]

On a busy 2-core machine use --threads 1: two OpenMP threads ran these small batches up to 15x
slower (see tests/conftest.py); the CPU seconds printed beside the wall times are steadier.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from robustlab.attacks import FABT
from robustlab.attacks.cascade import members
from robustlab.data import digits_split
from robustlab.demo import cache_dir, digits_cnn
from robustlab.model import ModelUnderTest
from robustlab.training import seeded_init
from robustlab.zoo import DigitsCNN

CASES = [("pgd-at-linf", "linf", 0.1), ("pgd-at-linf", "linf", 0.2), ("pgd-at-l2", "l2", 0.5),
         ("pgd-at-l2", "l2", 1.0)]
# --extra: the undefended CNN, and defensive distillation at T = 100 (saturated softmax, where CE
# gradients vanish; FAB's step uses logit differences over their gradient, which do not).
EXTRA_CASES = [("undefended", "linf", 0.1), ("undefended", "linf", 0.2), ("undefended", "l2", 0.5),
               ("undefended", "l2", 1.0), ("distilled", "linf", 0.1), ("distilled", "linf", 0.2)]


def model(kind: str) -> torch.nn.Module:
    """The PGD-trained CNNs of tests/test_attack_cascade.py, the distilled one of
    tests/integrity_zoo.py (each trained on one thread, as there), or the undefended demo CNN."""
    from safetensors.torch import load_file, save_file

    from robustlab.defenses import adversarial_training, distill

    path = cache_dir() / "bench" / f"{kind}-one-thread-v1.safetensors"
    module = seeded_init(DigitsCNN, 0 if kind == "distilled" else 1)
    if kind == "undefended":
        module = digits_cnn()[0]
    elif path.exists():
        module.load_state_dict(load_file(str(path)))
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if kind == "distilled":
                module = distill(module, digits_split("train"), temperature=100.0, epochs=8, teacher_epochs=8, seed=0)
            else:
                norm, eps = ("linf", 0.2) if kind == "pgd-at-linf" else ("l2", 1.0)
                module = adversarial_training(module, digits_split("train"), method="pgd", eps=eps, norm=norm,
                                              steps=7, epochs=15, seed=1)
        finally:
            torch.set_num_threads(threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def timed_cpu(fn):
    """(result, wall seconds, CPU seconds of this process): on a shared machine the CPU time is the
    steadier measure of the work done (with --threads 1 it is the work)."""
    cpu = time.process_time()
    out, wall = timed(fn)
    return out, wall, time.process_time() - cpu


def fooled(module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x_adv).argmax(1) != y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cases", default=None, help="comma-separated indices into CASES (default: all)")
    parser.add_argument("--extra", action="store_true", help="the undefended and distilled CNNs instead of CASES")
    parser.add_argument("--no-square", action="store_true", help="skip the Square-5000 comparison")
    parser.add_argument("--no-reference", action="store_true", help="skip torchattacks.FAB")
    args = parser.parse_args()
    test = digits_split("test")
    x, y = test.x[:args.n].contiguous(), test.y[:args.n]
    ids = torch.arange(len(x))
    cases = EXTRA_CASES if args.extra else CASES
    chosen = cases if args.cases is None else [cases[int(i)] for i in args.cases.split(",")]
    rows = []
    for kind, norm, eps in chosen:
        module = model(kind)
        torch.set_num_threads(args.threads)
        mut = ModelUnderTest(module, bounds=(0.0, 1.0), name=kind)
        with torch.no_grad():
            correct = module(x).argmax(1) == y
        standard = {m.name: m.replace(eps=eps) for m in members("standard", norm)}
        remaining = ids
        seconds = {}
        for name in ("apgd-ce", "apgd-t"):
            outcome, seconds[name] = timed(lambda: standard[name](mut, x[remaining], y[remaining],
                                                                sample_ids=remaining, seed=0))
            remaining = remaining[~outcome.success]
        xr, yr = x[remaining], y[remaining]
        if len(remaining) == 0:
            print({"model": kind, "norm": norm, "eps": eps, "remaining": 0}, flush=True)
            continue
        fab = FABT(eps=eps, norm=norm)
        fab.replace(steps=2)(mut, xr[:4], yr[:4])  # warm-up
        ours, ours_s, ours_cpu = timed_cpu(lambda: fab(mut, xr, yr, sample_ids=remaining, seed=0))
        row = {"model": kind, "norm": norm, "eps": eps, "clean": float(correct.double().mean()),
               "after_apgd": len(remaining) / len(x), "remaining": len(remaining),
               "fab_broken": int(ours.success.sum()), "fab_s": ours_s, "fab_cpu_s": ours_cpu,
               "apgd_ce_s": seconds["apgd-ce"],
               "apgd_t_s": seconds["apgd-t"]}
        if not args.no_reference:
            import torchattacks

            reference = torchattacks.FAB(module, norm="Linf" if norm == "linf" else "L2", eps=eps, steps=100,
                                         n_restarts=1, multi_targeted=True, n_classes=10)
            x_ref, ref_s, ref_cpu = timed_cpu(lambda: reference(xr, yr))
            row.update(reference_broken=int(fooled(module, x_ref, yr).sum()), reference_s=ref_s,
                       reference_cpu_s=ref_cpu)
        if not args.no_square:
            square, square_s = timed(lambda: standard["square"](mut, xr, yr, sample_ids=remaining, seed=0))
            left = ~ours.success
            after, after_s = timed(lambda: standard["square"](mut, xr[left], yr[left], sample_ids=remaining[left],
                                                              seed=0))
            row.update(square_broken=int(square.success.sum()), square_s=square_s,
                       fab_only=int((ours.success & ~square.success).sum()),
                       square_only=int((square.success & ~ours.success).sum()),
                       square_after_fab_broken=int(after.success.sum()), square_after_fab_s=after_s,
                       robust_without_fab=(len(remaining) - int(square.success.sum())) / len(x),
                       robust_with_fab=(len(remaining) - int(ours.success.sum()) - int(after.success.sum())) / len(x))
        rows.append(row)
        print(row, flush=True)
    print()
    head = ("| model | norm | eps | robust after APGD-CE + APGD-T | FAB-T breaks | FAB-T s (CPU s) "
            "| torchattacks FAB breaks | its s (CPU s) | Square breaks | FAB-T only | Square only "
            "| robust: cascade / + FAB-T before Square |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        cells = [r["model"], r["norm"], f"{r['eps']:g}", f"{r['after_apgd']:.3f} ({r['remaining']})",
                 f"{r['fab_broken']}", f"{r['fab_s']:.1f} ({r['fab_cpu_s']:.1f})", f"{r.get('reference_broken', '-')}",
                 f"{r['reference_s']:.1f} ({r['reference_cpu_s']:.1f})" if "reference_s" in r else "-",
                 f"{r.get('square_broken', '-')}",
                 f"{r.get('fab_only', '-')}", f"{r.get('square_only', '-')}",
                 f"{r['robust_without_fab']:.3f} / {r['robust_with_fab']:.3f}" if "robust_with_fab" in r else "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
