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


def test_variants_are_offered_the_same_candidates_whatever_their_order(tmp_path):
    """Shared parameters get the same draws in every variant; a variant's own parameter is
    drawn on top and does not depend on its position in the spec."""
    from xmr.compare.runner import tuning_candidates

    variants = {"a": {"preset": "sccmrl", "tune": {"loss.temperature": {"type": "loguniform", "low": 0.05, "high": 0.3}}},
                "b": {"preset": "sccmrl"},
                "c": {"preset": "triplet_category", "tune": {"loss.margin": {"type": "uniform", "low": 0.1, "high": 0.5}}}}
    forward = tuning_candidates(load_spec(_spec_file(tmp_path / "f.yaml", variants)))
    backward = tuning_candidates(load_spec(_spec_file(tmp_path / "b.yaml", dict(reversed(list(variants.items()))))))
    assert forward == backward
    lrs = {n: [c["optim.lr"] for c in cands] for n, cands in forward.items()}
    assert lrs["a"] == lrs["b"] == lrs["c"] and len(set(lrs["a"])) == 3
    assert [set(c) for c in forward["a"]] == [{"optim.lr", "loss.temperature"}] * 3
    assert len({c["loss.margin"] for c in forward["c"]}) == 3
    other_seed = tuning_candidates(load_spec(_spec_file(tmp_path / "s.yaml", variants), tuning_seed=7))
    assert [c["optim.lr"] for c in other_seed["a"]] != lrs["a"]


def test_peaked_at_cap():
    from xmr.compare.runner import peaked_at_cap

    assert peaked_at_cap({"best_epoch": 30, "epochs": 30}, 30)
    assert not peaked_at_cap({"best_epoch": 27, "epochs": 30}, 30)  # early stopping ended it
    assert not peaked_at_cap({"best_epoch": 12, "epochs": 12}, 30)  # ended by patience, best last: impossible, not capped
    assert not peaked_at_cap({"error": "boom"}, 30) and not peaked_at_cap({}, 30)


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
    for name in ("qacln_ablation", "map_qcf_single_stream"):  # the paper's own learning rate is a candidate's range
        lr = next(p for p in load_spec(name).variants["full"].tune if p.path == "optim.lr")
        assert lr.low <= 1e-4 <= lr.high, name


