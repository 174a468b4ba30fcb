#!/usr/bin/env python
"""Cost of the audit's explanation stage on the demo model (target: under 30 s on 2 CPU cores).

Runs `robustlab.audit` on the demo CNN with FGSM, PGD and CW at Linf 0.05/0.1/0.2 (the demo's
attacks), with and without `explain="saliency,shap,probes"`, and prints each stage's seconds as the
audit measured them (metadata["explain"]), the stage total, and the audit's time without it.
Saliency and SHAP explain 100 samples (clean + PGD at each eps); probes use every attacked sample.

    python bench/explain.py              # the demo's 450 test samples
    python bench/explain.py --n 150 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from robustlab import audit
from robustlab.data import digits_split
from robustlab.demo import digits_cnn

TARGET_SECONDS = 30.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="test samples (default: all 450)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    module, _ = digits_cnn()
    data = digits_split("test")
    options = dict(attacks=("fgsm", "pgd", "cw"), eps=(0.05, 0.1, 0.2), n=args.n, checks="none", progress=False)
    audit({"demo": module}, data, **dict(options, n=20))  # warm-up (imports, allocator)
    started = time.perf_counter()
    audit({"demo": module}, data, **options)
    plain = time.perf_counter() - started
    started = time.perf_counter()
    result = audit({"demo": module}, data, explain="all", **options)
    with_explain = time.perf_counter() - started
    info = result.metadata["explain"]["demo"]
    stages = info["seconds"]
    total = sum(stages.values())
    print(f"# explanation stage, demo CNN, {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"samples explained: saliency {info['samples'].get('saliency')}, shap {info['samples'].get('shap')}, "
          f"probes {info['samples'].get('probes')}; adversarial sets: {', '.join(info['keys'])}")
    for stage, seconds in stages.items():
        print(f"  {stage:<9} {seconds:7.2f} s")
    print(f"  {'total':<9} {total:7.2f} s   target < {TARGET_SECONDS:g} s: {'met' if total < TARGET_SECONDS else 'NOT met'}")
    print(f"audit without explanations {plain:.2f} s, with {with_explain:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
