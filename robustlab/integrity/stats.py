"""Small exact statistics for the checks (standard library only: reports and gates stay torch-free).

The checks compare two attacks on the same points, so the natural test is McNemar's: among the
points exactly one of the two attacks broke, count how many each broke (b, c); under "neither is
stronger" b ~ Binomial(b + c, 1/2). `sign_test_p` is that one-sided exact p-value. Rates measured
on a subset use Wilson's score interval, which behaves at 0 and 1 where the normal one does not.
"""

from __future__ import annotations

import math
from fractions import Fraction

from robustlab import verdicts


def sign_test_p(b: int, c: int) -> float:
    """One-sided exact McNemar p-value: P(X >= b) for X ~ Binomial(b + c, 1/2)."""
    n = b + c
    if n == 0 or b <= 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(b, n + 1))
    return float(Fraction(tail, 2 ** n))


def wilson(successes: int, n: int, z: float = 2.576) -> tuple[float, float]:
    """Wilson score interval of a binomial rate (default z: 99% two-sided, the checks' level;
    the formula is robustlab.verdicts.wilson's, whose default is the verdicts' 95%)."""
    return verdicts.wilson(successes, n, z)
