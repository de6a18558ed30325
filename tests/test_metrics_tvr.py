"""TVR evaluation: exact metrics-file reproduction on real val annotations, export, CLI."""

from __future__ import annotations

import argparse
import io
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import needs_tvr

from xmr.metrics.cli import register
from xmr.metrics.tvr import (
    RankedPredictions,
    evaluate_tvr,
    export_predictions,
    load_ground_truth,
    load_video_index,
    ranked_from_clips,
)

pytestmark = pytest.mark.timeout(90)

TVR_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tvr"
VAL_JSONL = TVR_DIR / "tvr_val_release.jsonl"
VIDEO_INDEX = TVR_DIR / "tvr_video2dur_idx.json"


# ---------------------------------------------------------------- a realistic submission
def _perturbed_span(rng: random.Random, gt: dict[str, Any]) -> list[float]:
    """A span near the gt moment: exact, jittered, stretched to the video's edges, degenerate."""
    start, end = gt["ts"]
    duration = gt["duration"]
    kind = rng.random()
    if kind < 0.15:
        return [start, end]
    if kind < 0.25:
        return [0.0, end + rng.uniform(0, 3)]  # starts at the video start
    if kind < 0.35:
        return [max(0.0, start - rng.uniform(0, 3)), duration]  # ends at the video end
    if kind < 0.40:
        return [start, start]  # zero length
    if kind < 0.45:  # IoU exactly 0.5 / 0.7 in decimal, to exercise the float32 threshold
        return [start, start + (end - start) * rng.choice([0.5, 0.7])]
    scale = rng.choice([0.3, 1.0, 3.0, 8.0])
    s = min(max(0.0, start + rng.gauss(0, scale)), duration)
    e = min(max(s, end + rng.gauss(0, scale)), duration)
    return [round(s, 2), round(e, 2)]


