"""``xmr compare``: the statistics against scipy on constructed data with known answers, the
spec checks, and a tiny claim map (2 levels x 2 seeds, tuning, a broken variant) end to
end on the local Ray."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from xmr.compare.spec import SpecError, load_spec
from xmr.compare.stats import holm, paired_difference, t_interval, t_test_p, verdict

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def module_ray():
    """One local Ray for the module's comparisons: the first ``run_comparison`` starts it as
    ``xmr compare`` does (``ensure_ray``: embedded, one logical CPU per core, no dashboard),
    the later ones attach to it ("already connected") instead of paying a start and a stop
    each (~10 s apiece on 2 cores); it stops after the module. Each comparison's trials are
    Tune actors of their own, so nothing of one test's runs outlives it into the next."""
    yield
    import ray

    ray.shutdown()


@pytest.mark.parametrize("values", [[0.5, 0.7], [0.1, 0.2, 0.4], list(np.linspace(0, 1, 10)), [3.0, 3.0, 3.0]])
def test_t_interval_agrees_with_scipy(values):
    mean, std, low, high = t_interval(values)
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    if std > 0:
        ref = stats.t.interval(0.95, df=len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
        assert (low, high) == pytest.approx(ref)
    else:
        assert low == high == mean


def test_single_value_has_no_interval():
    mean, std, low, high = t_interval([0.4])
    assert mean == 0.4 and math.isnan(std) and math.isnan(low) and math.isnan(high)


@pytest.mark.parametrize("seed", range(5))
def test_paired_interval_equals_scipys(seed):
    rng = np.random.default_rng(seed)
    right = rng.normal(0.6, 0.05, 7)
    left = right + rng.normal(0.01, 0.02, 7)
    d = paired_difference(dict(enumerate(left)), dict(enumerate(right)))
    diff = left - right
    ref = stats.t.interval(0.95, df=6, loc=diff.mean(), scale=stats.sem(diff))
    assert (d.low, d.high) == pytest.approx(ref) and d.mean == pytest.approx(diff.mean()) and d.n == 7
    # the paired t-test and the interval agree: p < 0.05 exactly when 0 is outside
    p = stats.ttest_rel(left, right).pvalue
    assert (p < 0.05) == (d.low > 0 or d.high < 0)


def test_pairing_is_by_seed_and_skips_missing_runs():
    d = paired_difference({0: 0.9, 1: 0.8, 2: 0.7, 3: float("nan")}, {1: 0.5, 2: 0.6, 3: 0.4, 4: 0.1})
    assert d.seeds == [1, 2] and d.n == 2 and d.mean == pytest.approx(0.2)


def test_busy_seconds_counts_concurrent_runs_once():
    from xmr.compare.jobs import busy_seconds

    runs = [{"finished_at": 110.0, "wall_s": 10.0},  # [100, 110]
            {"finished_at": 115.0, "wall_s": 10.0},  # [105, 115]: overlaps the first
            {"finished_at": 130.0, "wall_s": 5.0},   # [125, 130]: after a gap
            {"error": "boom"}]                       # a failed run has no interval
    assert busy_seconds(runs, fallback=-1.0) == pytest.approx(20.0)
    assert busy_seconds([{"wall_s": 3.0}], fallback=7.0) == 7.0  # an interval unknown: this call's time
    assert busy_seconds([], fallback=7.0) == 7.0


def test_verdicts_on_constructed_data():
    base = np.linspace(0.5, 0.7, 8)
    clear = paired_difference(dict(enumerate(base + 0.05 + 0.001 * np.arange(8))), dict(enumerate(base)))
    assert verdict(clear, ">") == "held" and verdict(clear, "<") == "reversed"
    noisy = paired_difference(dict(enumerate(base + np.array([0.05, -0.05] * 4))), dict(enumerate(base)))
    assert verdict(noisy, ">") == "inconclusive" and verdict(noisy, "<") == "inconclusive"
    worse = paired_difference(dict(enumerate(base - 0.03 + 0.002 * np.arange(8))), dict(enumerate(base)))
    assert verdict(worse, ">") == "reversed"
    one = paired_difference({0: 1.0}, {0: 0.0})
    assert verdict(one, ">") == "inconclusive"  # a single pair proves nothing
    # a positive mean with an interval across 0 is not "held"
    overlap = paired_difference({0: 0.06, 1: 0.05, 2: 0.055}, {0: 0.01, 1: 0.09, 2: 0.03})
    assert overlap.mean > 0 and verdict(overlap, ">") == "inconclusive"
    # the same difference within a tight interval around 0: equivalent at δ = 0.02, not at 0.001
    tight = paired_difference(dict(enumerate(base + np.array([0.002, -0.002] * 4))), dict(enumerate(base)))
    assert verdict(tight, ">") == "equivalent" and verdict(tight, ">", margin=0.001) == "inconclusive"
    # identical runs: no difference at all is equivalent, never held
    same = paired_difference(dict(enumerate(base)), dict(enumerate(base)))
    assert same.p == 1.0 and verdict(same, ">") == verdict(same, "<") == "equivalent"
    # Holm: a difference that is held on its own is inconclusive once the family's adjustment lifts p over α
    assert clear.p < 0.05 and verdict(clear, ">", p_adjusted=0.2) == "inconclusive"
    with pytest.raises(ValueError, match="operator"):
        verdict(clear, ">=")
    with pytest.raises(ValueError, match="margin"):
        verdict(clear, ">", margin=0)


@pytest.mark.parametrize("seed", range(4))
def test_p_value_and_equivalence_agree_with_scipy(seed):
    """The p-value is scipy's paired t-test; "equivalent" is exactly TOST at 2.5% per side
    (scipy's two one-sided t-tests against ±δ)."""
    rng = np.random.default_rng(seed)
    right = rng.normal(0.6, 0.05, 6)
    left = right + rng.normal([0.0, 0.004, 0.02, 0.05][seed], 0.01, 6)
    d = paired_difference(dict(enumerate(left)), dict(enumerate(right)))
    assert d.p == pytest.approx(stats.ttest_rel(left, right).pvalue)
    assert t_test_p(d.mean, d.sd, d.n) == pytest.approx(stats.ttest_1samp(left - right, 0.0).pvalue)
    for margin in (0.005, 0.01, 0.02, 0.05):
        lower = stats.ttest_1samp(left - right, -margin, alternative="greater").pvalue
        upper = stats.ttest_1samp(left - right, margin, alternative="less").pvalue
        tost = max(lower, upper) < 0.025
        v = verdict(d, ">", margin=margin)
        assert (v == "equivalent") == (tost and d.p >= 0.05), (margin, v, lower, upper)


def _holm_by_rejection(pvalues, alpha):
    """Holm's procedure as written: sort, reject while p_(k) <= alpha / (m - k), stop at the first failure."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    rejected = set()
    for k, i in enumerate(order):
        if pvalues[i] > alpha / (len(pvalues) - k):
            break
        rejected.add(i)
    return rejected


@pytest.mark.parametrize("seed", range(6))
def test_holm_adjusted_p_rejects_what_holms_procedure_rejects(seed):
    rng = np.random.default_rng(seed)
    p = list(rng.uniform(0, 0.08, size=int(rng.integers(1, 7))))
    adjusted = holm(p)
    for alpha in (0.01, 0.05, 0.1):
        assert {i for i, q in enumerate(adjusted) if q <= alpha} == _holm_by_rejection(p, alpha)
    assert all(q >= x for q, x in zip(adjusted, p)) and max(adjusted) <= 1.0
    assert holm([0.01, math.nan, 0.04])[1] != holm([0.01, math.nan, 0.04])[1]  # nan stays nan
    assert holm([0.01, math.nan, 0.04])[2] == pytest.approx(0.04)  # a family of two, not three


def _spec_file(path, variants, **extra):
    raw = {"name": "guard", "dataset": {"path": "x"}, "metric": "map_mean",
           "tuning": {"trials": 3, "params": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 3e-3}}},
           "variants": variants, **extra}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def _draws(spec):
    """{(replicate, variant): [candidate values]} of a spec's first round."""
    from xmr.compare.runner import LevelPlan, round_jobs

    jobs = round_jobs(spec, LevelPlan(None, spec.max_epochs, {}), "x", None)
    out: dict = {}
    for job in jobs.values():
        out.setdefault((job["seed"], job["variant"]), []).append(job["values"])
    return out


def test_each_replicate_offers_every_variant_the_same_fresh_draw(tmp_path):
    """Shared parameters get the same draws in every variant of a replicate, whatever the
    variants' order; each replicate draws afresh; a variant's own parameter is drawn on top;
    a variant with its own tuning seed gets draws of its own; the paper's setting is always
    the last candidate."""
    variants = {"a": {"preset": "sccmrl", "tune": {"loss.temperature": {"type": "loguniform", "low": 0.05, "high": 0.3}}},
                "b": {"preset": "sccmrl"},
                "c": {"preset": "triplet_category", "tune": {"loss.margin": {"type": "uniform", "low": 0.1, "high": 0.5}}},
                "d": {"preset": "sccmrl", "tuning_seed": 7}}
    forward = _draws(load_spec(_spec_file(tmp_path / "f.yaml", variants, seeds=3)))
    backward = _draws(load_spec(_spec_file(tmp_path / "b.yaml", dict(reversed(list(variants.items()))), seeds=3)))
    assert forward == backward
    for r in range(3):
        lrs = {n: [c["optim.lr"] for c in forward[(r, n)]] for n in "abcd"}
        assert lrs["a"] == lrs["b"] == lrs["c"] and len(set(lrs["a"])) == 3
        assert lrs["d"] != lrs["a"]  # its own tuning seed: an A/A twin across draws
        assert [set(c) for c in forward[(r, "a")]] == [{"optim.lr", "loss.temperature"}] * 3
        assert len({c["loss.margin"] for c in forward[(r, "c")]}) == 3
    assert forward[(0, "a")] != forward[(1, "a")]  # a fresh draw per replicate
    other_seed = _draws(load_spec(_spec_file(tmp_path / "s.yaml", variants, seeds=3), tuning_seed=7))
    assert other_seed[(0, "a")] != forward[(0, "a")]
    assert [c["optim.lr"] for c in other_seed[(0, "a")]] == [c["optim.lr"] for c in forward[(0, "d")]]
    paper = {"tuning": {"trials": 3, "params": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 3e-3,
                                                              "paper": 1e-3}}}}
    with_paper = _draws(load_spec(_spec_file(tmp_path / "p.yaml", variants, seeds=2, **paper)))
    assert all(cands[-1]["optim.lr"] == 1e-3 for cands in with_paper.values())
    assert len({c["optim.lr"] for c in with_paper[(0, "a")]}) == 3