@pytest.mark.ray
def test_tiny_claim_map_end_to_end(tmp_path, monkeypatch):
    """2 levels x 2 seeds x 3 variants (one broken) with one tuning trial each at each level,
    on the local Ray: the broken variant is reported failed while the others finish; runs
    that peak at their 1-epoch cap are rerun at 2 and flagged where they still peak; verdicts
    are the scipy-checked paired intervals, and the page is rebuilt with its overview."""
    import ray

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
        "training": {"max_epochs": 1, "patience": 1, "extend": 1},  # the machinery, not the models
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
    assert len(c.tuning) == 6 and set(c.chosen) == {"sccmrl", "triplet", "broken"}  # tuned at both levels
    assert ok["wall_s"].max() <= c.wall_s < call_s  # the runs' busy time: within the call, not the call itself
    assert all("optim.lr" in c.chosen["sccmrl"][lv] for lv in ("4", "8"))
    assert c.chosen["broken"] == {"4": {}, "8": {}}  # its tuning trials failed too
    # every working run peaked at its 1-epoch cap, so each was rerun at 2; the broken one was not
    assert (ok["cap"] == 2).all() and (ok["extended"] == 1).all() and (broken["cap"] == 1).all()
    assert (ok["epochs"] <= 2).all() and (ok["peaked_at_cap"] == (ok["best_epoch"] == 2)).all()
    for cl in c.claims:  # a verdict names the variants still at the cap
        capped = {n for n in ("sccmrl", "triplet") if ok[(ok["variant"] == n) & (ok["level"] == cl["level"])]["peaked_at_cap"].any()}
        assert set(filter(None, cl["not_converged"].split(", "))) == capped
    for level in (4, 8):
        at = ok[ok["level"] == level]
        left = at[at["variant"] == "sccmrl"].set_index("seed")["map_mean"]
        right = at[at["variant"] == "triplet"].set_index("seed")["map_mean"]
        diff = (left - right).sort_index().to_numpy()
        claim = next(cl for cl in c.claims if cl["level"] == level)
        ref = stats.t.interval(0.95, df=1, loc=diff.mean(), scale=stats.sem(diff))
        assert (claim["low"], claim["high"]) == pytest.approx(ref) and claim["n"] == 2
        assert claim["p"] == pytest.approx(stats.ttest_rel(left.sort_index(), right.sort_index()).pvalue, nan_ok=True)
        assert claim["verdict"] in ("held", "reversed", "equivalent", "inconclusive")
    assert [cl["p_holm"] for cl in c.claims] == pytest.approx(holm([cl["p"] for cl in c.claims]), nan_ok=True)
    out = tmp_path / "out" / "tiny"
    assert pd.read_csv(out / "runs.csv").shape[0] == 12
    for name in ("summary.csv", "paired.csv", "tuning.csv", "summary.md", "map_mean.png", "claims.json"):
        assert (out / name).is_file(), name
    assert (out / "map_mean.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the scored checkpoint is the run folder's best, as best.json names it
    best = json.loads((out / "runs" / "4-sccmrl-seed0-cap2" / "best.json").read_text())
    assert (Path(best["checkpoint"]) / "model.safetensors").is_file()
    scored = c.runs[(c.runs["level"].astype(str) == "4") & (c.runs["variant"] == "sccmrl") & (c.runs["seed"] == 0)]
    assert int(scored["best_epoch"].item()) == best["epoch"]
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
    write_page(report, [c], "All runs took no time.")  # `--all` keeps it too
    assert report.read_text().count(notes) == 1
    assert "## All claims" in text and text.count("`sccmrl > triplet`") >= 4  # overview + section, 2 levels each
    assert "Reproduce: `xmr compare --spec tiny" in text


@pytest.mark.ray
def test_identical_variants_and_swapped_order_find_nothing(tmp_path, monkeypatch):
    """The instrument on known answers. A/A: two identical variants get the same candidates,
    the same chosen values, and a verdict that is never held or reversed. Order: listing the
    variants in the opposite order changes no chosen value, no run's score and no verdict.
    (Before the candidates were shared, each variant's draws came from its position.)"""
    import ray

    from xmr.compare.runner import run_comparison

    monkeypatch.chdir(tmp_path)
    variants = {"sccmrl": {"preset": "sccmrl"}, "sccmrl_again": {"preset": "sccmrl"},
                "triplet": {"preset": "triplet_category"}}
    common = {"dataset": {"path": "data", "synth": {"kind": "category", "n_classes": 4,
                                                    "splits": {"train": 96, "val": 32, "test": 32}, "seed": 3}},
              "seeds": 2, "common": ["data.batch_size=32", "model.embed_dim=16", "model.hidden_dim=32"],
              "training": {"max_epochs": 2, "patience": 1, "extend": 0},
              "claims": ["sccmrl > sccmrl_again", "sccmrl > triplet"]}
    forward = load_spec(_spec_file(tmp_path / "forward.yaml", variants, **common))
    backward = load_spec(_spec_file(tmp_path / "backward.yaml", dict(reversed(list(variants.items()))), **common))
    try:
        a = run_comparison(forward, "fwd", concurrency=2)
        b = run_comparison(backward, "bwd", concurrency=2)
    finally:
        ray.shutdown()
    for c in (a, b):
        assert (c.runs["status"] == "ok").all()
        assert c.chosen["sccmrl"] == c.chosen["sccmrl_again"] and "optim.lr" in c.chosen["sccmrl"]
        aa = next(cl for cl in c.claims if cl["claim"] == "sccmrl > sccmrl_again")
        assert aa["verdict"] not in ("held", "reversed"), aa
    assert a.chosen == b.chosen
    assert {cl["claim"]: cl["verdict"] for cl in a.claims} == {cl["claim"]: cl["verdict"] for cl in b.claims}
    score = lambda c: c.runs.set_index(["variant", "seed"])["map_mean"].sort_index()  # noqa: E731
    pd.testing.assert_series_equal(score(a), score(b))


def test_a_stored_result_is_reused_only_for_its_own_job(tmp_path):
    """A comparison run again into the same storage with another tuning seed (or --data,
    --set) has jobs of the same names and other values: the stored results are refused,
    naming what differs, instead of being handed back as this comparison's scores."""
    from xmr.compare.runner import RESULT, check_stored, identity
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