def build_submission(n_queries: int = 300, seed: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Predictions for real val queries: right and random wrong videos, varied list lengths."""
    rng = random.Random(seed)
    gt_all = load_ground_truth(VAL_JSONL)
    gt = rng.sample(gt_all, n_queries)
    video2idx, durations = load_video_index(VIDEO_INDEX, "val")
    names = sorted(video2idx)
    sub: dict[str, Any] = {"video2idx": video2idx, "VCMR": [], "SVMR": [], "VR": []}
    for item in gt:
        right = video2idx[item["vid_name"]]
        n_pred = rng.choice([1, 2, 5, 9, 40, 99, 100, 101, 150])
        vcmr, svmr = [], []
        for rank in range(n_pred):
            score = round(1.0 - rank / 200, 1)  # many exact score ties
            on_gt = rng.random() < 0.4
            name = item["vid_name"] if on_gt else rng.choice(names)
            span = _perturbed_span(rng, item) if on_gt else [0.0, min(5.0, durations[name])]
            vcmr.append([video2idx[name], *span, score])
            svmr_video = right if rng.random() < 0.85 else video2idx[rng.choice(names)]
            svmr.append([svmr_video, *_perturbed_span(rng, item), score])
        vr_videos = [video2idx[n] for n in rng.sample(names, 120)]
        if right in vr_videos:
            vr_videos.remove(right)
        if rng.random() < 0.8:
            vr_videos.insert(rng.randrange(0, 110), right)
        vr = [[v, 0, 0, 1.0 - i / 1000] for i, v in enumerate(vr_videos[: rng.choice([3, 50, 100, 120])])]
        for task, preds in (("VCMR", vcmr), ("SVMR", svmr), ("VR", vr)):
            sub[task].append({"desc_id": item["desc_id"], "desc": item["desc"], "predictions": preds})
    rng.shuffle(sub["VCMR"])  # prediction order must not matter
    return sub, gt


# ------------------------------------------- an independent, plain per-query re-implementation
def _iou32(pred: list[float], gt: list[float]) -> np.float32:
    ps, pe, gs, ge = (np.float32(x) for x in (*pred, *gt))
    inter = max(np.float32(0), min(pe, ge) - max(ps, gs))
    union = max(pe, ge) - min(ps, gs)
    return inter / union if union != 0 else np.float32(0)


def _pct(count: int, total: int) -> float:
    return round(count / total * 100, 2) if total else float("nan")


def reference_eval(sub: dict[str, Any], gt: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    by_type_all: dict[str, Any] = {}
    types = ["v", "t", "vt"]
    for task in [t for t in ("VCMR", "SVMR", "VR") if t in sub]:
        preds = {e["desc_id"]: e["predictions"][:100] for e in sub[task]}
        correct: dict[str, list[bool]] = {}  # key -> per query, in gt order
        for item in gt:
            right = np.float32(sub["video2idx"][item["vid_name"]])
            rows = preds[item["desc_id"]]
            if task == "VR":
                for k in (1, 5, 10, 100):
                    hit = any(np.float32(p[0]) == right for p in rows[:k])
                    correct.setdefault(f"r{k}", []).append(hit)
                continue
            for thr in (0.5, 0.7):
                ok = [np.float32(p[0]) == right and _iou32(p[1:3], item["ts"]) >= np.float32(thr) for p in rows]
                if task == "SVMR":
                    ok = [o for o, p in zip(ok, rows) if np.float32(p[0]) == right]
                for k in (1, 5, 10, 100):
                    correct.setdefault(f"{thr}-r{k}", []).append(any(ok[:k]))
        out[task] = {key: _pct(sum(v), len(v)) for key, v in correct.items()}
        by_type: dict[str, Any] = {}
        for t in types:
            n_t = sum(item["type"] == t for item in gt)
            for key, v in correct.items():
                by_type[f"{t}-{key}"] = _pct(sum(c for c, item in zip(v, gt) if item["type"] == t), n_t)
        ratios = [_pct(sum(item["type"] == t for item in gt), len(gt)) for t in types]
        by_type["desc_type_ratio"] = f"v {ratios[0]} t {ratios[1]} vt {ratios[2]}"
        by_type_all[task] = by_type
    for task in list(out):
        out[f"{task}_by_type"] = by_type_all[task]
    return out


# --------------------------------------------------------------------------------- tests
@needs_tvr
def test_evaluate_tvr_matches_reference_on_real_val_queries() -> None:
    sub, gt = build_submission()
    got = evaluate_tvr(sub, gt)
    expected = reference_eval(sub, gt)
    assert list(got) == ["VCMR", "SVMR", "VR", "VCMR_by_type", "SVMR_by_type", "VR_by_type"]
    assert list(got["VCMR"]) == [f"{i}-r{k}" for i in (0.5, 0.7) for k in (1, 5, 10, 100)]
    assert list(got["VR"]) == ["r1", "r5", "r10", "r100"]
    assert list(got["SVMR_by_type"])[:2] == ["v-0.5-r1", "v-0.5-r5"]
    assert list(got["VR_by_type"])[-1] == "desc_type_ratio"
    assert json.dumps(got) == json.dumps(expected)  # every key, order and value
    assert 0 < got["VCMR"]["0.5-r1"] < got["VCMR"]["0.5-r100"] < 100  # a non-trivial case


def _gt(desc_id: int, ts: list[float], vid: str = "a", duration: float = 30.0, kind: str = "v") -> dict[str, Any]:
    return {"desc_id": desc_id, "vid_name": vid, "ts": ts, "duration": duration, "type": kind, "desc": "d"}


def _sub(task: str, rows: dict[int, list[list[float]]]) -> dict[str, Any]:
    return {"video2idx": {"a": 7, "b": 8}, task: [{"desc_id": d, "desc": "d", "predictions": p} for d, p in rows.items()]}


def test_hand_worked_ties_short_lists_truncation_and_edges() -> None:
    gt = [_gt(1, [0.0, 3.0]), _gt(2, [27.0, 30.0], kind="t"), _gt(3, [10.0, 20.0], kind="vt")]
    rows = {
        # equal scores: list order decides, so the correct one is rank 2
        1: [[7, 10.0, 12.0, 0.5], [7, 0.0, 3.0, 0.5]],
        # edge moment ending at the duration, one prediction only
        2: [[7, 27.0, 30.0, 0.9]],
        # the only correct prediction sits at position 101: it must not count
        3: [[8, 10.0, 20.0, 1.0]] * 100 + [[7, 10.0, 20.0, 0.1]],
    }
    got = evaluate_tvr(_sub("VCMR", rows), gt)
    assert got["VCMR"]["0.7-r1"] == round(1 / 3 * 100, 2)
    assert got["VCMR"]["0.7-r5"] == round(2 / 3 * 100, 2) == got["VCMR"]["0.7-r100"]
    assert got["VCMR_by_type"]["v-0.7-r1"] == 0.0 and got["VCMR_by_type"]["t-0.7-r1"] == 100.0
    assert got["VCMR_by_type"]["desc_type_ratio"] == "v 33.33 t 33.33 vt 33.33"


def test_svmr_counts_only_predictions_on_the_gt_video() -> None:
    gt = [_gt(1, [5.0, 10.0])]
    rows = {1: [[8, 0.0, 1.0, 1.0]] * 3 + [[7, 5.0, 10.0, 0.5]]}
    got = evaluate_tvr(_sub("SVMR", rows), gt)
    assert got["SVMR"]["0.7-r1"] == 100.0  # wrong-video predictions are skipped
    vcmr = evaluate_tvr(_sub("VCMR", rows), gt)
    assert vcmr["VCMR"]["0.7-r1"] == 0.0 and vcmr["VCMR"]["0.7-r5"] == 100.0
    # truncation to 100 happens before the video filter: a match at position 101 is ignored
    late = {1: [[8, 0.0, 1.0, 1.0]] * 100 + [[7, 5.0, 10.0, 0.5]]}
    assert evaluate_tvr(_sub("SVMR", late), gt)["SVMR"]["0.5-r1"] == 0.0


def test_float32_threshold_and_missing_types() -> None:
    # IoU 7/10 computed in float32 equals float32(0.7): correct at 0.7, as upstream
    gt = [{"desc_id": 1, "vid_name": "a", "ts": [0.0, 10.0]}]
    got = evaluate_tvr(_sub("VCMR", {1: [[7, 0.0, 7.0, 1.0]]}), gt)
    assert got["VCMR"]["0.7-r1"] == 100.0
    assert list(got) == ["VCMR"]  # no query types in the gt: no *_by_type blocks
    empty = evaluate_tvr(_sub("VR", {1: []}), gt)  # an empty list is a miss, not a crash
    assert empty["VR"]["r100"] == 0.0


def test_mismatched_desc_ids_are_named() -> None:
    gt = [_gt(1, [0.0, 3.0]), _gt(2, [0.0, 3.0])]
    with pytest.raises(ValueError, match=r"1 missing from predictions \(e.g. \[2\]\), 1 not in the ground truth \(e.g. \[9\]\)"):
        evaluate_tvr(_sub("VR", {1: [[7, 0, 0, 1]], 9: [[7, 0, 0, 1]]}), gt)
    with pytest.raises(ValueError, match="desc_id 1 appears more than once"):
        evaluate_tvr({"video2idx": {"a": 7}, "VR": [{"desc_id": 1, "predictions": []}] * 2}, gt[:1])
    with pytest.raises(ValueError, match="not in submission video2idx"):
        evaluate_tvr(_sub("VR", {1: []}), [_gt(1, [0.0, 1.0], vid="zzz")])


def test_export_predictions_round_trips_through_evaluation() -> None:
    gt = [_gt(1, [1.5, 4.5], vid="b"), _gt(2, [0.0, 3.0], vid="a", kind="t")]
    corpus = ["a", "b"]  # positions 0, 1 -> TVR indices 7, 8
    video = np.array([[1, 0, -1], [0, 1, 1]])
    ranked = ranked_from_clips(video, st=[[1, 0, -1], [0, 0, 2]], ed=[[1, 0, -1], [0, 0, 3]],  # inclusive ends
                               score=[[0.9, 0.5, -np.inf], [0.8, 0.7, 0.6]], durations=[30.0, 5.0])
    vr = RankedPredictions.videos_only(video, np.ones(video.shape))
    sub = export_predictions([1, 2], ["q1", "q2"], {"a": 7, "b": 8}, corpus, vcmr=ranked, vr=vr)
    assert list(sub) == ["video2idx", "VCMR", "VR"]
    assert sub["VCMR"][0]["predictions"] == [[8, 1.5, 3.0, 0.9], [7, 0.0, 1.5, 0.5]]  # padding dropped
    assert sub["VCMR"][1]["predictions"][2] == [8, 3.0, 5.0, 0.6]  # the last (partial) clip ends at the video end
    assert sub["VR"][0]["predictions"][0] == [8, 0.0, 0.0, 1.0]
    json.dumps(sub)  # plain Python types only
    got = evaluate_tvr(sub, gt)
    assert (got["VCMR"]["0.5-r1"], got["VCMR"]["0.7-r100"], got["VR"]["r1"]) == (100.0, 0.0, 100.0)


@needs_tvr
def test_cli_round_trip(tmp_path: Path) -> None:
    sub, gt = build_submission(n_queries=40, seed=1)
    pred_path, gt_path, out_path = tmp_path / "p.json", tmp_path / "gt.jsonl", tmp_path / "m" / "metrics.json"
    pred_path.write_text(json.dumps(sub))
    gt_path.write_text("".join(json.dumps(item) + "\n" for item in gt))
    parser = argparse.ArgumentParser(prog="xmr")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["metrics", "tvr", "--predictions", str(pred_path),
                              "--ground-truth", str(gt_path), "--out", str(out_path)])
    printed = io.StringIO()
    assert args.func(args, stdout=printed) == 0
    text = out_path.read_text()
    assert json.loads(text) == evaluate_tvr(sub, gt)
    assert text.startswith('{\n    "VCMR": {\n        "0.5-r1": ')  # indent 4, public key order
    table = printed.getvalue()
    assert "VCMR" in table and "0.7-r100" in table and "r100" in table
    assert not math.isnan(json.loads(text)["VR"]["r1"])