def test_draws_are_stratified_over_the_range():
    """Four scrambled-Sobol draws put one candidate in each quarter of the (log) range, in
    every replicate: no replicate's candidates bunch at one end."""
    from xmr.compare.draws import param_draws
    from xmr.tune.space import parse_param

    p = parse_param("optim.lr", {"type": "loguniform", "low": 3e-4, "high": 3e-3})
    for r in range(6):
        draws = param_draws(p, 4, 1000, r)
        quarters = sorted(int(4 * (math.log(x) - math.log(3e-4)) / (math.log(3e-3) - math.log(3e-4))) for x in draws)
        assert quarters == [0, 1, 2, 3], (r, draws)
    assert param_draws(p, 4, 1000, 0) == param_draws(p, 4, 1000, 0)  # seeded
    assert param_draws(p, 4, 1000, 0) != param_draws(p, 4, 2024, 0)


def test_edges_are_found_and_widened():
    from xmr.compare.draws import edge_side, widened
    from xmr.tune.space import parse_param

    vals = [1, 2, 3, 4]
    assert edge_side([(4, vals)] * 3 + [(2, vals)] * 2) == "high"
    assert edge_side([(1, vals)] * 3 + [(4, vals)] * 2) == "low"
    assert edge_side([(4, vals)] * 2 + [(1, vals)] * 2 + [(2, vals)]) == ""  # no majority on either side
    assert edge_side([(4, vals)] * 5 + [(2, vals)] * 5) == ""  # exactly half is not most
    assert edge_side([(2, [2, 2])] * 4) == ""  # one distinct value: no edge to speak of
    lr = parse_param("optim.lr", {"type": "loguniform", "low": 1e-4, "high": 1e-2})
    assert (widened(lr, "high").low, widened(lr, "high").high) == pytest.approx((1e-4, 1e-1))
    assert (widened(lr, "low").low, widened(lr, "low").high) == pytest.approx((1e-5, 1e-2))
    margin = parse_param("loss.margin", {"type": "uniform", "low": 0.1, "high": 0.5})
    assert (widened(margin, "high").low, widened(margin, "high").high) == pytest.approx((0.1, 0.7))
    assert widened(margin, "low").low == 0.0  # a non-negative range stays non-negative
    k = parse_param("negatives.k", {"type": "int", "low": 2, "high": 9})
    assert (widened(k, "high").low, widened(k, "high").high) == (2, 13)


