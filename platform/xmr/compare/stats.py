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

Beside the verdict: whether a held or reversed difference is **smaller than δ** (its whole
interval inside ±δ: real, but below the margin the spec calls practical), the share of
replicates the left side wins, P(A > B), with its Wilson 95% interval, and, for a claim map
whose claim is a trend, a test of the trend (``trend_test``).

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


def smaller_than_margin(diff: PairedDifference, margin: float) -> bool:
    """The whole 95% interval inside (−δ, +δ): a held or reversed difference this small is
    reported as "held, smaller than δ", not as a plain held."""
    return not math.isnan(diff.low) and -margin < diff.low and diff.high < margin


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval of a proportion (``successes`` may be fractional: a tie counts
    half); (nan, nan) without trials."""
    if n <= 0:
        return math.nan, math.nan
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def win_share(left: dict[int, float], right: dict[int, float]) -> dict[str, float]:
    """P(A > B): the share of paired replicates in which ``left`` beats ``right`` (ties count
    half), with its Wilson 95% interval."""
    seeds = [s for s in left if s in right and not math.isnan(left[s]) and not math.isnan(right[s])]
    wins = sum(1.0 if left[s] > right[s] else 0.5 if left[s] == right[s] else 0.0 for s in seeds)
    low, high = wilson_interval(wins, len(seeds))
    return {"p_win": wins / len(seeds) if seeds else math.nan, "p_win_low": low, "p_win_high": high}


@dataclass
class Trend:
    """The slope of the paired differences over the map's levels (per level step), its 95%
    interval and two-sided p-value, and the verdict on the claimed direction."""

    slope: float
    low: float
    high: float
    p: float
    n: int
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)


def trend_test(diffs_by_level: list[list[float]], direction: str) -> Trend:
    """Least-squares slope of every replicate's paired difference against the level's rank
    (0, 1, 2, ...: the levels' order, whatever their spacing), t-tested (scipy's
    ``linregress``): **held** when p < α with the slope in the claimed ``direction``
    ("increasing" or "decreasing"), **reversed** on the other side, otherwise
    **inconclusive**. A verdict per level does not show a trend: "helps at 0, equivalent at
    1.5" can be two draws of one effect."""
    if direction not in ("increasing", "decreasing"):
        raise ValueError(f"trend direction {direction!r}: use increasing or decreasing")
    xs = [float(i) for i, ds in enumerate(diffs_by_level) for d in ds if not math.isnan(d)]
    ys = [float(d) for ds in diffs_by_level for d in ds if not math.isnan(d)]
    if len(set(xs)) < 2 or len(xs) < 3:
        return Trend(math.nan, math.nan, math.nan, math.nan, len(xs), "inconclusive")
    fit = stats.linregress(xs, ys)
    half = float(stats.t.ppf(0.975, df=len(xs) - 2)) * float(fit.stderr)
    p = float(fit.pvalue) if not math.isnan(float(fit.pvalue)) else 1.0
    verdict = "inconclusive"
    if p < ALPHA and fit.slope != 0:
        verdict = "held" if (fit.slope > 0) == (direction == "increasing") else "reversed"
    return Trend(float(fit.slope), float(fit.slope) - half, float(fit.slope) + half, p, len(xs), verdict)
