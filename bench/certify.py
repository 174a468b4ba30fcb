#!/usr/bin/env python
"""Certification time per sample (IBP, CROWN, randomised smoothing) against the attack cascade's.

Same model (robustlab's demo digits CNN, eval mode), same correctly classified test samples. IBP
and CROWN certify at Linf eps and at L2 eps; randomised smoothing certifies the smoothed CNN
(sigma, n0 = 100, n = 10,000 draws, alpha = 0.001) at L2 eps. The standard cascade (APGD-CE,
APGD-T x9, Square-5000) runs at the same eps and norm. Defaults: Linf 0.01 and L2 0.05, where
CROWN certifies most samples of this undefended CNN and IBP almost none. Prints seconds per
sample, certified / robust accuracy (the bracket) and each method's time over the cascade's.
Not part of the test suite: `python bench/certify.py [--n 20] [--threads 2] [--device cpu]`.
"""

from __future__ import annotations

import argparse
import time

import torch

import robustlab
from robustlab.attacks import Cascade
from robustlab.certify import certify
from robustlab.data import digits_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="correctly classified test samples")
    ap.add_argument("--linf-eps", type=float, default=0.01)
    ap.add_argument("--l2-eps", type=float, default=0.05)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--draws", type=int, default=10_000, help="smoothing's n")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from robustlab.demo import digits_cnn
    module, _ = digits_cnn()
    module.eval().to(args.device)
    data = digits_split("test")
    with torch.no_grad():
        correct = module(data.x.to(args.device)).argmax(1).cpu() == data.y
    x, y = data.x[correct][: args.n], data.y[correct][: args.n]
    mut = robustlab.wrap(module, bounds=(0.0, 1.0))
    print(f"digits CNN, {len(x)} correctly classified test samples, {args.threads} threads, {args.device}")

    rows: list[tuple[str, str, float, float, float]] = []  # method, norm, eps, seconds, accuracy

    def attack(norm: str, eps: float) -> float:
        started = time.perf_counter()
        outcome = Cascade(eps=eps, norm=norm)(mut, x, y)
        seconds = time.perf_counter() - started
        rows.append(("cascade", norm, eps, seconds, 1 - float(outcome.success.double().mean())))
        return seconds

    def cert(method: str, norm: str, eps: float, **options) -> float:
        started = time.perf_counter()
        outcome = certify(mut, x, y, eps=eps, norm=norm, method=method, **options)
        seconds = time.perf_counter() - started
        rows.append((method, norm, eps, seconds, outcome.certified_accuracy))
        return seconds

    certify(mut, x[:2], y[:2], eps=args.linf_eps, method="crown")  # warm-up: imports, tracing, kernels
    cascade = {"linf": attack("linf", args.linf_eps), "l2": attack("l2", args.l2_eps)}
    budgets = (("linf", args.linf_eps), ("l2", args.l2_eps))
    timed = [(method, norm, eps, cert(method, norm, eps)) for norm, eps in budgets for method in ("ibp", "crown")]
    timed.append(("smoothing", "l2", args.l2_eps, cert("smoothing", "l2", args.l2_eps, sigma=args.sigma,
                                                        n=args.draws)))

    print(f"\n{'method':<16}{'norm':<6}{'eps':>7}{'s/sample':>11}{'accuracy':>10}  "
          "(certified; robust for the cascade)")
    for method, norm, eps, seconds, accuracy in rows:
        name = method if method != "smoothing" else f"smooth s={args.sigma:g}"
        print(f"{name:<16}{norm:<6}{eps:>7.3g}{seconds / len(x):>11.4f}{accuracy:>10.3f}")
    print()
    for method, norm, eps, seconds in timed:
        print(f"RATIO {method}/cascade {norm} eps {eps:g}: {seconds / cascade[norm]:.3g}x")


if __name__ == "__main__":
    main()