@pytest.mark.parametrize("wins,n", [(0, 5), (3, 5), (5, 5), (7, 20), (1, 1)])
def test_wilson_interval_equals_scipys(wins, n):
    from xmr.compare.stats import wilson_interval

    ref = stats.binomtest(wins, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(wins, n) == pytest.approx((ref.low, ref.high))


def test_win_share_counts_ties_half():
    from xmr.compare.stats import win_share

    share = win_share({0: 0.9, 1: 0.5, 2: 0.7, 3: 0.2}, {0: 0.8, 1: 0.5, 2: 0.6, 3: 0.3, 4: 0.1})
    assert share["p_win"] == pytest.approx(2.5 / 4) and share["p_win_low"] < 0.625 < share["p_win_high"]


@pytest.mark.parametrize("seed", range(3))
def test_trend_slope_and_p_equal_linregress(seed):
    from xmr.compare.stats import trend_test

    rng = np.random.default_rng(seed)
    per_level = [list(rng.normal(mu, 0.01, 5)) for mu in (0.0, [0.0, 0.01, 0.05][seed], 2 * [0.0, 0.01, 0.05][seed])]
    xs = [i for i, ds in enumerate(per_level) for _ in ds]
    ref = stats.linregress(xs, [d for ds in per_level for d in ds])
    t = trend_test(per_level, "increasing")
    assert t.slope == pytest.approx(ref.slope) and t.p == pytest.approx(ref.pvalue) and t.n == 15
    half = stats.t.ppf(0.975, 13) * ref.stderr
    assert (t.low, t.high) == pytest.approx((ref.slope - half, ref.slope + half))
    expected = "held" if ref.pvalue < 0.05 and ref.slope > 0 else "reversed" if ref.pvalue < 0.05 else "inconclusive"
    assert t.verdict == expected
    assert trend_test(per_level, "decreasing").verdict == {"held": "reversed", "reversed": "held"}.get(expected, expected)
    assert seed != 2 or t.verdict == "held"  # a clear rise is found


def test_held_smaller_than_margin():
    from xmr.compare.stats import smaller_than_margin

    base = np.linspace(0.5, 0.7, 8)
    tiny = paired_difference(dict(enumerate(base + 0.009 + 0.0005 * np.arange(8))), dict(enumerate(base)))
    assert verdict(tiny, ">", margin=0.02) == "held" and smaller_than_margin(tiny, 0.02)
    assert not smaller_than_margin(tiny, 0.005)


def test_pretraining_keeps_its_own_schedule_and_the_control_its_fixed_budget():
    spec = load_spec("mixer_pretraining")
    pre = spec.variants["pretrained"].pretrain
    assert pre.optim.epochs == 10 and pre.optim.patience == 0  # the preset's, not the spec's 30 / 3
    assert spec.variants["pretrained"].config.optim.epochs == 30
    control = spec.variants["scratch_equal_compute"].config.optim
    assert control.epochs == pre.optim.epochs + spec.max_epochs and control.patience == 0


def test_bad_spec_names_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    base = {"dataset": {"path": "x"}, "metric": "map_mean", "variants": {"a": {"preset": "sccmrl"}}}
    path.write_text(yaml.safe_dump({**base, "claims": ["a > b"]}))
    with pytest.raises(SpecError, match=r"claims\[0\] = 'a > b'"):
        load_spec(str(path))
    path.write_text(yaml.safe_dump({**base, "variants": {"a": {"preset": "sccmrl", "set": ["negatives.k=0"]}}}))
    with pytest.raises(SpecError, match="variants.a: negatives.k = 0"):
        load_spec(str(path))
    path.write_text(yaml.safe_dump({**base, "variants": {"a": {"preset": "sccmrl", "tune": {
        "loss.margin": {"type": "uniform", "low": 0.1, "high": 0.3}}}}}))
    with pytest.raises(SpecError, match="variants.a: tuning loss.margin"):  # SCCMRL reads no margin
        load_spec(str(path))
    path.write_text(yaml.safe_dump({**base, "map": {"property": "n_classes", "levels": [4, 8]}}))
    with pytest.raises(SpecError, match="dataset.synth is required"):
        load_spec(str(path))
    path.write_text(yaml.safe_dump({**base, "tuning": {"at": "first_level"}}))
    with pytest.raises(SpecError, match="tuning.at = 'first_level'"):
        load_spec(str(path))
    path.write_text(yaml.safe_dump({**base, "equivalence_margin": -0.1}))
    with pytest.raises(SpecError, match="equivalence_margin = -0.1"):
        load_spec(str(path))
    path.write_text(yaml.safe_dump({**base, "equivalence_margin": {"value": 0.01}}))
    with pytest.raises(SpecError, match="reason"):  # δ comes with why
        load_spec(str(path))
    path.write_text(yaml.safe_dump({**base, "tuning": {"trials": 2, "params": {
        "optim.lr": {"type": "loguniform", "low": 3e-4, "high": 3e-3, "paper": 1e-4}}}}))
    with pytest.raises(SpecError, match=r"optim.lr.paper = 0.0001: the paper's setting must lie in the range"):
        load_spec(str(path))
    path.write_text(yaml.safe_dump({**base, "variants": {"a": {"preset": "sccmrl", "tuning_seed": "x"}}}))
    with pytest.raises(SpecError, match="variants.a.tuning_seed = 'x'"):
        load_spec(str(path))
    path.write_text(yaml.safe_dump({**base, "training": {"min_gain": -1}}))
    with pytest.raises(SpecError, match="training.min_gain = -1"):
        load_spec(str(path))
    path.write_text(yaml.safe_dump({**base, "tuning": {"at": "middle_level"}}))
    with pytest.raises(SpecError, match="tuning.at = 'middle_level'"):  # a choice reused across levels
        load_spec(str(path))


def test_shipped_specs_load():
    from xmr.compare.spec import SPEC_DIR

    names = sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))
    assert len(names) >= 9 and sum(n.startswith("map_") for n in names) >= 4
    for name in names:
        spec = load_spec(name)
        assert spec.claims and len(spec.seeds) >= 5 and spec.patience > 0 and spec.tuning_trials >= 3, name
        if spec.map is not None:
            assert len(spec.map.levels) >= 3, name
    k = load_spec("k_sweep")
    assert k.variants["k_batch"].config.negatives.memory_bank == 0  # the in-batch control
    from xmr.data.manifest import load_manifest

    train = load_manifest(str(Path(__file__).resolve().parents[1] / "data" / "avdigits")).splits["train"].num_samples
    assert 0 < k.variants["k_past_batch_bank"].config.negatives.memory_bank < train  # no stale copy of the anchor
    for name in ("qacln_ablation", "map_qcf_single_stream"):  # the paper's own learning rate is always a candidate
        spec = load_spec(name)
        lr = next(p for p in spec.variants["full"].tune if p.path == "optim.lr")
        assert lr.low <= 1e-4 <= lr.high and all(v.paper == {"optim.lr": 1e-4} for v in spec.variants.values()), name
    for name in names:  # δ fixed in the spec, with its reason, before any run
        spec = load_spec(name)
        assert spec.margin_reason.startswith(("one ", "a quarter")) and spec.equivalence_margin <= 0.01, name


