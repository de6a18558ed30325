"""The confirmed winner of a sweep (``xmr.tune.confirm``): which trials are confirmed, the
winner chosen by its mean over new seeds (not its best single draw), and the verdict on the
top two. Plain tables; the real sweep that runs a confirmation is in test_tune_ray.py."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from xmr.tune.confirm import candidates, summarize


def runs(values: dict[str, dict[int, float]], errors: dict[tuple[str, int], str] | None = None) -> pd.DataFrame:
    errors = errors or {}
    return pd.DataFrame([{"candidate": c, "seed": s, "map_mean": v, "error": errors.get((c, s)),
                          "trial": f"run_{c}_{s}", "checkpoint": f"/ckpt/{c}/{s}"}
                         for c, by_seed in values.items() for s, v in by_seed.items()])


def test_the_winner_is_the_best_mean_not_the_best_single_seed():
    # a: one lucky seed (the best single value of all), a lower mean; b: steady and higher on average
    values = {"a": {1: 0.90, 2: 0.50, 3: 0.52}, "b": {1: 0.70, 2: 0.68, 3: 0.71}}
    result = summarize(runs(values), ["a", "b"], "map_mean", "max", {"a": 0.95, "b": 0.80})
    assert result.winner == "b" and result.runner_up == "a"
    top = result.summary.iloc[0]
    assert top["candidate"] == "b" and top["mean"] == pytest.approx((0.70 + 0.68 + 0.71) / 3)
    assert top["low"] < top["mean"] < top["high"]
    # best.json follows the winner's best confirmation run
    assert top["best_run"] == "run_b_3" and top["best_run_value"] == pytest.approx(0.71)
    assert top["checkpoint"] == "/ckpt/b/3"
    # the paired difference b − a straddles 0 (seed 1 favours a): they cannot be told apart
    assert result.difference["n"] == 3 and result.difference["low"] < 0 < result.difference["high"]
    assert not result.told_apart
    assert any("cannot be told apart" in line and "contains 0" in line for line in result.lines())


def test_top_two_told_apart_when_the_paired_difference_excludes_zero():
    values = {"a": {1: 0.60, 2: 0.62, 3: 0.65}, "b": {1: 0.50, 2: 0.53, 3: 0.55}}
    result = summarize(runs(values), ["b", "a"], "map_mean", "max")
    assert result.winner == "a" and result.told_apart
    assert result.difference["low"] > 0
    assert any("can be told apart" in line for line in result.lines())


def test_min_mode_failed_runs_and_one_seed():
    # minimising: the lower mean wins; a failed run is left out of its candidate's seeds
    values = {"a": {1: 0.30, 2: 0.34}, "b": {1: 0.20, 2: 0.90}}
    table = runs(values, {("b", 2): "RuntimeError: boom"}).rename(columns={"map_mean": "loss"})
    result = summarize(table, ["a", "b"], "loss", "min")
    assert result.values["b"] == {1: 0.20}
    assert result.winner == "b"  # 0.20 over its one finished seed
    assert result.difference["n"] == 1 and not result.told_apart  # one shared seed: no interval
    assert math.isnan(result.summary.iloc[0]["low"])
    assert any("fewer than 2 shared seeds" in line for line in result.lines())


def test_candidates_are_the_top_finished_trials_or_the_pareto_front():
    table = pd.DataFrame({"trial": list("abcde"), "map_mean": [0.5, 0.9, 0.6, 0.7, 0.4],
                          "pruned": [False, True, False, False, False], "error": [None, None, None, None, "x"],
                          "train_s_per_epoch": [1.0, 1.0, 2.0, 3.0, 0.1]})
    # b scored highest but was pruned (an early score); e failed
    assert candidates(table, "map_mean", "max", 2) == ["d", "c"]
    assert candidates(table, "map_mean", "min", 2) == ["a", "c"]
    # several objectives: every Pareto member (b is fastest-and-best among the rest), best metric first
    assert candidates(table, "map_mean", "max", 2, multi_objective=True) == ["b"]
    table.loc[table["trial"] == "b", "train_s_per_epoch"] = 2.5
    assert candidates(table, "map_mean", "max", 1, multi_objective=True) == ["b", "c", "a"]  # d: beaten by b


def test_a_candidates_values_come_back_typed_from_the_trials_table():
    """A confirmation trains a candidate from its trials.csv row: pandas turned the int column
    with gaps (a conditional parameter) into floats, NaN where inactive; the config wants ints."""
    from xmr.tune.space import Param, SearchSpace

    space = SearchSpace("sccmrl", [Param("negatives.memory_bank", "int", 16, 256, log=True),
                                   Param("negatives.strategy", "categorical", choices=["uniform", "hardest"]),
                                   Param("loss.temperature", "loguniform", 0.03, 1.0),
                                   Param("optim.batch", "categorical", choices=[16, 32])])
    row = pd.DataFrame({"negatives.memory_bank": [242.0, math.nan], "negatives.strategy": ["hardest", "uniform"],
                        "loss.temperature": [0.1, 0.2], "optim.batch": [32.0, 16.0]})
    first, second = (space.typed(r) for r in row.to_dict("records"))
    assert first == {"negatives.memory_bank": 242, "negatives.strategy": "hardest", "loss.temperature": 0.1,
                     "optim.batch": 32}
    assert type(first["negatives.memory_bank"]) is int and type(first["optim.batch"]) is int
    assert second["negatives.memory_bank"] is None
