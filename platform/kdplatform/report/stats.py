"""Is a difference between two methods larger than seed noise? The mean per-seed difference with a 95%
confidence interval from the t distribution (scipy).

Paired by seed when both sides ran the same seeds (the usual case in a sweep: same data order and student
init per seed), Welch's unequal-variance interval otherwise. Fewer than two values on a side: no interval.

>>> d = seed_difference({42: 0.80, 43: 0.82, 44: 0.81}, {42: 0.78, 43: 0.79, 44: 0.785})
>>> round(d.diff, 4), d.paired, d.n, d.excludes_zero
(0.025, True, 3, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Difference:
    diff: float  # mean of (other - baseline) per seed when paired, difference of the means otherwise
    low: float  # interval bounds; nan when there is no interval
    high: float
    n: int  # pairs when paired, else the smaller side's count
    paired: bool

    @property
    def excludes_zero(self) -> bool:
        return not math.isnan(self.low) and (self.low > 0 or self.high < 0)


def seed_difference(other: dict[int, float], baseline: dict[int, float]) -> Difference:
    """Difference `other - baseline` of two {seed: value} maps, with its 95% interval (see module doc)."""
    from scipy import stats

    nan = float("nan")
    if other and set(other) == set(baseline):
        seeds = sorted(other)
        a, b = [other[s] for s in seeds], [baseline[s] for s in seeds]
        diff = sum(x - y for x, y in zip(a, b)) / len(seeds)
        if len(seeds) < 2:
            return Difference(diff, nan, nan, len(seeds), True)
        if all(math.isclose(x - y, diff, rel_tol=1e-9, abs_tol=1e-9) for x, y in zip(a, b)):
            return Difference(diff, diff, diff, len(seeds), True)  # equal differences: a zero-width interval
        ci = stats.ttest_rel(a, b).confidence_interval(CONFIDENCE)
        return Difference(diff, float(ci.low), float(ci.high), len(seeds), True)
    a, b = list(other.values()), list(baseline.values())
    if not a or not b:
        return Difference(nan, nan, nan, 0, False)
    diff = sum(a) / len(a) - sum(b) / len(b)
    if min(len(a), len(b)) < 2:
        return Difference(diff, nan, nan, min(len(a), len(b)), False)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(CONFIDENCE)
    return Difference(diff, float(ci.low), float(ci.high), min(len(a), len(b)), False)
