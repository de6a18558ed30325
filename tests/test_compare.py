"""``xmr compare``: 2 variants x 2 seeds on tiny synthetic data on the local Ray, a broken
variant reported as failed while the others finish, and the confidence intervals checked
against scipy's t-interval."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from xmr.compare.spec import SpecError, load_spec
from xmr.compare.stats import t_interval

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
    # n = 3: the 97.5% t quantile with 2 degrees of freedom is 4.302653
    if len(values) == 3 and std > 0:
        assert high - mean == pytest.approx(4.302652729911275 * std / math.sqrt(3))


def test_single_value_has_no_interval():
    mean, std, low, high = t_interval([0.4])
    assert mean == 0.4 and math.isnan(std) and math.isnan(low) and math.isnan(high)


def test_bad_spec_names_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"dataset": {"path": "x"}, "metric": "map_mean",
                                    "variants": {"a": {"preset": "sccmrl"}}, "expect": ["a > b"]}))
    with pytest.raises(SpecError, match=r"expect\[0\] = 'a > b'"):
        load_spec(str(path))
    path.write_text(yaml.safe_dump({"dataset": {"path": "x"}, "metric": "map_mean",
                                    "variants": {"a": {"preset": "sccmrl", "set": ["negatives.k=0"]}}}))
    with pytest.raises(SpecError, match="variants.a: negatives.k = 0"):
        load_spec(str(path))


def test_shipped_specs_load():
    for name in ("multineg_vs_triplet", "k_sweep", "qacln_ablation", "mixer_pretraining", "cdaml_hierarchy"):
        spec = load_spec(name)
        assert spec.expect and len(spec.seeds) >= 3


def test_two_variants_two_seeds_and_a_broken_one(tmp_path):
    import ray

    from xmr.compare.runner import run_comparison, update_report

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "tiny", "claim": "SCCMRL beats the triplet baseline.",
        "dataset": {"path": str(tmp_path / "data"),
                    "synth": {"kind": "category", "splits": {"train": 160, "val": 40, "test": 40}, "seed": 1}},
        "metric": "map_mean", "seeds": 2,
        "common": ["optim.epochs=2", "data.batch_size=32", "model.embed_dim=16", "model.hidden_dim=32"],
        "variants": {"sccmrl": {"preset": "sccmrl"}, "triplet": {"preset": "triplet_category"},
                     "broken": {"preset": "sccmrl", "set": [f"model.pretrained={tmp_path / 'no-such-checkpoint'}"]}},
        "expect": ["sccmrl > triplet"]}))
    spec = load_spec(str(spec_path))
    try:
        c = run_comparison(spec, str(tmp_path / "out"), concurrency=3)
    finally:
        ray.shutdown()
    runs = c.runs
    assert len(runs) == 6
    ok = runs[runs["variant"] != "broken"]
    assert (ok["status"] == "ok").all() and ok["map_mean"].notna().all()
    broken = runs[runs["variant"] == "broken"]
    assert (broken["status"] == "failed").all() and broken["error"].str.contains("no-such-checkpoint").all()
    s = c.summary.set_index("variant")
    for v in ("sccmrl", "triplet"):
        vals = ok.loc[ok["variant"] == v, "map_mean"]
        ref = stats.t.interval(0.95, df=1, loc=vals.mean(), scale=stats.sem(vals))
        assert (s.loc[v, "map_mean_ci_low"], s.loc[v, "map_mean_ci_high"]) == pytest.approx(ref)
    assert s.loc["broken", "n_failed"] == 2 and s.loc["broken", "n_ok"] == 0
    assert c.claims[0]["claim"] == "sccmrl > triplet" and c.claims[0]["status"] in ("held", "did not hold")
    out = tmp_path / "out" / "tiny"
    assert pd.read_csv(out / "runs.csv").shape[0] == 6
    for name in ("summary.csv", "summary.md", "map_mean.png", "claims.json"):
        assert (out / name).is_file(), name
    assert (out / "map_mean.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = tmp_path / "results.md"
    update_report(report, c)
    update_report(report, c)  # replaces its own section instead of appending a second one
    text = report.read_text()
    assert text.count("<!-- xmr-compare:tiny:start -->") == 1 and "| broken |" in text and "failed" in text
