"""The public TVR evaluation layout: prediction files, ground truth, and the metrics file.

``evaluate_tvr`` reproduces the metrics JSON of the public standalone evaluation
(jayleicn/TVRetrieval ``standalone_eval/eval.py``, MIT) key for key and value for value,
including its numeric details: predictions and ground-truth times are cast to float32,
IoU is computed in float32 and compared with the float32 threshold, only the first 100
predictions of a query count, the score column is ignored (list order is the ranking, so
score ties change nothing), and percentages are ``round(np.float64(x) * 100, 2)``.
Where the public script would crash or silently misbehave we raise a clear error instead
(mismatched or duplicate desc_ids, unknown video names, malformed predictions); a query
with an empty prediction list simply counts as a miss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from xmr.data.tvr_annotations import read_tvr_jsonl
from xmr.metrics.vcmr import NO_HIT, TVR_CLIP_LEN, clips_to_moment, first_hit, temporal_iou

TASKS: tuple[str, ...] = ("VCMR", "SVMR", "VR")
IOU_THRESHOLDS: tuple[float, ...] = (0.5, 0.7)
RECALL_KS: tuple[int, ...] = (1, 5, 10, 100)
MAX_PREDICTIONS = 100
DESC_TYPES: tuple[str, ...] = ("v", "t", "vt")
_GT_KEYS = ("desc_id", "vid_name", "ts")


def rounded_percentage(fraction: float) -> float:
    """The public rounding: Python's round() on a numpy float64, i.e. numpy's round."""
    return float(round(np.float64(fraction) * 100, 2))


def load_ground_truth(jsonl_path: str | Path) -> list[dict[str, Any]]:
    """Read a TVR annotation jsonl; every line needs desc_id, vid_name and ts [start, end]."""
    return read_tvr_jsonl(jsonl_path, required=_GT_KEYS)


def load_video_index(path: str | Path, split: str) -> tuple[dict[str, int], dict[str, float]]:
    """``tvr_video2dur_idx.json`` -> (video2idx, video2duration) of one split."""
    with open(path, encoding="utf-8") as handle:
        table = json.load(handle)
    if split not in table:
        raise KeyError(f"{path}: no split {split!r}; available: {sorted(table)}")
    rows = table[split]
    return {name: int(row[1]) for name, row in rows.items()}, {name: float(row[0]) for name, row in rows.items()}


@dataclass(frozen=True)
class RankedPredictions:
    """Ranked predictions of Q queries, best first; rows may be padded with video = -1.

    ``video`` holds positions in the corpus video list given to ``export_predictions``
    (what ``rank_moments`` returns), not TVR video indices.
    """

    video: np.ndarray  # int [Q, K]
    t_start: np.ndarray  # float [Q, K] seconds
    t_end: np.ndarray  # float [Q, K] seconds
    score: np.ndarray  # float [Q, K]

    @classmethod
    def videos_only(cls, video: Any, score: Any) -> "RankedPredictions":
        """VR predictions carry no moment: times are written as 0."""
        v = np.asarray(video)
        zeros = np.zeros(v.shape, dtype=np.float64)
        return cls(v, zeros, zeros, np.asarray(score))


def ranked_from_clips(
    video: Any, st: Any, ed: Any, score: Any, durations: Any, clip_len: float = TVR_CLIP_LEN,
) -> RankedPredictions:
    """Convert ``rank_moments`` output (inclusive clip indices) to seconds, clipped to each
    video's duration (``durations`` [V], indexed by the same corpus positions as ``video``)."""
    v = _np(video).astype(np.int64)
    dur = np.asarray(durations, dtype=np.float64)
    d = np.where(v >= 0, dur[np.clip(v, 0, max(len(dur) - 1, 0))], 0.0)
    t_s, t_e = clips_to_moment(_np(st), _np(ed), clip_len, d)
    return RankedPredictions(v, np.asarray(t_s), np.asarray(t_e), _np(score))


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def export_predictions(
    desc_ids: Sequence[int],
    descs: Sequence[str],
    video2idx: Mapping[str, int],
    corpus_videos: Sequence[str],
    *,
    vcmr: RankedPredictions | None = None,
    svmr: RankedPredictions | None = None,
    vr: RankedPredictions | None = None,
    max_per_query: int = MAX_PREDICTIONS,
) -> dict[str, Any]:
    """Build the public TVR prediction dict for the tasks given (at most 100 per query).

    Padding entries (video < 0 or a non-finite score) are dropped, so a query may end up
    with fewer predictions. Video positions map to TVR indices through
    ``video2idx[corpus_videos[position]]``.
    """
    if not 1 <= max_per_query <= MAX_PREDICTIONS:
        raise ValueError(f"max_per_query: must be in [1, {MAX_PREDICTIONS}], got {max_per_query}")
    if len(desc_ids) != len(descs):
        raise ValueError(f"desc_ids ({len(desc_ids)}) and descs ({len(descs)}) differ in length")
    if len(corpus_videos) == 0:
        raise ValueError("corpus_videos: empty; predictions need at least one video")
    missing = [name for name in corpus_videos if name not in video2idx]
    if missing:
        raise KeyError(f"corpus_videos: {len(missing)} name(s) not in video2idx, e.g. {missing[:3]}")
    corpus_idx = np.array([video2idx[name] for name in corpus_videos], dtype=np.int64)
    out: dict[str, Any] = {"video2idx": dict(video2idx)}
    for task, ranked in (("VCMR", vcmr), ("SVMR", svmr), ("VR", vr)):
        if ranked is not None:
            out[task] = _task_entries(task, desc_ids, descs, corpus_idx, ranked, max_per_query)
    if len(out) == 1:
        raise ValueError("export_predictions: give at least one of vcmr, svmr, vr")
    return out


