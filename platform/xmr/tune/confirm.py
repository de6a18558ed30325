"""Confirming a sweep's winner: which trials are retrained with new seeds, and which of them
wins by its mean over those seeds.

The search's best trial is the best single-seed validation score among N; the maximum of N
noisy scores overstates the winner (the winner's curse). So the top configurations are
trained again with seeds the search did not use, and the winner is the one with the best
mean over them; its 95% t-interval says how sure that mean is, and the paired difference
of the top two (same seeds) says whether they can be told apart at all. Pure functions:
``xmr.tune.sweep.run_confirmation`` runs the retraining, ``xmr.tune.report`` writes this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from xmr.compare.stats import paired_difference, t_interval

CONFIDENCE = 0.95


def pareto_front(table: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """Trials no other trial beats on both the metric and the training time per epoch."""
    ok = table[table["error"].isna() & table[metric].notna() & table["train_s_per_epoch"].notna()]
    sign = 1.0 if mode == "max" else -1.0
    front = []
    for i, r in ok.iterrows():
        dominated = any((sign * o[metric] >= sign * r[metric]) and (o["train_s_per_epoch"] <= r["train_s_per_epoch"])
                        and ((sign * o[metric] > sign * r[metric]) or (o["train_s_per_epoch"] < r["train_s_per_epoch"]))
                        for j, o in ok.iterrows() if j != i)
        if not dominated:
            front.append(i)
    return ok.loc[front].sort_values("train_s_per_epoch")


def candidates(table: pd.DataFrame, metric: str, mode: str, top: int, multi_objective: bool = False) -> list[str]:
    """The trials to confirm, best search score first: the ``top`` best of the trials that ran
    all their epochs (a pruned trial's score is an early one; all trials when none finished),
    or with several objectives every member of the Pareto front."""
    ok = table[table["error"].isna() & table[metric].notna()]
    if multi_objective:
        pool = pareto_front(ok, metric, mode)
    else:
        finished = ok[~ok["pruned"].astype(bool)]
        pool = (finished if len(finished) else ok).head(len(ok))
    ranked = pool.sort_values(metric, ascending=(mode == "min"), kind="stable")
    return [str(t) for t in (ranked["trial"] if multi_objective else ranked["trial"].head(top))]


@dataclass
class Confirmation:
    """Per candidate (best mean first): its seeds' values, mean and interval; the winner, the
    runner-up and whether the two can be told apart (their paired difference's interval
    excludes 0)."""

    metric: str
    mode: str
    summary: pd.DataFrame  # candidate, search_value, n, mean, std, low, high, best_run, best_run_value, checkpoint, seed values
    values: dict[str, dict[int, float]] = field(default_factory=dict)
    winner: str | None = None
    runner_up: str | None = None
    difference: dict[str, Any] | None = None  # winner − runner-up over their shared seeds
    told_apart: bool = False

    def lines(self) -> list[str]:
        """What the console and the README say: the winner, its interval, and the verdict on the top two."""
        if self.winner is None:
            return ["[xmr] confirmation: no confirmation run finished; best.json follows the search's best trial"]
        w = self.summary.set_index("candidate").loc[self.winner]
        seeds = sorted(self.values.get(self.winner, {}))
        out = [f"[xmr] confirmed winner {self.winner}: {self.metric} {_interval(w['mean'], w['low'], w['high'])} "
               f"over seeds {', '.join(map(str, seeds))} (its search score {w['search_value']:.4f} is not counted)"]
        if self.runner_up is None:
            return out
        d = self.difference or {}
        diff = (f"{self.winner} − {self.runner_up} = {d.get('mean', math.nan):+.4f} "
                f"(95% CI {_signed(d.get('low'))} to {_signed(d.get('high'))}, {d.get('n', 0)} paired seeds)")
        if self.told_apart:
            out.append(f"[xmr] the top two can be told apart: {diff}")
        elif d.get("n", 0) < 2:
            out.append(f"[xmr] the top two cannot be told apart: fewer than 2 shared seeds give no interval "
                       f"({self.winner} {w['mean']:.4f} vs {self.runner_up})")
        else:
            out.append(f"[xmr] the top two cannot be told apart: {diff} contains 0; {self.winner} is kept for its "
                       f"higher mean, but {self.runner_up} may be as good")
        return out


def _signed(v: Any) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.4f}"


def _interval(mean: float, low: float, high: float) -> str:
    if isinstance(low, float) and math.isnan(low):
        return f"mean {mean:.4f} (one seed: no interval)"
    return f"mean {mean:.4f} (95% CI {low:.4f} to {high:.4f})"


def summarize(runs: pd.DataFrame, names: list[str], metric: str, mode: str,
              search_values: dict[str, float] | None = None) -> Confirmation:
    """``runs``: one row per confirmation run (candidate, seed, ``metric`` = the run's best
    validation value, error, trial, checkpoint). The winner is the candidate with the best
    mean over its seeds; ties in the mean keep the search's order (``names``)."""
    search_values = search_values or {}
    ok = runs[runs["error"].isna() & runs[metric].notna()] if len(runs) else runs
    sign = 1.0 if mode == "max" else -1.0
    rows, values = [], {}
    for order, name in enumerate(names):
        mine = ok[ok["candidate"] == name] if len(ok) else ok
        by_seed = {int(s): float(v) for s, v in zip(mine["seed"], mine[metric])} if len(mine) else {}
        values[name] = by_seed
        mean, std, low, high = t_interval(list(by_seed.values()), CONFIDENCE)
        best = mine.loc[(sign * mine[metric]).idxmax()] if len(mine) else None
        row = {"candidate": name, "search_value": search_values.get(name, math.nan), "n": len(by_seed),
               "mean": mean, "std": std, "low": low, "high": high,
               "best_run": None if best is None else str(best["trial"]),
               "best_run_value": math.nan if best is None else float(best[metric]),
               "checkpoint": None if best is None or "checkpoint" not in best else best["checkpoint"],
               "_order": order}
        row.update({f"seed_{s}": v for s, v in sorted(by_seed.items())})
        rows.append(row)
    summary = pd.DataFrame(rows)
    key = summary["mean"].map(lambda m: -math.inf if math.isnan(m) else sign * m)
    summary = summary.assign(_key=key).sort_values(["_key", "_order"], ascending=[False, True], kind="stable")
    summary = summary.drop(columns=["_key", "_order"]).reset_index(drop=True)
    result = Confirmation(metric, mode, summary, values)
    scored = summary[summary["n"] > 0]
    if len(scored):
        result.winner = str(scored.iloc[0]["candidate"])
    if len(scored) > 1:
        result.runner_up = str(scored.iloc[1]["candidate"])
        d = paired_difference(values[result.winner], values[result.runner_up], CONFIDENCE)
        result.difference = {"n": d.n, "mean": d.mean, "low": d.low, "high": d.high, "seeds": list(d.seeds)}
        result.told_apart = d.n >= 2 and not math.isnan(d.low) and not (d.low <= 0 <= d.high)
    return result
