"""Smoke test of the speed benchmark: it runs end to end and prints its ratio lines.

Speed itself is not asserted (a shared CI machine cannot promise timings); bench/RESULTS.md holds
the measured figures.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_digits_foolbox_runs():
    proc = subprocess.run(
        [sys.executable, "bench/attacks.py", "--quick", "--models", "digits", "--peers", "foolbox"],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ratio_lines = [line for line in proc.stdout.splitlines() if line.startswith("RATIO ")]
    assert ratio_lines, proc.stdout[-2000:]
    assert any("robustlab/floor" in line and "x" in line for line in ratio_lines)
