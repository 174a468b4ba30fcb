#!/usr/bin/env python
"""Cost of the integrity checks: the default audit alone, with default checks, with strict checks.

The default audit is the demo's: robustlab.demo.digits_cnn() on the 450 digits test samples, FGSM,
PGD-20 and CW (5 x 100) at Linf eps 0.05, 0.1, 0.2, seed 0. Each configuration runs `--repeats`
times, interleaved (none, default, strict, none, ...) so slow drifts of a shared machine hit all
of them; the table gives the median wall time and the ratio to the audit without checks (target:
default <= 1.5x). metadata["checks"]["seconds"] (time spent in the checks and the attacks they
added, measured inside the audit) is shown too.

    python bench/checks.py                 # 3 repeats, one thread
    python bench/checks.py --repeats 1 --n 150 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import robustlab
from robustlab import gates
from robustlab.data import digits_split
from robustlab.demo import digits_cnn

LEVELS = ("none", "default", "strict")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n", type=int, default=None, help="first N test samples (default: all 450)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--levels", default=",".join(LEVELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    levels = [lvl.strip() for lvl in args.levels.split(",")]
    model, path = digits_cnn()
    data = digits_split("test").head(args.n)
    times: dict[str, list[float]] = {lvl: [] for lvl in levels}
    inside: dict[str, list[float]] = {lvl: [] for lvl in levels}
    verdicts: dict[str, str] = {}
    for r in range(args.repeats):
        for lvl in levels[r % len(levels):] + levels[:r % len(levels)]:
            started = time.perf_counter()
            result = robustlab.audit(model, data, attacks=("fgsm", "pgd", "cw"), eps=(0.05, 0.1, 0.2), seed=0,
                                     checks=lvl, progress=False)
            times[lvl].append(time.perf_counter() - started)
            inside[lvl].append(float(result.metadata["checks"].get("seconds", 0.0)))
            verdicts[lvl] = gates.verdict(result) or "not run"
    base = statistics.median(times["none"]) if times.get("none") else None
    print(f"robustlab {robustlab.__version__}, torch {torch.__version__}, {args.threads} thread(s), "
          f"n={len(data)}, repeats={args.repeats}, model {path.name}")
    print(f"{'checks':<9}{'median s':>10}{'min s':>8}{'x none':>8}{'in checks s':>13}  verdict")
    for lvl in levels:
        med = statistics.median(times[lvl])
        ratio = f"{med / base:.2f}" if base else "-"
        print(f"{lvl:<9}{med:>10.2f}{min(times[lvl]):>8.2f}{ratio:>8}{statistics.median(inside[lvl]):>13.2f}  "
              f"{verdicts[lvl]}")
    if base and "default" in times:
        ratio = statistics.median(times["default"]) / base
        print(f"RATIO default/none {ratio:.2f} (target <= 1.50: {'met' if ratio <= 1.5 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
