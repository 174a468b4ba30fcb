#!/usr/bin/env python
"""Square attack: robustlab against ART's SquareAttack (if `art` imports), and against PGD-20.

Same model (robustlab's demo digits CNN, eval mode, parameters frozen), same correctly classified
test samples, same eps and query budget. ART's `max_iter` counts iterations after its one init
query, so it is given queries - 1 (robustlab's `queries` includes the init). Prints robust accuracy
(fresh forward on each returned batch, judged here, not by the library), mean queries and seconds.
Not part of the test suite: `python bench/square.py [--queries 1000] [--n 200] [--threads 1]`.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from robustlab.attacks import PGD, Square
from robustlab.data import digits_split
from robustlab.model import ModelUnderTest


def robust_accuracy(module: torch.nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((module(x_adv).argmax(1) == y).double().mean())


def run_art(module, x, y, norm: str, eps: float, queries: int, p_init: float) -> tuple[float, float] | None:
    try:
        from art.attacks.evasion import SquareAttack
        from art.estimators.classification import PyTorchClassifier
    except Exception as error:  # noqa: BLE001 - ART is optional, installed without its dependencies
        print(f"  ART unavailable ({type(error).__name__}: {error})")
        return None
    logging.getLogger("art").setLevel(logging.WARNING)
    classifier = PyTorchClassifier(model=module, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                   nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")
    attack = SquareAttack(classifier, norm=np.inf if norm == "linf" else 2, eps=eps, max_iter=queries - 1,
                          p_init=p_init, nb_restarts=1, batch_size=len(x), verbose=False)
    np.random.seed(0)
    started = time.perf_counter()
    x_adv = attack.generate(x=x.numpy(), y=y.numpy())
    seconds = time.perf_counter() - started
    return robust_accuracy(module, torch.from_numpy(x_adv), y), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--n", type=int, default=200, help="correctly classified test samples")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--norms", default="linf,l2")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from robustlab.demo import digits_cnn
    module, _ = digits_cnn()
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    data = digits_split("test")
    with torch.no_grad():
        correct = module(data.x).argmax(1) == data.y
    x = data.x[correct][: args.n].clone()  # clone: standard NCHW strides (see bench/README.md)
    y = data.y[correct][: args.n].clone()
    model = ModelUnderTest(module, bounds=(0.0, 1.0), name="digits-cnn")
    print(f"digits CNN, {len(x)} correctly classified test samples, {args.queries} queries, "
          f"{args.threads} thread(s)")
    print(f"{'norm':5} {'eps':>5} {'method':22} {'robust acc':>10} {'mean queries':>12} {'seconds':>8}")
    for norm in args.norms.split(","):
        eps = 0.1 if norm == "linf" else 0.8
        p_init = 0.05 if norm == "linf" else 0.1
        pgd = PGD(eps=eps, norm=norm, steps=20)(model, x, y)
        print(f"{norm:5} {eps:5g} {'robustlab PGD-20':22} {robust_accuracy(module, pgd.x_adv, y):10.3f} "
              f"{'-':>12} {pgd.seconds:8.2f}")
        square = Square(eps=eps, norm=norm, queries=args.queries, p_init=p_init)(model, x, y)
        print(f"{norm:5} {eps:5g} {'robustlab Square':22} {robust_accuracy(module, square.x_adv, y):10.3f} "
              f"{square.gradient_calls / len(x):12.1f} {square.seconds:8.2f}")
        art = run_art(module, x, y, norm, eps, args.queries, p_init)
        if art is not None:
            print(f"{norm:5} {eps:5g} {'ART SquareAttack':22} {art[0]:10.3f} {'n/a':>12} {art[1]:8.2f}")


if __name__ == "__main__":
    main()