def _task_entries(
    task: str,
    desc_ids: Sequence[int],
    descs: Sequence[str],
    corpus_idx: np.ndarray,
    ranked: RankedPredictions,
    max_per_query: int,
) -> list[dict[str, Any]]:
    arrays = [np.asarray(a)[:, :max_per_query] for a in (ranked.video, ranked.t_start, ranked.t_end, ranked.score)]
    video, t_s, t_e, score = arrays
    if any(a.shape != video.shape for a in arrays) or video.ndim != 2 or video.shape[0] != len(desc_ids):
        raise ValueError(
            f"{task}: expected video/t_start/t_end/score all [Q={len(desc_ids)}, K], got "
            f"{[np.asarray(a).shape for a in (ranked.video, ranked.t_start, ranked.t_end, ranked.score)]}"
        )
    if video.size and video.max() >= len(corpus_idx):
        raise ValueError(f"{task}: video position {int(video.max())} outside the corpus of {len(corpus_idx)}")
    keep = (video >= 0) & np.isfinite(score)
    tvr_video = corpus_idx[np.clip(video, 0, None)]
    entries = []
    for row, (desc_id, desc) in enumerate(zip(desc_ids, descs)):
        cols = np.flatnonzero(keep[row])
        preds = np.stack([tvr_video[row, cols], t_s[row, cols], t_e[row, cols], score[row, cols]], axis=1)
        entries.append({
            "desc_id": int(desc_id),
            "desc": str(desc),
            "predictions": [[int(p[0]), float(p[1]), float(p[2]), float(p[3])] for p in preds.tolist()],
        })
    return entries


def _index_by_desc_id(items: Sequence[Mapping[str, Any]], what: str) -> dict[int, Mapping[str, Any]]:
    by_id: dict[int, Mapping[str, Any]] = {}
    for item in items:
        if "desc_id" not in item:
            raise ValueError(f"{what}: an entry has no 'desc_id': {dict(item)!r:.200}")
        if item["desc_id"] in by_id:
            raise ValueError(f"{what}: desc_id {item['desc_id']} appears more than once")
        by_id[item["desc_id"]] = item
    return by_id


def _check_same_queries(task: str, pred_ids: set, gt_ids: set) -> None:
    if pred_ids == gt_ids:
        return
    missing, extra = sorted(gt_ids - pred_ids), sorted(pred_ids - gt_ids)
    raise ValueError(
        f"{task}: desc_ids in predictions and ground truth must match; "
        f"{len(missing)} missing from predictions (e.g. {missing[:5]}), "
        f"{len(extra)} not in the ground truth (e.g. {extra[:5]})"
    )


