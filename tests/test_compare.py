"""``xmr compare``: the statistics against scipy on constructed data with known answers, the
spec checks, and a tiny claim map (2 levels x 2 seeds, tuning, a broken variant) end to
end on the local Ray."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from xmr.compare.spec import SpecError, load_spec
from xmr.compare.stats import detectable_difference, paired_difference, t_interval, verdict

pytestmark = pytest.mark.timeout(420)


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


def test_seeds_to_detect_is_where_the_detectable_difference_reaches_the_mean():
    from xmr.compare.stats import seeds_to_detect

    n = seeds_to_detect(0.01, 0.02)
    assert detectable_difference(0.02, n) <= 0.01 < detectable_difference(0.02, n - 1)
    # the normal approximation ((z_a/2 + z_b) sd / d)^2 is a lower bound the t-test needs a few more than
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert math.ceil((z * 0.02 / 0.01) ** 2) <= n <= math.ceil((z * 0.02 / 0.01) ** 2) + 3
    assert seeds_to_detect(0.0, 0.02) is None and seeds_to_detect(1e-6, 1.0, most=50) is None


def test_busy_seconds_counts_concurrent_runs_once():
    from xmr.compare.runner import busy_seconds

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
    # a positive mean with an interval across 0 is not "held" (the old report said held here)
    overlap = paired_difference({0: 0.06, 1: 0.05, 2: 0.055}, {0: 0.01, 1: 0.09, 2: 0.03})
    assert overlap.mean > 0 and verdict(overlap, ">") == "inconclusive"
    with pytest.raises(ValueError, match="operator"):
        verdict(clear, ">=")


def test_detectable_difference_matches_a_power_calculation():
    """At the reported difference, a paired t-test has 80% power (noncentral t, scipy)."""
    sd, n = 0.02, 6
    mde = detectable_difference(sd, n)
    crit = stats.t.ppf(0.975, n - 1)
    nc = mde / (sd / math.sqrt(n))
    power = stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc)
    assert power == pytest.approx(0.8, abs=0.03)
    assert detectable_difference(sd, 20) < mde and math.isnan(detectable_difference(sd, 1))


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
    assert k.variants["k_past_batch_bank"].config.negatives.memory_bank > 0


def test_tiny_claim_map_end_to_end(tmp_path, monkeypatch):
    """2 levels x 2 seeds x 3 variants (one broken) with one tuning trial each, on the local
    Ray: the broken variant is reported failed while the others finish, verdicts are the
    scipy-checked paired intervals, and the page is rebuilt with its overview."""
    import ray

    from xmr.compare.report import update_report
    from xmr.compare.runner import run_comparison

    monkeypatch.chdir(tmp_path)  # relative paths, as a user writes them: trials run in working dirs of their own
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "tiny", "claim": "SCCMRL beats the triplet baseline whatever the number of classes.",
        "dataset": {"path": "data",
                    "synth": {"kind": "category", "splits": {"train": 96, "val": 32, "test": 32}, "seed": 1}},
        "metric": "map_mean", "seeds": 2,
        "common": ["data.batch_size=32", "model.embed_dim=16", "model.hidden_dim=32"],
        "training": {"max_epochs": 1, "patience": 1},  # the machinery, not the models
        "tuning": {"trials": 1, "params": {"optim.lr": {"type": "loguniform", "low": 5.0e-4, "high": 2.0e-3}}},
        "variants": {"sccmrl": {"preset": "sccmrl"}, "triplet": {"preset": "triplet_category"},
                     "broken": {"preset": "sccmrl", "set": [f"model.pretrained={tmp_path / 'no-such-checkpoint'}"]}},
        "claims": ["sccmrl > triplet"],
        "map": {"property": "n_classes", "levels": [4, 8], "label": "classes"}}))
    spec = load_spec(str(spec_path))
    t0 = time.perf_counter()
    try:
        c = run_comparison(spec, "out", concurrency=2)
    finally:
        ray.shutdown()
    call_s = time.perf_counter() - t0
    runs = c.runs
    assert len(runs) == 12 and set(runs["level"]) == {4, 8}
    ok = runs[runs["variant"] != "broken"]
    assert (ok["status"] == "ok").all() and ok["map_mean"].notna().all()
    broken = runs[runs["variant"] == "broken"]
    assert (broken["status"] == "failed").all() and broken["error"].str.contains("no-such-checkpoint").all()
    assert len(c.tuning) == 3 and set(c.chosen) == {"sccmrl", "triplet", "broken"}
    assert ok["wall_s"].max() <= c.wall_s < call_s  # the runs' busy time: within the call, not the call itself
    assert "optim.lr" in c.chosen["sccmrl"] and c.chosen["broken"] == {}  # its tuning trial failed too
    for level in (4, 8):
        at = ok[ok["level"] == level]
        left = at[at["variant"] == "sccmrl"].set_index("seed")["map_mean"]
        right = at[at["variant"] == "triplet"].set_index("seed")["map_mean"]
        diff = (left - right).sort_index().to_numpy()
        claim = next(cl for cl in c.claims if cl["level"] == level)
        ref = stats.t.interval(0.95, df=1, loc=diff.mean(), scale=stats.sem(diff))
        assert (claim["low"], claim["high"]) == pytest.approx(ref) and claim["n"] == 2
        assert claim["verdict"] in ("held", "reversed", "inconclusive")
    out = tmp_path / "out" / "tiny"
    assert pd.read_csv(out / "runs.csv").shape[0] == 12
    for name in ("summary.csv", "paired.csv", "tuning.csv", "summary.md", "map_mean.png", "claims.json"):
        assert (out / name).is_file(), name
    assert (out / "map_mean.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "runs" / "4-sccmrl-seed0" / "best" / "model.safetensors").is_file()  # the scored checkpoint
    report = tmp_path / "results.md"
    update_report(report, c)
    update_report(report, c)  # replaces its own section instead of appending a second one
    text = report.read_text()
    assert text.count("<!-- xmr-compare:tiny:start -->") == 1 and "| broken |" in text and "failed" in text
    assert "## All claims" in text and text.count("`sccmrl > triplet`") >= 4  # overview + section, 2 levels each
    assert "Reproduce: `xmr compare --spec tiny" in text
