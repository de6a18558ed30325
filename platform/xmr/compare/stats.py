"""The statistics of a comparison: per-variant t-intervals over seeds, and the verdict on a
claimed ordering from the *paired* differences (the same seed gives both variants the same
data order and, where shapes allow, the same initial weights).

Four verdicts on a claim ``left > right`` with equivalence margin δ:

- **held**: the paired t-test's p-value, Holm-adjusted across the spec's (claim, level)
  tests, is below α = 0.05 and the mean difference is on the claimed side;
- **reversed**: the same, on the other side;
- **equivalent**: not held or reversed, and the whole 95% interval of the mean difference
  lies inside (−δ, +δ): two one-sided tests (TOST), each at 2.5%, reject a difference of δ
  or more, so the variants are the same within the margin the spec names;
- **inconclusive**: neither: too noisy to tell a difference from none at this budget.

Holm's step-down correction controls the chance of *any* false held / reversed across a
spec's tests at α, whatever their dependence; it is applied to the difference tests, not
to the equivalence tests (which use the plain 95% interval, stricter than TOST's usual
90%). A post-hoc "seeds needed to detect the observed difference" figure is not computed:
it is a function of the observed p-value and adds nothing a reader can rely on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

VERDICTS = ("held", "reversed", "equivalent", "inconclusive")
ALPHA = 0.05
# δ: a difference smaller than this many units of the metric (mAP, recall: 2 points) is
# treated as no practical difference. Chosen before any rerun, as the smallest gain the
# papers' own tables report as an improvement; a spec sets its own with equivalence_margin.
DEFAULT_EQUIVALENCE_MARGIN = 0.02


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


def t_test_p(mean: float, sd: float, n: int) -> float:
    """Two-sided p-value of the one-sample t-test of mean = 0 (the paired t-test on the
    differences); every difference equal: 1 when they are 0, 0 otherwise; nan below 2 pairs."""
    if n < 2 or math.isnan(mean) or math.isnan(sd):
        return math.nan
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    t = mean / (sd / math.sqrt(n))
    return float(2 * stats.t.sf(abs(t), df=n - 1))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (nan stays nan and is not counted as a test)."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    m, out, running = len(order), [math.nan] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


@dataclass
class PairedDifference:
    """left − right over the seeds both finished."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    p: float
    seeds: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def paired_difference(left: dict[int, float], right: dict[int, float], confidence: float = 0.95) -> PairedDifference:
    """``left`` and ``right`` map seed -> metric; only seeds both have are paired."""
    seeds = sorted(s for s in left if s in right and not math.isnan(left[s]) and not math.isnan(right[s]))
    d = np.asarray([left[s] - right[s] for s in seeds], dtype=np.float64)
    mean, sd, low, high = t_interval(d, confidence)
    return PairedDifference(len(d), mean, sd, low, high, t_test_p(mean, sd, len(d)), seeds)


def verdict(diff: PairedDifference, op: str, p_adjusted: float | None = None,
            margin: float = DEFAULT_EQUIVALENCE_MARGIN) -> str:
    """``op`` is the claimed sign of left − right: ">" or "<"; ``p_adjusted`` is this test's
    Holm-adjusted p-value (default: its own, i.e. a family of one)."""
    if op not in (">", "<"):
        raise ValueError(f"claim operator {op!r}: use > or <")
    if not margin > 0:
        raise ValueError(f"equivalence margin {margin!r}: must be > 0")
    if diff.n < 2 or math.isnan(diff.low):
        return "inconclusive"
    p = diff.p if p_adjusted is None else p_adjusted
    if p < ALPHA and diff.mean != 0:
        claimed = diff.mean > 0 if op == ">" else diff.mean < 0
        return "held" if claimed else "reversed"
    if -margin < diff.low and diff.high < margin:
        return "equivalent"
    return "inconclusive"