def test_a_range_whose_winners_sit_at_its_edge_is_widened_then_flagged(tmp_path):
    """Both variants chose the largest learning rate in every replicate: the range is widened
    on that side for both (a new round), and once ``widen`` is spent the page is told."""
    from xmr.compare.runner import LevelPlan, _widen_edges, round_jobs, winners

    variants = {"a": {"preset": "sccmrl"}, "b": {"preset": "triplet_category"}}
    spec = load_spec(_spec_file(tmp_path / "e.yaml", variants, seeds=3))
    plan = LevelPlan(None, spec.max_epochs, {})
    jobs = round_jobs(spec, plan, "x", None)
    results = {run: {"val_score": job["values"]["optim.lr"]} for run, job in jobs.items()}  # larger lr, better
    chosen = winners(spec, jobs, results)
    assert all(jobs[run]["values"]["optim.lr"] == max(j["values"]["optim.lr"] for j in jobs.values()
                                                     if j["seed"] == r and j["variant"] == n)
               for (r, n), run in chosen.items())
    assert _widen_edges(spec, plan, jobs, chosen) and plan.widened == {"optim.lr": ["high"]}
    assert plan.ranges["optim.lr"].high == pytest.approx(3e-3 * math.sqrt(30)) and not plan.flags
    plan.round += 1
    wider = round_jobs(spec, plan, "x", None)
    assert max(j["values"]["optim.lr"] for j in wider.values()) > 3e-3  # the new round reaches past the old edge
    assert all(run.endswith("-round1") for run in wider)
    results = {run: {"val_score": job["values"]["optim.lr"]} for run, job in wider.items()}
    assert not _widen_edges(spec, plan, wider, winners(spec, wider, results))  # widen: 1, spent
    assert plan.flags and "optim.lr" in plan.flags[0] and "high edge" in plan.flags[0]


