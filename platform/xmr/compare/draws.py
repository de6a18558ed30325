"""Tuning draws of a comparison: which candidates each replicate offers each variant, and
how a range whose winners sit at its edge is widened.

Every replicate r of a comparison tunes afresh: its candidates are a new draw, so the
paired difference of replicate r carries the tuning choice as well as the training seed,
and the interval over replicates covers both (a fixed choice reused by every seed would
leave the tuning draw out of the interval).

The draws come from Optuna's scrambled-Sobol ``QMCSampler`` through ``Param.suggest`` (the
sampling path of ``xmr tune``), one parameter at a time: parameter p's draws in replicate r
depend on the tuning seed, r and p itself (path and range), never on the variant or its
position in the spec, so variants that tune the same parameter are offered the same values
of it. A one-dimensional scrambled Sobol sequence puts one of every n = 2^m points in each
1/n of the range (a stratified draw: no replicate's candidates bunch at one end, as random
draws may), and pairing draw i of each parameter makes a Latin hypercube. The paper's own
setting of a parameter, where the spec gives one, replaces its last draw in every replicate.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import replace
from typing import Any

from xmr.tune.space import Param

EDGE_SHARE = 0.5  # a range is "at its edge" when more than this share of winners chose its extreme candidate


def _seed(*parts: Any) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def param_draws(p: Param, n: int, seed: int, replicate: int) -> list[Any]:
    """``n`` stratified draws of ``p`` for one replicate (Optuna's scrambled-Sobol sampler)."""
    import optuna

    from xmr.tune.report import optuna_logging_quiet

    optuna_logging_quiet()
    key = _seed(seed, replicate, p.path, p.kind, p.low, p.high, p.log, p.step, p.choices)
    with warnings.catch_warnings():  # "QMCSampler is experimental": said once per draw otherwise
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=key,
                                             warn_independent_sampling=False, warn_asynchronous_seeding=False)
    study = optuna.create_study(sampler=sampler)
    # Optuna's QMC sampler learns the space from a trial that already holds it: one trial is
    # asked and left open (its own value is the independent sampler's, and unused), so every
    # candidate below is a Sobol point, numbered 0, 1, 2, ... in the scrambled sequence.
    p.suggest(study.ask())
    out = []
    for _ in range(n):
        out.append(p.suggest(study.ask()))
    return out


def candidates(params: list[Param], paper: dict[str, Any], n: int, seed: int, replicate: int) -> list[dict[str, Any]]:
    """One variant's ``n`` candidates in one replicate: candidate i takes draw i of every
    parameter (conditional ones only where their condition holds); the last candidate takes
    the paper's own setting of every parameter that has one."""
    if not params or n == 0:
        return [{}]
    columns = {p.path: param_draws(p, n, seed, replicate) for p in params}
    for path, value in paper.items():
        if path in columns:
            columns[path][-1] = value
    out = []
    for i in range(n):
        sampled: dict[str, Any] = {}
        for p in params:
            if p.active(sampled):
                sampled[p.path] = columns[p.path][i]
        out.append(sampled)
    return out


def edge_side(winners: list[tuple[Any, list[Any]]]) -> str:
    """Which edge of a range the winners sit at, if any: ``winners`` holds, per (variant,
    replicate) that tuned the parameter, (the chosen value, every candidate's value). "high"
    when more than half chose the largest candidate (and it was not also the smallest), "low"
    likewise, "" otherwise. Pooled over the variants of a claim: with one variant and five
    replicates a random choice among four candidates lands on one edge in most replicates
    about one time in ten; pooled over two variants, about one in fifty."""
    if not winners:
        return ""
    high = sum(1 for v, vals in winners if v == max(vals) and max(vals) != min(vals))
    low = sum(1 for v, vals in winners if v == min(vals) and max(vals) != min(vals))
    if high > EDGE_SHARE * len(winners):
        return "high"
    if low > EDGE_SHARE * len(winners):
        return "low"
    return ""


def widened(p: Param, side: str) -> Param:
    """``p`` with its range extended by half its width on ``side`` (a factor of the range's
    square root on a log scale). A lower bound of a linear range that was >= 0 stays >= 0
    (weights, margins); the caller checks that the new bound still makes a valid config."""
    if p.kind == "categorical":
        return p
    low, high = float(p.low), float(p.high)
    log = p.kind == "loguniform" or p.log
    if log:
        factor = math.sqrt(high / low)
        low, high = (low, high * factor) if side == "high" else (low / factor, high)
    else:
        half = (high - low) / 2
        low, high = (low, high + half) if side == "high" else (max(0.0, low - half) if low >= 0 else low - half, high)
    if p.kind == "int":
        low, high = math.floor(low), math.ceil(high)
    return replace(p, low=low, high=high)