def _prediction_matrix(
    task: str, gt_ids: list, preds_by_id: Mapping[int, Mapping[str, Any]]
) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n, 100, 3] (video, t_s, t_e) zero-padded, and the valid mask [n, 100]."""
    mat = np.zeros((len(gt_ids), MAX_PREDICTIONS, 3), dtype=np.float32)
    valid = np.zeros((len(gt_ids), MAX_PREDICTIONS), dtype=bool)
    for row, desc_id in enumerate(gt_ids):
        preds = preds_by_id[desc_id].get("predictions")
        if not isinstance(preds, list):
            raise ValueError(f"{task}: desc_id {desc_id} has no 'predictions' list")
        head = preds[:MAX_PREDICTIONS]
        if not head:
            continue
        try:
            arr = np.array([p[:3] for p in head], dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{task}: desc_id {desc_id}: predictions must be [video_idx, t_s, t_e, ...] numbers"
            ) from err
        if arr.shape != (len(head), 3):
            raise ValueError(f"{task}: desc_id {desc_id}: each prediction needs >= 3 numbers, got shape {arr.shape}")
        mat[row, : len(head)] = arr
        valid[row, : len(head)] = True
    return mat, valid


def _query_hits(
    task: str, mat: np.ndarray, valid: np.ndarray, gt_video: np.ndarray, gt_ts: np.ndarray
) -> dict[Any, np.ndarray]:
    """Per-query rank of the first correct prediction (NO_HIT = none) per IoU threshold (VR: one)."""
    matched = (mat[:, :, 0] == gt_video[:, None]) & valid
    if task == "VR":
        return {None: first_hit(matched)}
    iou = temporal_iou(mat[:, :, 1:3], gt_ts[:, None, :]) * matched
    rank_in_matched = np.cumsum(matched, axis=1) - 1
    hits = {}
    for thr in IOU_THRESHOLDS:
        correct = iou >= np.float32(thr)
        if task == "VCMR":
            hits[thr] = first_hit(correct)
        else:  # SVMR: rank among the predictions on the ground-truth video only
            hits[thr] = np.where(correct, rank_in_matched, NO_HIT).min(axis=1)
    return hits


def _metric_key(thr: float | None, k: int) -> str:
    return f"r{k}" if thr is None else f"{thr}-r{k}"


def _task_metrics(hits: Mapping[Any, np.ndarray], types: np.ndarray | None) -> tuple[dict, dict]:
    metrics: dict[str, Any] = {}
    for thr, first in hits.items():
        for k in RECALL_KS:
            metrics[_metric_key(thr, k)] = rounded_percentage(np.mean(first < k))
    by_type: dict[str, Any] = {}
    if types is None:
        return metrics, by_type
    with np.errstate(invalid="ignore", divide="ignore"):  # an absent type gives NaN, as upstream
        for desc_type in DESC_TYPES:
            in_type = types == desc_type
            for thr, first in hits.items():
                for k in RECALL_KS:
                    frac = np.float64(np.sum((first < k) & in_type)) / np.sum(in_type)
                    by_type[f"{desc_type}-{_metric_key(thr, k)}"] = rounded_percentage(frac)
    ratios = [rounded_percentage(np.float64(np.sum(types == t)) / len(types)) for t in DESC_TYPES]
    by_type["desc_type_ratio"] = "v {} t {} vt {}".format(*ratios)
    return metrics, by_type


def _ground_truth_arrays(
    gt_items: list, video2idx: Mapping[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    unknown = sorted({item["vid_name"] for item in gt_items if item["vid_name"] not in video2idx})
    if unknown:
        raise ValueError(f"ground truth: {len(unknown)} vid_name(s) not in submission video2idx, e.g. {unknown[:3]}")
    bad_ts = [item["desc_id"] for item in gt_items if len(item["ts"]) != 2]
    if bad_ts:
        raise ValueError(f"ground truth: ts must be [start, end]; desc_id(s) {bad_ts[:5]} are not")
    gt_video = np.array([video2idx[item["vid_name"]] for item in gt_items], dtype=np.float32)
    gt_ts = np.array([item["ts"] for item in gt_items], dtype=np.float32).reshape(-1, 2)
    with_type = [item for item in gt_items if "type" in item]
    if not with_type:
        return gt_video, gt_ts, None
    if len(with_type) != len(gt_items):
        lacking = [item["desc_id"] for item in gt_items if "type" not in item]
        raise ValueError(f"ground truth: some entries have 'type' and some do not, e.g. desc_id(s) {lacking[:5]}")
    bad_type = [(item["desc_id"], item["type"]) for item in gt_items if item["type"] not in DESC_TYPES]
    if bad_type:
        raise ValueError(f"ground truth: type must be one of {DESC_TYPES}; got {bad_type[:5]} (desc_id, type)")
    return gt_video, gt_ts, np.array([item["type"] for item in gt_items])


def evaluate_tvr(submission: Mapping[str, Any], ground_truth: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The public TVR metrics file for ``submission`` (see the module docstring).

    Keys in order: the tasks present among VCMR, SVMR, VR; then ``{task}_by_type`` for
    each when the ground truth has query types. VCMR/SVMR keys ``"{iou}-r{k}"``, VR
    ``"r{k}"``, values rounded percentages; SVMR's R@k looks at the first k predictions
    *on the ground-truth video*.
    """
    video2idx = submission.get("video2idx")
    if not isinstance(video2idx, Mapping):
        raise ValueError("submission: missing the 'video2idx' mapping")
    tasks = [task for task in TASKS if task in submission]
    if not tasks:
        raise ValueError(f"submission: no task among {TASKS}; keys are {sorted(submission)}")
    gt_by_id = _index_by_desc_id(ground_truth, "ground truth")
    if not gt_by_id:
        raise ValueError("ground truth: empty")
    gt_ids = list(gt_by_id)
    gt_video, gt_ts, types = _ground_truth_arrays(list(gt_by_id.values()), video2idx)
    results: dict[str, Any] = {}
    by_type: dict[str, Any] = {}
    for task in tasks:
        preds_by_id = _index_by_desc_id(submission[task], f"submission[{task!r}]")
        _check_same_queries(task, set(preds_by_id), set(gt_ids))
        mat, valid = _prediction_matrix(task, gt_ids, preds_by_id)
        results[task], by_type[task] = _task_metrics(_query_hits(task, mat, valid, gt_video, gt_ts), types)
    if types is not None:
        for task in tasks:
            results[f"{task}_by_type"] = by_type[task]
    return results