@pytest.mark.ray
def test_tiny_claim_map_end_to_end(tmp_path, monkeypatch, module_ray):
    """2 levels x 2 replicates x 3 variants (one broken) with one candidate each, on the local
    Ray: the broken variant is reported failed while the others finish; chosen runs still
    improving at their 1-epoch cap make the whole level run again at 2 (every variant: equal
    budgets); verdicts are the scipy-checked paired intervals, and the page is rebuilt."""
    from xmr.compare.report import update_report, write_page
    from xmr.compare.runner import run_comparison

    monkeypatch.chdir(tmp_path)  # relative paths, as a user writes them: trials run in working dirs of their own
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "tiny", "claim": "SCCMRL beats the triplet baseline whatever the number of classes.",
        "premise": "Classes are planted clusters.",
        "dataset": {"path": "data",
                    "synth": {"kind": "category", "splits": {"train": 96, "val": 32, "test": 32}, "seed": 1}},
        "metric": "map_mean", "seeds": 2,
        "common": ["data.batch_size=32", "model.embed_dim=16", "model.hidden_dim=32"],
        "training": {"max_epochs": 1, "patience": 1, "extend": 1, "min_gain": 0.0},  # the machinery, not the models
        "tuning": {"trials": 1, "widen": 0,
                   "params": {"optim.lr": {"type": "loguniform", "low": 5.0e-4, "high": 2.0e-3}}},
        "equivalence_margin": {"value": 0.05, "reason": "a test's margin"},
        "variants": {"sccmrl": {"preset": "sccmrl"}, "triplet": {"preset": "triplet_category"},
                     "broken": {"preset": "sccmrl", "set": [f"model.pretrained={tmp_path / 'no-such-checkpoint'}"]}},
        "claims": ["sccmrl > triplet"],
        "map": {"property": "n_classes", "levels": [4, 8], "label": "classes", "trend": "increasing"}}))
    spec = load_spec(str(spec_path))
    t0 = time.perf_counter()
    c = run_comparison(spec, "out", concurrency=2)
    call_s = time.perf_counter() - t0
    runs = c.runs
    assert len(runs) == 12 and set(runs["level"]) == {4, 8}
    ok = runs[runs["variant"] != "broken"]
    assert (ok["status"] == "ok").all() and ok["map_mean"].notna().all()
    broken = runs[runs["variant"] == "broken"]
    assert (broken["status"] == "failed").all() and broken["error"].str.contains("no-such-checkpoint").all()
    assert ok["wall_s"].max() <= c.wall_s < call_s  # the runs' busy time: within the call, not the call itself
    # one epoch is always "still improving": every level ran again at 2, every variant alike
    assert (runs["cap"] == 2).all() and (runs["extended"] == 1).all() and (ok["epochs"] <= 2).all()
    t = c.tuning
    assert set(t["cap"]) == {1, 2} and len(t) == 2 * 2 * 3 * 2  # levels x replicates x variants x rounds
    for level in (4, 8):
        assert c.notes["levels"][str(level)]["cap"] == 2
        for name in ("sccmrl", "triplet"):
            per = c.chosen[name][str(level)]
            assert len(per) == 2 and all("optim.lr" in x for x in per)
    assert c.chosen["broken"]["4"] == [None, None]
    for level in (4, 8):
        at = ok[ok["level"] == level]
        left = at[at["variant"] == "sccmrl"].set_index("seed")["map_mean"]
        right = at[at["variant"] == "triplet"].set_index("seed")["map_mean"]
        diff = (left - right).sort_index().to_numpy()
        claim = next(cl for cl in c.claims if cl["level"] == level)
        ref = stats.t.interval(0.95, df=1, loc=diff.mean(), scale=stats.sem(diff))
        assert (claim["low"], claim["high"]) == pytest.approx(ref) and claim["n"] == 2
        assert claim["p"] == pytest.approx(stats.ttest_rel(left.sort_index(), right.sort_index()).pvalue, nan_ok=True)
        assert claim["p_win"] == pytest.approx(float(np.mean(np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0)))))
    assert [cl["p_holm"] for cl in c.claims] == pytest.approx(holm([cl["p"] for cl in c.claims]), nan_ok=True)
    assert len(c.trends) == 1 and c.trends[0]["n"] == 4 and c.trends[0]["trend"] == "increasing"
    out = tmp_path / "out" / "tiny"
    assert pd.read_csv(out / "runs.csv").shape[0] == 12
    for name in ("summary.csv", "paired.csv", "tuning.csv", "summary.md", "map_mean.png", "claims.json"):
        assert (out / name).is_file(), name
    # the scored checkpoint is the chosen run's best, as its best.json names it
    chosen_run = c.tuning[(c.tuning["chosen"]) & (c.tuning["level"] == 4) & (c.tuning["variant"] == "sccmrl")
                          & (c.tuning["replicate"] == 0)]
    best = json.loads((out / "runs" / "4-sccmrl-r0-c0-round1" / "best.json").read_text())
    assert len(chosen_run) == 1 and (Path(best["checkpoint"]) / "model.safetensors").is_file()
    scored = json.loads((out / "runs" / "4-sccmrl-r0-c0-round1-test" / "result.json").read_text())
    assert scored["job"]["of"] == "4-sccmrl-r0-c0-round1" and scored["job"]["split"] == "test"
    report = tmp_path / "results.md"
    update_report(report, c)
    notes = "<!-- xmr-notes:start -->\n## Reading these results\n\nWhy a verdict changed.\n<!-- xmr-notes:end -->\n"
    text = report.read_text()
    report.write_text(text.replace("## All claims", notes + "\n## All claims", 1))  # a person's prose
    update_report(report, c)  # replaces its own section instead of appending a second one
    text = report.read_text()
    assert text.count("<!-- xmr-compare:tiny:start -->") == 1 and "| broken |" in text and "failed" in text
    assert text.count(notes) == 1 and text.index(notes) < text.index("## All claims")  # the prose is kept
    assert "**Premise true by construction.** Classes are planted clusters." in text
    assert "δ = 0.05: a test's margin" in text and "Trend along classes" in text
    write_page(report, [c], "All runs took no time.")  # `--all` keeps it too
    assert report.read_text().count(notes) == 1
    assert "## All claims" in text and text.count("`sccmrl > triplet`") >= 4  # overview + section, 2 levels each
    assert "Reproduce: `xmr compare --spec tiny" in text


GUARD = {"dataset": {"path": "data", "synth": {"kind": "category", "n_classes": 6,
                                               "splits": {"train": 192, "val": 64, "test": 128}, "seed": 3}},
         "metric": "map_mean", "seeds": 5,
         "common": ["data.batch_size=32", "model.embed_dim=16", "model.hidden_dim=32"],
         "training": {"max_epochs": 15, "patience": 3, "extend": 0},  # trained to convergence: 3 epochs were noise
         "tuning": {"trials": 2, "widen": 0,
                    "params": {"optim.lr": {"type": "loguniform", "low": 3.0e-4, "high": 3.0e-3}}},
         "equivalence_margin": {"value": 0.02, "reason": "a test's margin"},
         "claims": ["sccmrl > sccmrl_twin", "sccmrl > sccmrl_noisy_labels"]}
