"""The statistics of a comparison: per-variant t-intervals over seeds, and the verdict on a
claimed ordering from the *paired* differences (the same seed gives both variants the same
data order and, where shapes allow, the same initial weights).

A claim ``left > right`` is **held** when the 95% interval of the mean paired difference
lies above 0, **reversed** when it lies below 0, and **inconclusive** otherwise. Beside it
the report states the smallest difference the design could detect: for a two-sided paired
t-test at level α with power 1 − β and the observed spread of the differences,
(t_{1−α/2, n−1} + t_{1−β, n−1}) · sd / √n.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

VERDICTS = ("held", "reversed", "inconclusive")


def _clean(values) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)


def t_interval(values, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, sample std, low, high) of ``values``; with one value the interval is undefined (nan)."""
    x = _clean(values)
    if len(x) == 0:
        return (math.nan,) * 4  # type: ignore[return-value]
    mean = float(x.mean())
    if len(x) == 1:
        return mean, math.nan, math.nan, math.nan
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=len(x) - 1)) * std / math.sqrt(len(x))
    return mean, std, mean - half, mean + half


def detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference a paired t-test of ``n`` pairs with this spread of
    differences detects with the given power (nan with fewer than 2 pairs)."""
    if n < 2 or math.isnan(sd):
        return math.nan
    return (float(stats.t.ppf(1 - alpha / 2, n - 1)) + float(stats.t.ppf(power, n - 1))) * sd / math.sqrt(n)


def seeds_to_detect(mean: float, sd: float, alpha: float = 0.05, power: float = 0.8, most: int = 1000) -> int | None:
    """How many paired seeds a design needs before ``detectable_difference`` (same spread)
    falls to ``|mean|``: the budget at which an observed difference of this size would be
    told from 0 with the given power. None when no difference was seen or it needs more
    than ``most``."""
    if math.isnan(mean) or math.isnan(sd) or mean == 0:
        return None
    if sd == 0:
        return 2
    for n in range(2, most + 1):
        if detectable_difference(sd, n, alpha, power) <= abs(mean):
            return n
    return None


@dataclass
class PairedDifference:
    """left − right over the seeds both finished."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    detectable: float
    seeds: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def paired_difference(left: dict[int, float], right: dict[int, float], confidence: float = 0.95) -> PairedDifference:
    """``left`` and ``right`` map seed -> metric; only seeds both have are paired."""
    seeds = sorted(s for s in left if s in right and not math.isnan(left[s]) and not math.isnan(right[s]))
    d = np.asarray([left[s] - right[s] for s in seeds], dtype=np.float64)
    mean, sd, low, high = t_interval(d, confidence)
    return PairedDifference(len(d), mean, sd, low, high, detectable_difference(sd, len(d), 1 - confidence), seeds)


def verdict(diff: PairedDifference, op: str) -> str:
    """``op`` is the claimed sign of left − right: ">" or "<"."""
    if op not in (">", "<"):
        raise ValueError(f"claim operator {op!r}: use > or <")
    if diff.n < 2 or math.isnan(diff.low):
        return "inconclusive"
    above, below = diff.low > 0, diff.high < 0
    if op == "<":
        above, below = below, above
    return "held" if above else "reversed" if below else "inconclusive"
