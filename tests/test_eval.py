"""``xmr eval``: the TVR prediction file scores (by the project's standalone TVR evaluation)
to the metrics.json it writes, which equal the in-training evaluation of the same
checkpoint; NMS; per-query ranks for category data; mismatches fail before any work; and
the Ray-workers path gives what one process gives."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from xmr.checkpoint import save_checkpoint
from xmr.checks import resolve
from xmr.config import ConfigError, load_config
from xmr.data.manifest import load_manifest
from xmr.data.sources.synth_vcmr import SynthVcmrConfig, write_synth_vcmr
from xmr.metrics.tvr import evaluate_tvr
from xmr.metrics.vcmr import nms_spans, temporal_iou
from xmr.tasks.evaluate import evaluate
from xmr.train.eval import run_eval
from xmr.train.fit import fit_in_process

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def vcmr(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = str(root / "vcmr")
    write_synth_vcmr(data, SynthVcmrConfig(splits={"train": 80, "val": 30}, max_duration=40.0, seed=3), progress=False)
    cfg, _ = resolve(load_config("qacln", [f"data.path={data}", "model.embed_dim=16", "model.num_heads=2",
                                           "optim.epochs=3", "optim.lr=1e-3", "model.top_videos=20"]))
    run = fit_in_process(cfg)
    ckpt = str(save_checkpoint(root / "ckpt", run.method, cfg))
    return {"root": root, "data": data, "ckpt": ckpt, "method": run.method, "cfg": cfg}


def _ground_truth(data, split):
    from xmr.data.reader import make_loader

    items = []
    for b in make_loader(data, split, local_batch_size=64, shuffle=False, unit="query"):
        items += [{"desc_id": int(d), "vid_name": v, "ts": t.tolist(), "type": ty}
                  for d, v, t, ty in zip(b["desc_id"], b["vid_name"], b["ts"], b["type"])]
    return items


def test_vcmr_predictions_score_to_metrics_json_and_to_training_evaluation(vcmr):
    out = vcmr["root"] / "out"
    result = run_eval(vcmr["ckpt"], str(out), split="val", verbose=False)
    saved = json.loads((out / "metrics.json").read_text())["metrics"]
    sub = json.loads((out / "predictions.json").read_text())
    assert set(sub) == {"video2idx", "VCMR", "SVMR", "VR"}
    assert all(len(e["predictions"]) <= 100 for task in ("VCMR", "SVMR", "VR") for e in sub[task])
    for e in sub["VCMR"]:  # ranked: scores never increase down the list
        scores = [p[3] for p in e["predictions"]]
        assert scores == sorted(scores, reverse=True)
    public = evaluate_tvr(sub, _ground_truth(vcmr["data"], "val"))
    for k in (1, 10, 100):
        assert public["VR"][f"r{k}"] == pytest.approx(100 * saved[f"vr_r{k}"], abs=0.006)
        for iou in (0.5, 0.7):
            assert public["VCMR"][f"{iou}-r{k}"] == pytest.approx(100 * saved[f"vcmr_{iou}_r{k}"], abs=0.006)
    for iou in (0.5, 0.7):
        assert public["SVMR"][f"{iou}-r1"] == pytest.approx(100 * saved[f"svmr_{iou}_r1"], abs=0.006)
    training = evaluate(vcmr["method"], vcmr["cfg"], load_manifest(vcmr["data"]), "val")
    for key, value in training.items():
        assert saved[key] == pytest.approx(value, abs=1e-9), key
    assert set(saved["by_type"]) <= {"v", "t", "vt"} and sum(t["queries"] for t in saved["by_type"].values()) == \
        len(sub["VCMR"])
    assert public["VCMR_by_type"]["desc_type_ratio"].startswith("v ")
    assert result.metrics["vcmr_0.7_r10"] == saved["vcmr_0.7_r10"]


def test_nms_removes_overlapping_spans_and_keeps_the_order():
    video = np.array([[0, 0, 1, 0, 1, 2, -1]])
    t_s = np.array([[0.0, 0.5, 0.0, 10.0, 0.2, 0.0, 0.0]])
    t_e = np.array([[3.0, 3.0, 3.0, 12.0, 3.2, 1.0, 0.0]])
    score = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, -np.inf]])
    v, s, e, sc = nms_spans(video, t_s, t_e, score, iou=0.5, keep=4)
    # (0, 0.5-3.0) overlaps (0, 0-3) at IoU 0.83 and goes; (1, 0.2-3.2) overlaps (1, 0-3) at 0.875 and goes
    assert v.tolist() == [[0, 1, 0, 2]] and sc.tolist() == [[0.9, 0.7, 0.6, 0.4]]
    assert s.tolist() == [[0.0, 0.0, 10.0, 0.0]] and e.tolist() == [[3.0, 3.0, 12.0, 1.0]]
    v2, *_ = nms_spans(video, t_s, t_e, score, iou=0.9, keep=10)  # a looser threshold keeps both near-duplicates
    assert v2[0, :6].tolist() == [0, 0, 1, 0, 1, 2] and v2[0, 6] == -1


def test_eval_with_nms_writes_no_overlapping_moments(vcmr):
    out = vcmr["root"] / "nms"
    run_eval(vcmr["ckpt"], str(out), split="val", nms=0.5, verbose=False)
    sub = json.loads((out / "predictions.json").read_text())
    for e in sub["VCMR"][:20]:
        preds = np.array(e["predictions"])
        for i in range(len(preds)):
            same = preds[:i][preds[:i, 0] == preds[i, 0]]
            if len(same):
                assert (temporal_iou(same[:, 1:3], preds[i, 1:3]) <= 0.5 + 1e-9).all()
    assert json.loads((out / "metrics.json").read_text())["nms"] == 0.5


def test_category_per_query_ranks_agree_with_map(tiny_category_dataset, tmp_path):
    cfg, _ = resolve(load_config("sccmrl", [f"data.path={tiny_category_dataset}", "model.embed_dim=8",
                                            "model.hidden_dim=16", "optim.epochs=2"]))
    run = fit_in_process(cfg)
    ckpt = str(save_checkpoint(tmp_path / "ckpt", run.method, cfg))
    run_eval(ckpt, str(tmp_path / "out"), split="val", verbose=False)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    rows = pd.read_csv(tmp_path / "out" / "per_query.csv")
    assert set(rows["direction"]) == {"a2b", "b2a"} and len(rows) == 2 * 13
    for direction in ("a2b", "b2a"):
        d = rows[rows["direction"] == direction]
        assert d["ap"].dropna().mean() == pytest.approx(metrics[f"map_{direction}"], abs=1e-9)
        assert ((d["first_relevant_rank"] >= 1) | d["ap"].isna()).all()
    assert rows["query"].str.startswith("val_").all()


def test_a_checkpoint_that_does_not_fit_the_data_fails_before_any_work(vcmr, tiny_category_dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"'vcmr' model .* is a 'category' dataset"):
        run_eval(vcmr["ckpt"], str(tmp_path / "x"), data=str(tiny_category_dataset), verbose=False)
    other = str(tmp_path / "wide")
    write_synth_vcmr(other, SynthVcmrConfig(splits={"val": 5}, dim_visual=12, seed=1), progress=False)
    with pytest.raises(ConfigError, match=r"'visual' inputs are \[32\], but .* has \[12\]"):
        run_eval(vcmr["ckpt"], str(tmp_path / "x"), data=other, verbose=False)
    with pytest.raises(ConfigError, match="--split 'nope'"):
        run_eval(vcmr["ckpt"], str(tmp_path / "x"), split="nope", verbose=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.ray
def test_ray_workers_give_what_one_process_gives(vcmr):
    import ray

    one, two = vcmr["root"] / "one", vcmr["root"] / "two"
    run_eval(vcmr["ckpt"], str(one), split="val", verbose=False)
    try:
        run_eval(vcmr["ckpt"], str(two), split="val", workers=2, verbose=False)
    finally:
        ray.shutdown()
    a = json.loads((one / "metrics.json").read_text())["metrics"]
    b = json.loads((two / "metrics.json").read_text())["metrics"]
    for key, value in a.items():
        if isinstance(value, float):
            assert b[key] == pytest.approx(value, abs=1e-6) or (math.isnan(value) and math.isnan(b[key])), key
    pa, pb = (json.loads((p / "predictions.json").read_text()) for p in (one, two))
    assert [e["desc_id"] for e in pa["VCMR"]] == [e["desc_id"] for e in pb["VCMR"]]
    # the same videos and spans; scores equal to float32 rounding (the workers' encoder batches
    # differ from the one process's, so the last bits of a dot product may too)
    top_a, top_b = pa["VR"][0]["predictions"][:5], pb["VR"][0]["predictions"][:5]
    assert [p[:3] for p in top_a] == [p[:3] for p in top_b]
    assert [p[3] for p in top_a] == pytest.approx([p[3] for p in top_b], rel=1e-5, abs=1e-6)


def test_eval_prints_progress_over_the_corpus_and_the_queries(vcmr, capsys):
    from xmr.runtime import Runtime

    # XMR_PROGRESS_EVERY_S=1e-9 (a line after every batch), as xmr eval's runtime reads it
    runtime = Runtime.from_env({"XMR_PROGRESS_EVERY_S": "1e-9"})
    run_eval(vcmr["ckpt"], str(vcmr["root"] / "progress"), split="val", verbose=False, runtime=runtime)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[xmr] val: ")]
    encoding = [line for line in lines if "encoding videos" in line]
    ranking = [line for line in lines if "ranking queries" in line]
    assert encoding and encoding[-1].startswith("[xmr] val: encoding videos: 30/30 videos")
    n_queries = load_manifest(vcmr["data"]).splits["val"].num_queries
    assert ranking and f"{n_queries}/{n_queries} queries" in ranking[-1] and "/s" in ranking[-1]