GUARD_VARIANTS = {"sccmrl": {"preset": "sccmrl"},
                  # identical but for its own tuning draws: an A/A across draws
                  "sccmrl_twin": {"preset": "sccmrl", "tuning_seed": 77},
                  # a known positive: the same method with half its training labels wrong (30% was
                  # held under tuning seeds 1000 and 3, +0.116 and +0.115, but inconclusive under
                  # 2024, +0.081 [-0.007, +0.170]: two candidates per replicate leave a wide tuning
                  # spread; 50% gave +0.220 [+0.178, +0.262])
                  "sccmrl_noisy_labels": {"preset": "sccmrl", "set": ["data.label_noise=0.5"]}}


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_known_answers_across_tuning_draws(tmp_path, monkeypatch, module_ray):
    """The instrument on known answers, under three tuning seeds. (a) A/A across draws: two
    identical variants that differ only in their tuning draws come out neither held nor
    reversed (with one tuning choice shared by every seed, their difference was exactly 0
    and the check could not fail; now the draws differ and the interval must cover them).
    (d) A known positive: the twin trained on 50% corrupted labels is held worse every time,
    so a wide interval cannot pass (a) by calling everything inconclusive. (b) Listing the
    variants in the opposite order changes no job (the same draws for every variant: its
    stored runs are this comparison's own) and no verdict."""
    from xmr.compare.runner import run_comparison

    monkeypatch.chdir(tmp_path)
    forward = _spec_file(tmp_path / "forward.yaml", GUARD_VARIANTS, **GUARD)
    backward = _spec_file(tmp_path / "backward.yaml", dict(reversed(list(GUARD_VARIANTS.items()))), **GUARD)
    out = {}
    for seed in (1000, 2024, 3):
        c = run_comparison(load_spec(forward, tuning_seed=seed), f"out{seed}", concurrency=2)
        assert (c.runs["status"] == "ok").all()
        out[seed] = c
    swapped = run_comparison(load_spec(backward, tuning_seed=1000), "out1000", concurrency=2)
    for seed, c in out.items():
        verdicts = {cl["claim"]: cl for cl in c.claims}
        show = lambda cl: (seed, cl["verdict"], round(cl["mean"], 4), round(cl["low"], 4), round(cl["high"], 4))  # noqa: E731
        aa = verdicts["sccmrl > sccmrl_twin"]
        assert aa["verdict"] not in ("held", "reversed"), show(aa)
        assert aa["sd"] > 0, "the twin's draws differ: its difference must vary"
        known = verdicts["sccmrl > sccmrl_noisy_labels"]
        assert known["verdict"] == "held", show(known)
        assert c.chosen["sccmrl"] != c.chosen["sccmrl_twin"]
    assert out[1000].chosen["sccmrl"] != out[2024].chosen["sccmrl"]
    a = out[1000]
    assert swapped.chosen == a.chosen
    assert {cl["claim"]: cl["verdict"] for cl in a.claims} == {cl["claim"]: cl["verdict"] for cl in swapped.claims}
    score = lambda c: c.runs.set_index(["variant", "seed"])["map_mean"].sort_index()  # noqa: E731
    pd.testing.assert_series_equal(score(a), score(swapped))


def test_a_stored_result_is_reused_only_for_its_own_job(tmp_path):
    """A comparison run again into the same storage with another tuning seed (or --data,
    --set) has jobs of the same names and other values: the stored results are refused,
    naming what differs, instead of being handed back as this comparison's scores."""
    from xmr.compare.jobs import RESULT, check_stored, identity
    from xmr.config import SpecError
    from xmr.train.runfs import RunDir

    job = {"variant": "flat", "seed": 1000, "phase": "tune", "level": None, "values": {"optim.lr": 0.00112},
           "split": "val", "config": {"optim": {"lr": 0.001, "epochs": 30}}, "pretrain": None, "run": "tune-flat-00",
           "endpoint_url": None}
    runs = str(tmp_path / "runs")
    RunDir(runs, job["run"]).write_text(RESULT, json.dumps({"job": identity(job), "metrics": {"map_mean": 0.3}}))
    check_stored({"a": job}, runs)  # its own result: reused
    other_draw = {**job, "values": {"optim.lr": 0.00294}}
    with pytest.raises(SpecError, match=r"tune-flat-00 holds a finished run of another comparison.*values"):
        check_stored({"a": other_draw}, runs)
    other_config = {**job, "config": {"optim": {"lr": 0.001, "epochs": 60}}}
    with pytest.raises(SpecError, match="config_sha256"):
        check_stored({"a": other_config}, runs)
    # a result written before the digest existed is compared on the fields it holds
    old = {k: v for k, v in identity(job).items() if k != "config_sha256"}
    RunDir(runs, job["run"]).write_text(RESULT, json.dumps({"job": old, "metrics": {"map_mean": 0.3}}))
    check_stored({"a": other_config}, runs)
    with pytest.raises(SpecError, match="values"):
        check_stored({"a": other_draw}, runs)


