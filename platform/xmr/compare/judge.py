"""Verdicts of a comparison from its runs (one per level, variant and replicate): each
variant's interval, every claim's paired difference with its verdict, whether a held or
reversed difference is smaller than δ, P(A > B) over replicates, and, for a claim map that
claims a trend, the trend test (statistics in ``xmr.compare.stats``)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from xmr.compare.results import metric_columns
from xmr.compare.spec import ComparisonSpec
from xmr.compare.stats import (PairedDifference, holm, paired_difference, smaller_than_margin, t_interval,
                               trend_test, verdict, win_share)


def _at(runs: pd.DataFrame, level: Any) -> pd.DataFrame:
    return runs if level is None else runs[runs["level"].astype(str) == str(level)]


def summarise(spec: ComparisonSpec, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (level, variant): runs ok / failed, the cap, epochs, and each metric's
    mean, SD and 95% interval over replicates."""
    rows = []
    for level in spec.levels:
        at = _at(runs, level)
        for name in spec.variants:
            mine = at[at["variant"] == name]
            sub, failed = mine[mine["status"] == "ok"], mine[mine["status"] == "failed"]
            row: dict[str, Any] = {"level": level, "variant": name, "n_ok": len(sub), "n_failed": len(failed),
                                   "error": failed["error"].iloc[0] if len(failed) else None,
                                   "cap": int(mine["cap"].max()) if len(mine) else None,
                                   "extended": int(mine["extended"].max()) if len(mine) else 0,
                                   "n_peaked_at_cap": int(mine["peaked_at_cap"].sum()) if len(mine) else 0}
            for col in ("epochs", "best_epoch"):
                vals = sub[col].dropna() if col in sub else pd.Series([], dtype=float)
                row[f"{col}_min"] = int(vals.min()) if len(vals) else None
                row[f"{col}_max"] = int(vals.max()) if len(vals) else None
            for col in metric_columns(runs):
                mean, std, low, high = t_interval(sub[col].tolist()) if col in sub else (math.nan,) * 4
                row.update({f"{col}_mean": mean, f"{col}_std": std, f"{col}_ci_low": low, f"{col}_ci_high": high})
            rows.append(row)
    return pd.DataFrame(rows)


def _by_replicate(at: pd.DataFrame, name: str, metric: str) -> dict[int, float]:
    sub = at[(at["variant"] == name) & (at["status"] == "ok")]
    return dict(zip(sub["seed"].astype(int), sub[metric].astype(float))) if metric in sub else {}


def judge(spec: ComparisonSpec, runs: pd.DataFrame) -> list[dict[str, Any]]:
    """Every claim at every level: the mean paired (by replicate) difference of the main
    metric, its 95% interval, its p-value raw and Holm-adjusted across the spec's tests, the
    verdict, ``small`` (held or reversed, but the whole interval inside ±δ), P(A > B) with
    its interval, and which side did not converge."""
    out = []
    m = spec.metric
    for level in spec.levels:
        here = _at(runs, level)
        for left, op, right in spec.claims:
            a, b = _by_replicate(here, left, m), _by_replicate(here, right, m)
            diff = paired_difference(a, b)
            capped = sorted(n for n in (left, right) if here[here["variant"] == n]["peaked_at_cap"].any())
            out.append({"claim": f"{left} {op} {right}", "level": level, "metric": m, **diff.to_dict(),
                        # P(the claimed side wins a replicate): A > B, or B > A for "A < B"
                        **(win_share(a, b) if op == ">" else win_share(b, a)),
                        "left": float(pd.Series(a).mean()) if a else math.nan,
                        "right": float(pd.Series(b).mean()) if b else math.nan,
                        "not_converged": ", ".join(capped)})
    for cl, p_holm in zip(out, holm([cl["p"] for cl in out])):
        d = PairedDifference(cl["n"], cl["mean"], cl["sd"], cl["low"], cl["high"], cl["p"], cl["seeds"])
        cl["p_holm"] = p_holm
        cl["margin"] = spec.equivalence_margin
        cl["verdict"] = verdict(d, ">" if " > " in cl["claim"] else "<", p_holm, spec.equivalence_margin)
        cl["small"] = cl["verdict"] in ("held", "reversed") and smaller_than_margin(d, spec.equivalence_margin)
    return out


def trends(spec: ComparisonSpec, runs: pd.DataFrame) -> list[dict[str, Any]]:
    """For a claim map with ``trend``: each claim's paired differences against the levels'
    order, one slope test per claim (its own family: the per-level verdicts answer "where",
    the trend answers "does it grow")."""
    if spec.map is None or not spec.map.trend:
        return []
    out = []
    for left, op, right in spec.claims:
        per_level = []
        for level in spec.levels:
            here = _at(runs, level)
            a, b = _by_replicate(here, left, spec.metric), _by_replicate(here, right, spec.metric)
            per_level.append([a[s] - b[s] for s in sorted(a) if s in b and not math.isnan(a[s] - b[s])])
        t = trend_test(per_level, spec.map.trend)
        out.append({"claim": f"{left} {op} {right}", "trend": spec.map.trend, **t.to_dict()})
    return out