def test_successive_halving_rungs_and_survivors():
    """The rung arithmetic (rungs below the cap, 1/eta kept, rounded up) and the survivor
    choice (best validation, ties to the earlier candidate, failed ones never continue); then
    the stages on scores known in advance: every variant of a replicate gets the same rungs
    and keeps as many, rung jobs carry the rung, a dropped candidate has no job to the cap,
    and the last survivor is the best at the last rung."""
    from xmr.compare.halving import Halving, rung_id, successive_halving, survivors

    h = Halving(eta=3, first_rung=3)
    assert h.rungs(30) == [3, 9, 27] and h.rungs(9) == [3] and h.rungs(3) == [] and h.rungs(60) == [3, 9, 27]
    assert [h.keep(n) for n in (1, 2, 3, 4, 6, 7)] == [1, 1, 1, 2, 2, 3]
    assert Halving(eta=2, first_rung=5).rungs(30) == [5, 10, 20]
    scores = {"c0": 0.5, "c1": 0.7, "c2": 0.7, "c3": math.nan}
    assert survivors(["c0", "c1", "c2", "c3"], scores, 2, 1.0) == ["c1", "c2"]
    assert survivors(["c0", "c1", "c2", "c3"], scores, 1, 1.0) == ["c1"]  # a tie: the earlier candidate
    assert survivors(["c0", "c1", "c2", "c3"], scores, 1, -1.0) == ["c0"]  # lower is better
    assert survivors(["c3"], scores, 1, 1.0) == []

    # 2 variants x 2 replicates x 4 candidates; a candidate's validation score at epoch e is
    # known in advance: it levels off at its own plateau, so the rung order is the final one
    plateau = {0: 0.40, 1: 0.55, 2: 0.50, 3: 0.30}
    jobs = {f"{v}-r{r}-c{i}": {"variant": v, "seed": r, "level": None, "candidate": i, "run": f"{v}-r{r}-c{i}",
                               "config": {"optim": {"epochs": 30}}}
            for v in ("a", "b") for r in (0, 1) for i in range(4)}
    stages = []

    def run(stage_jobs, k):
        stages.append(stage_jobs)
        out = {}
        for job_id, job in stage_jobs.items():
            epochs = job.get("until") or 20  # to the cap: patience ends it at 20
            out[job_id] = {"val_score": plateau[job["candidate"]] * (1 - 0.5 ** epochs), "epochs": epochs}
        return out

    ran, results = successive_halving(jobs, h, run, lambda job: 1.0)
    assert [sorted({j.get("until") for j in s.values()}, key=str) for s in stages] == [[3], [9], [None]]
    assert len(stages[0]) == 16 and len(stages[1]) == 8 and len(stages[2]) == 4  # 4 -> 2 -> 1 per group
    for (v, r) in [("a", 0), ("a", 1), ("b", 0), ("b", 1)]:
        assert sorted(j["candidate"] for j in stages[1].values() if (j["variant"], j["seed"]) == (v, r)) == [1, 2]
        assert rung_id(f"{v}-r{r}-c1", 9) in ran and f"{v}-r{r}-c1" in ran  # resumed, then to the cap
        assert f"{v}-r{r}-c0" not in ran and f"{v}-r{r}-c2" not in ran  # dropped at a rung
    assert set(results) == set(ran)
    trained = 16 * 3 + 8 * 6 + 4 * (20 - 9)
    assert trained < 16 * 20  # 140 epochs instead of 320
    ran_all, _ = successive_halving(jobs, None, lambda stage_jobs, k: run(stage_jobs, k), lambda job: 1.0)
    assert set(ran_all) == set(jobs)  # off: every candidate to the cap, one stage
    one = {k: j for k, j in jobs.items() if j["candidate"] == 0}
    stages.clear()
    successive_halving(one, h, run, lambda job: 1.0)
    assert len(stages) == 1 and all("until" not in j for j in stages[0].values())  # one candidate: no rung


def test_halving_in_the_spec(tmp_path):
    """``tuning.halving``: the default, its own numbers, ``off``, and errors that name the field."""
    from xmr.compare.halving import Halving

    variants = {"a": {"preset": "sccmrl"}}
    assert load_spec(_spec_file(tmp_path / "d.yaml", variants)).halving == Halving(3, 5)
    tuning = {"trials": 3, "params": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 3e-3}}}
    own = load_spec(_spec_file(tmp_path / "o.yaml", variants, tuning={**tuning, "halving": {"eta": 2, "first_rung": 5}}))
    assert own.halving == Halving(2, 5)
    (tmp_path / "off.yaml").write_text(Path(_spec_file(tmp_path / "off.yaml", variants, tuning=tuning)).read_text()
                                       .replace("tuning:\n", "tuning:\n  halving: off\n", 1))
    assert load_spec(str(tmp_path / "off.yaml")).halving is None
    with pytest.raises(SpecError, match=r"tuning\.halving\.eta = 1"):
        load_spec(_spec_file(tmp_path / "e.yaml", variants, tuning={**tuning, "halving": {"eta": 1}}))
    with pytest.raises(SpecError, match=r"tuning\.halving"):
        load_spec(_spec_file(tmp_path / "k.yaml", variants, tuning={**tuning, "halving": {"rungs": 3}}))


def test_a_run_paused_at_a_rung_resumes_as_the_same_run(tmp_path, tiny_category_dataset):
    """A candidate paused at a rung and resumed from its run folder trains exactly the run it
    would have trained without the pause (one schedule over the cap, the same batches): the
    same validation score at every epoch; the rung's result sees only the epochs up to it."""
    from xmr.compare.jobs import train_candidate
    from xmr.config import load_config

    def cfg(name):
        c = load_config("sccmrl", [f"data.path={tiny_category_dataset}", "model.embed_dim=8", "model.hidden_dim=16",
                                   "data.batch_size=16", "optim.epochs=4", "optim.patience=0", "tracking.enabled=false",
                                   f"storage.root={tmp_path}", f"storage.run_name={name}"])
        return c

    straight, history = train_candidate(cfg("straight"), None)
    paused, early = train_candidate(cfg("paused"), None, until=2)
    assert paused["epochs"] == 2 and [r["epoch"] for r in early if r["epoch"] >= 1] == [1, 2]
    resumed, later = train_candidate(cfg("paused"), None)
    metric = "map_mean"
    assert straight["epochs"] == resumed["epochs"] == 4
    assert [r[metric] for r in later if r["epoch"] >= 1] == pytest.approx([r[metric] for r in history if r["epoch"] >= 1])
    assert resumed["val_score"] == pytest.approx(straight["val_score"])
    assert paused["val_score"] == pytest.approx(max(r[metric] for r in history if 1 <= r["epoch"] <= 2))


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_halving_trains_fewer_epochs_and_still_picks_by_validation(tmp_path, monkeypatch, module_ray):
    """The same small spec with and without successive halving, on the local Ray: with it the
    stored jobs trained fewer epochs (every run to the cap without it: 2 variants x 2
    replicates x 3 candidates x 8 epochs; with it 3 x 2 epochs, then the best at epoch 2 on
    to 8, per group); the candidate that went on is the best at the rung by validation in
    every group (each variant offered the same candidates), and it is the chosen run; its
    resumed run is the run trained without a pause (the same validation score every epoch); a
    rerun into the same storage trains nothing again."""
    from xmr.compare.runner import run_comparison

    monkeypatch.chdir(tmp_path)
    raw = {"name": "halved", "dataset": {"path": "data", "synth": {"kind": "category", "n_classes": 4,
                                                                   "splits": {"train": 96, "val": 48, "test": 48},
                                                                   "seed": 2}},
           "metric": "map_mean", "seeds": 2,
           "common": ["data.batch_size=32", "model.embed_dim=16", "model.hidden_dim=32"],
           "training": {"max_epochs": 8, "patience": 20, "extend": 0},  # every run to its cap: known epochs
           "tuning": {"trials": 3, "widen": 0, "halving": {"eta": 3, "first_rung": 2},
                      "params": {"optim.lr": {"type": "loguniform", "low": 3.0e-4, "high": 1.0e-2}}},
           "variants": {"sccmrl": {"preset": "sccmrl"}, "triplet": {"preset": "triplet_category"}},
           "claims": ["sccmrl > triplet"]}
    on_path, off_path = tmp_path / "on.yaml", tmp_path / "off.yaml"
    on_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    off_path.write_text(yaml.safe_dump({**raw, "tuning": {**raw["tuning"], "halving": False}}, sort_keys=False))
    on = run_comparison(load_spec(str(on_path)), "on", concurrency=2)
    off = run_comparison(load_spec(str(off_path)), "off", concurrency=2)
    again = run_comparison(load_spec(str(on_path)), "on", concurrency=2)
    runs_on, runs_off = tmp_path / "on" / "halved" / "runs", tmp_path / "off" / "halved" / "runs"

    def stored(folder, name):
        path = folder / name
        return json.loads(path.read_text())["metrics"] if path.is_file() else None

    epochs_on = epochs_off = 0
    for variant in ("sccmrl", "triplet"):
        for r in (0, 1):
            names = [f"{variant}-r{r}-c{i}" for i in range(3)]
            rung = {n: stored(runs_on / n, "rung-2.json") for n in names}
            assert all(m is not None and m["epochs"] == 2 for m in rung.values())
            best = max(names, key=lambda n: (rung[n]["val_score"], -names.index(n)))
            final = {n: stored(runs_on / n, "result.json") for n in names}
            assert [n for n in names if final[n] is not None] == [best]  # only the rung's best went on
            assert final[best]["epochs"] == 8
            epochs_on += 3 * 2 + (8 - 2)
            full = {n: stored(runs_off / n, "result.json") for n in names}
            assert all(m["epochs"] == 8 for m in full.values())
            epochs_off += 3 * 8
            # resumed at the rung, it is the run trained straight through
            assert final[best]["val_score"] == pytest.approx(full[best]["val_score"])
            paused = pd.read_csv(runs_on / best / "metrics.csv")["map_mean"].tolist()
            straight = pd.read_csv(runs_off / best / "metrics.csv")["map_mean"].tolist()
            assert paused == pytest.approx(straight)
            chosen = on.tuning[(on.tuning["variant"] == variant) & (on.tuning["replicate"] == r) & on.tuning["chosen"]]
            assert chosen["candidate"].tolist() == [names.index(best)]
            dropped = on.tuning[(on.tuning["variant"] == variant) & (on.tuning["replicate"] == r)
                                & ~on.tuning["chosen"]]
            assert dropped["dropped_at"].tolist() == [2, 2] and (dropped["epochs"] == 2).all()
    assert on.notes["tuning_epochs"] == epochs_on == 48 and off.notes["tuning_epochs"] == epochs_off == 96
    assert on.notes["halving"] == {"eta": 3, "first_rung": 2} and off.notes["halving"] == "off"
    offered = on.tuning.groupby(["replicate", "variant"])["optim.lr"].apply(sorted).unstack()
    assert offered["sccmrl"].tolist() == offered["triplet"].tolist()  # the same candidates in both variants
    # a rerun into the same storage keeps every finished job: the same results, none trained again
    assert again.runs["val_score"].tolist() == on.runs["val_score"].tolist()
    assert again.runs["wall_s"].tolist() == pytest.approx(on.runs["wall_s"].tolist())


def test_a_rung_result_is_its_rungs_own(tmp_path):
    """A candidate's run folder keeps one result per rung it paused at beside the result of its
    run to the cap: each job reads only its own file, and a stored rung result of another job
    (another draw) is refused like a run's; the run to the cap keeps the identity it had before
    halving (no rung in it), so its stored results still match."""
    from xmr.compare.jobs import RESULT, check_stored, identity, result_file
    from xmr.train.runfs import RunDir

    job = {"variant": "flat", "seed": 0, "phase": "tune", "level": None, "values": {"optim.lr": 0.001},
           "split": "val", "config": {"optim": {"lr": 0.001, "epochs": 30}}, "pretrain": None, "run": "flat-r0-c0",
           "endpoint_url": None}
    rung = {**job, "until": 5}
    assert result_file(job) == RESULT and result_file(rung) == "rung-5.json"
    assert "until" not in identity(job) and identity(rung)["until"] == 5
    runs = str(tmp_path / "runs")
    RunDir(runs, job["run"]).write_text("rung-5.json", json.dumps({"job": identity(rung), "metrics": {"epochs": 5}}))
    check_stored({"r": rung, "f": job}, runs)  # the rung's own; the run to the cap has none yet
    with pytest.raises(SpecError, match="values"):
        check_stored({"r": {**rung, "values": {"optim.lr": 0.002}}}, runs)
    check_stored({"r": {**rung, "until": 15}}, runs)  # another rung: another file, nothing stored
