"""Video corpus moment retrieval: temporal IoU, clip <-> seconds, VCMR decoding, recalls.

Conventions (METHODS.md, QACLN "Inference"; the public TVR code, jayleicn/TVRetrieval):
- Times are seconds; a moment is ``[t_s, t_e]``. Clips are ``clip_len`` seconds long
  (1.5 s for TVR) and indexed from 0; clip labels are *inclusive* ``(st, ed)`` indices.
- Temporal IoU is the public TVR evaluation's: intersection / (max(ends) - min(starts)).
  That equals the true IoU whenever the spans overlap, and is 0 when they do not.
- Recall values returned here are fractions in [0, 1]; ``xmr.metrics.tvr`` formats the
  public percentages.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from xmr.metrics.retrieval import as_numpy

RECALL_KS: tuple[int, ...] = (1, 5, 10, 100)
IOU_THRESHOLDS: tuple[float, ...] = (0.5, 0.7)
TVR_CLIP_LEN = 1.5
# Elements of one chunk's [c, N, L, W] score tensor: bounds memory to ~64 MB of float32.
_DECODE_CHUNK_ELEMENTS = 1 << 24


def temporal_iou(pred: Any, gt: Any) -> np.ndarray:
    """IoU of spans ``pred`` [..., 2] with ``gt`` ([2] or broadcastable, e.g. [N, 2]).

    Uses the public TVR definition: intersection / (max(ends) - min(starts)). A pair
    whose "union" is 0 (two identical zero-length spans) scores 0, and a zero-length span
    never overlaps anything, so it scores 0 too. Spans are taken as given (not sorted),
    as in the public evaluation. The result keeps the inputs' float precision (float32
    inputs give float32 IoU, which the TVR evaluation relies on).
    """
    p = as_numpy(pred, "pred")
    g = as_numpy(gt, "gt")
    if p.shape[-1:] != (2,) or g.shape[-1:] != (2,):
        raise ValueError(f"temporal_iou: spans need a last axis of 2, got pred {p.shape}, gt {g.shape}")
    dtype = np.result_type(p.dtype, g.dtype, np.float32)
    p, g = p.astype(dtype, copy=False), g.astype(dtype, copy=False)
    try:
        np.broadcast_shapes(p.shape, g.shape)
    except ValueError as err:
        raise ValueError(f"temporal_iou: gt {g.shape} does not broadcast to pred {p.shape}") from err
    inter = np.maximum(0, np.minimum(p[..., 1], g[..., 1]) - np.maximum(p[..., 0], g[..., 0]))
    union = np.maximum(p[..., 1], g[..., 1]) - np.minimum(p[..., 0], g[..., 0])
    inter, union = np.broadcast_arrays(inter, union)
    return np.divide(inter, union, out=np.zeros(inter.shape, dtype=dtype), where=union != 0)


def n_clips_for(duration_or_n_clips: Any, clip_len: float = TVR_CLIP_LEN) -> np.ndarray:
    """Number of clips: integers are taken as a clip count, floats as a duration in seconds.

    A duration gives ceil(duration / clip_len) clips (at least 1): clip i covers
    [i*clip_len, (i+1)*clip_len), so the last clip may be partial. Pass the feature
    length (an int) when you have it; it is what the model actually sees.
    """
    arr = as_numpy(duration_or_n_clips, "duration_or_n_clips")
    if arr.dtype == bool:
        raise TypeError("duration_or_n_clips: got a bool; pass an int clip count or a float duration")
    if np.issubdtype(arr.dtype, np.integer):
        n = arr.astype(np.int64)
    else:
        if (arr < 0).any() or not np.isfinite(arr).all():
            raise ValueError(f"duration_or_n_clips: durations must be finite and >= 0, got {arr}")
        n = np.maximum(1, np.ceil(arr / clip_len)).astype(np.int64)
    if (n < 1).any():
        raise ValueError(f"duration_or_n_clips: clip counts must be >= 1, got {arr}")
    return n


def moment_to_clips(
    ts: Any, duration_or_n_clips: Any, clip_len: float = TVR_CLIP_LEN
) -> tuple[Any, Any]:
    """Clip labels of moment(s) ``ts`` ([2] or [N, 2] seconds): inclusive (st, ed) indices.

    st = floor(t_s / clip_len), ed = ceil(t_e / clip_len) - 1 (the last clip the moment
    reaches), with st <= ed, both clipped to n_clips - 1. Inclusive on both ends, as the
    QACLN paper defines a moment (§2.1: m* = {v_i | i = i_s..i_e}, 0 <= i_s <= i_e <= n_v - 1)
    and as XML's training labels are; ``clips_to_moment`` inverts it exactly, so a perfect
    span prediction recovers [floor(t_s/L)·L, ceil(t_e/L)·L]. ``duration_or_n_clips``
    follows ``n_clips_for``. Returns Python ints for one moment, int64 arrays otherwise.
    """
    t = as_numpy(ts, "ts").astype(np.float64)
    if t.shape[-1:] != (2,) or t.ndim > 2:
        raise ValueError(f"ts: expected [2] or [N, 2] seconds, got shape {t.shape}")
    flat = t.reshape(-1, 2)
    ok = np.isfinite(flat).all(axis=1) & (flat[:, 0] >= 0) & (flat[:, 1] >= flat[:, 0])
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise ValueError(f"ts: moments must satisfy 0 <= t_s <= t_e; row {bad} is {flat[bad].tolist()}")
    last = n_clips_for(duration_or_n_clips, clip_len) - 1
    st = np.minimum(np.floor(t[..., 0] / clip_len).astype(np.int64), last)
    ed = np.minimum(np.maximum(np.ceil(t[..., 1] / clip_len).astype(np.int64) - 1, st), last)
    if t.ndim == 1:
        return int(st), int(ed)
    return st, ed


def clips_to_moment(st: Any, ed: Any, clip_len: float = TVR_CLIP_LEN, duration: Any = None) -> tuple[Any, Any]:
    """Seconds of the inclusive clip span (st, ed): (st · clip_len, (ed + 1) · clip_len),
    both clipped to ``duration`` when given (scalar or broadcastable), as the public XML
    decoding does ("ed_idx + 1, times clip_length"). Floats for scalar inputs, float64
    arrays otherwise."""
    s = as_numpy(st, "st").astype(np.float64) * clip_len
    e = (as_numpy(ed, "ed").astype(np.float64) + 1.0) * clip_len
    if duration is not None:
        d = as_numpy(duration, "duration").astype(np.float64)
        s, e = np.minimum(s, d), np.minimum(e, d)
    if s.ndim == 0 and e.ndim == 0:
        return float(s), float(e)
    return s, e


class RankedMoments(NamedTuple):
    """Top-k moments per query, best first. Padding (fewer valid spans than k): -1 / -inf."""

    video: torch.Tensor  # long [Q, k]: column index into video_scores
    st: torch.Tensor  # long [Q, k]: inclusive start clip
    ed: torch.Tensor  # long [Q, k]: inclusive end clip
    score: torch.Tensor  # float [Q, k]: P_s(st) * P_e(ed) * video score


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(as_numpy(x, name))


def _check_decode_inputs(
    video_scores: torch.Tensor,
    p_start: torch.Tensor,
    p_end: torch.Tensor,
    clip_mask: torch.Tensor,
    top_video_idx: torch.Tensor,
    max_len_clips: int,
    top_k: int,
) -> None:
    if video_scores.dim() != 2 or top_video_idx.dim() != 2:
        raise ValueError(
            f"video_scores [Q, V] and top_video_idx [Q, N] must be 2-D, got "
            f"{tuple(video_scores.shape)} and {tuple(top_video_idx.shape)}"
        )
    q, v = video_scores.shape
    n = top_video_idx.shape[1]
    if top_video_idx.shape[0] != q:
        raise ValueError(f"top_video_idx: expected {q} rows like video_scores, got {top_video_idx.shape[0]}")
    if p_start.dim() != 3 or p_start.shape[:2] != (q, n) or p_end.shape != p_start.shape:
        raise ValueError(
            f"p_start/p_end: expected [Q={q}, N={n}, L], got {tuple(p_start.shape)} and {tuple(p_end.shape)}"
        )
    length = p_start.shape[2]
    if clip_mask.shape not in ((q, n, length), (v, length)):
        raise ValueError(
            f"clip_mask: expected [Q, N, L]={(q, n, length)} or [V, L]={(v, length)}, got {tuple(clip_mask.shape)}"
        )
    if top_video_idx.numel() and (top_video_idx.min() < 0 or top_video_idx.max() >= v):
        raise ValueError(f"top_video_idx: values must lie in [0, {v}), got range "
                         f"[{int(top_video_idx.min())}, {int(top_video_idx.max())}]")
    if max_len_clips < 1 or top_k < 1:
        raise ValueError(f"max_len_clips and top_k must be >= 1, got {max_len_clips} and {top_k}")


def rank_moments(
    video_scores: Any,
    p_start: Any,
    p_end: Any,
    clip_mask: Any,
    top_video_idx: Any,
    max_len_clips: int,
    top_k: int = 100,
    chunk_size: int | None = None,
) -> RankedMoments:
    """VCMR decoding: the top_k (video, st, ed) per query over each query's top-N videos.

    Moment score = P_start(i) * P_end(j) * video_score for i <= j, j - i < max_len_clips,
    both clips valid in ``clip_mask`` (METHODS.md, QACLN inference). ``video_scores`` must
    be >= 0 (e.g. exp(alpha * cosine) as in XML): with a negative factor the product
    would reward *low* span probabilities. Only the band j - i < max_len_clips is scored
    ([Q, N, L, W] with W = min(max_len_clips, L)), which is the triu mask without the
    wasted lower triangle. Equal scores are ordered by (video rank, st, ed). Queries are
    processed in chunks of ``chunk_size`` (default: about 16M scores per chunk).
    """
    vs = _as_tensor(video_scores, "video_scores")
    ps = _as_tensor(p_start, "p_start")
    pe = _as_tensor(p_end, "p_end")
    mask = _as_tensor(clip_mask, "clip_mask").to(device=ps.device, dtype=torch.bool)
    tvi = _as_tensor(top_video_idx, "top_video_idx").to(device=ps.device, dtype=torch.long)
    vs = vs.to(device=ps.device, dtype=ps.dtype)
    _check_decode_inputs(vs, ps, pe, mask, tvi, max_len_clips, top_k)
    q, n, length = ps.shape
    width = min(max_len_clips, length)
    per_query = n * length * width
    k = min(top_k, per_query)
    if chunk_size is None:
        chunk_size = max(1, _DECODE_CHUNK_ELEMENTS // max(per_query, 1))
    per_video_mask = mask.dim() == 2
    parts = []
    for start in range(0, q, chunk_size):
        sl = slice(start, start + chunk_size)
        m = mask[tvi[sl]] if per_video_mask else mask[sl]
        parts.append(_decode_chunk(vs[sl].gather(1, tvi[sl]), ps[sl], pe[sl], m, tvi[sl], width, k))
    if not parts:
        empty = torch.empty((0, k), dtype=torch.long, device=ps.device)
        return RankedMoments(empty, empty.clone(), empty.clone(), torch.empty((0, k), dtype=ps.dtype))
    return RankedMoments(*(torch.cat(items) for items in zip(*parts)))


def _decode_chunk(
    vscore: torch.Tensor,
    ps: torch.Tensor,
    pe: torch.Tensor,
    mask: torch.Tensor,
    tvi: torch.Tensor,
    width: int,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score the [c, N, L, W] band (entry [.., i, d] is span (i, i + d)) and keep the top k."""
    if (vscore < 0).any():
        raise ValueError(
            f"video_scores: selected scores must be >= 0 (got min {float(vscore.min()):.4g}); "
            "map cosine scores first, e.g. exp(alpha * s) or s + 1"
        )
    c, n, length = ps.shape
    end_band = F.pad(pe, (0, width - 1)).unfold(-1, width, 1)  # [c, N, L, W] = P_e(i + d)
    end_ok = F.pad(mask, (0, width - 1), value=False).unfold(-1, width, 1)
    valid = mask.unsqueeze(-1) & end_ok
    scores = (ps * vscore.unsqueeze(-1)).unsqueeze(-1) * end_band
    scores = scores.masked_fill(~valid, float("-inf")).reshape(c, -1)
    top_scores, flat = scores.topk(k, dim=1)
    # Order ties deterministically by flat index (video rank, then st, then ed).
    flat, by_index = flat.sort(dim=1)
    top_scores = top_scores.gather(1, by_index)
    top_scores, by_score = top_scores.sort(dim=1, descending=True, stable=True)
    flat = flat.gather(1, by_score)
    rank, rest = flat // (length * width), flat % (length * width)
    st = rest // width
    ed = st + rest % width
    video = tvi.gather(1, rank)
    pad = torch.isneginf(top_scores)
    return (video.masked_fill(pad, -1), st.masked_fill(pad, -1), ed.masked_fill(pad, -1), top_scores)


def nms_spans(video: np.ndarray, t_s: np.ndarray, t_e: np.ndarray, score: np.ndarray, iou: float,
              keep: int) -> tuple[np.ndarray, ...]:
    """Non-maximum suppression of each query's ranked moments [Q, K]: in rank order, drop a
    moment whose temporal IoU with a kept moment of the same video exceeds ``iou``; the first
    ``keep`` survivors, ranking order kept, padded with video -1 / score -inf."""
    q = video.shape[0]
    out_v = np.full((q, keep), -1, dtype=np.int64)
    out_s, out_e = np.zeros((q, keep)), np.zeros((q, keep))
    out_score = np.full((q, keep), -np.inf)
    for i in range(q):
        kept: list[int] = []
        for j in range(video.shape[1]):
            if len(kept) == keep:
                break
            if video[i, j] < 0 or not np.isfinite(score[i, j]):
                continue
            same = [k for k in kept if video[i, k] == video[i, j]]
            if same:
                overlap = temporal_iou(np.stack([t_s[i, same], t_e[i, same]], -1), np.array([t_s[i, j], t_e[i, j]]))
                if (overlap > iou).any():
                    continue
            kept.append(j)
        n = len(kept)
        out_v[i, :n], out_s[i, :n], out_e[i, :n], out_score[i, :n] = (video[i, kept], t_s[i, kept], t_e[i, kept],
                                                                      score[i, kept])
    return out_v, out_s, out_e, out_score


NO_HIT = np.iinfo(np.int64).max  # first_hit's value for a query without a correct prediction


def first_hit(correct: Any) -> np.ndarray:
    """Index of each row's first True in a bool [Q, K] matrix; ``NO_HIT`` where there is none."""
    arr = as_numpy(correct, "correct").astype(bool, copy=False)
    if arr.ndim != 2:
        raise ValueError(f"correct: expected a [Q, K] bool matrix, got shape {arr.shape}")
    any_hit = arr.any(axis=1)
    return np.where(any_hit, arr.argmax(axis=1), NO_HIT)


def recall_from_first_hit(hit_rank: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries whose first correct prediction is among the first k, per k."""
    if len(hit_rank) == 0:
        raise ValueError("recall: no queries to evaluate")
    return {int(k): float((hit_rank < k).mean()) for k in ks}


def _pred_arrays(pred_video: Any, pred_spans: Any | None, q: int) -> tuple[np.ndarray, np.ndarray | None]:
    video = as_numpy(pred_video, "pred_video")
    if video.ndim != 2 or video.shape[0] != q:
        raise ValueError(f"pred_video: expected [Q={q}, K], got shape {video.shape}")
    if pred_spans is None:
        return video, None
    spans = as_numpy(pred_spans, "pred_spans")
    if spans.shape != video.shape + (2,):
        raise ValueError(f"pred_spans: expected {video.shape + (2,)}, got {spans.shape}")
    return video, spans


def vr_recall(
    pred_video: Any, gt_video: Any, ks: Sequence[int] = RECALL_KS
) -> dict[str, float]:
    """Video retrieval R@k from ranked video ids [Q, K] (-1 = padding); keys ``r{k}``."""
    gt = as_numpy(gt_video, "gt_video").reshape(-1)
    video, _ = _pred_arrays(pred_video, None, gt.shape[0])
    hits = first_hit(video == gt[:, None])
    return {f"r{k}": v for k, v in recall_from_first_hit(hits, ks).items()}


def svmr_recall(
    pred_spans: Any,
    gt_spans: Any,
    ks: Sequence[int] = RECALL_KS,
    ious: Sequence[float] = IOU_THRESHOLDS,
    valid: Any | None = None,
) -> dict[str, float]:
    """Single-video moment retrieval R@k at IoU >= thr; spans [Q, K, 2] inside the GT video.

    ``valid`` (bool [Q, K]) marks real predictions when rows are padded. Keys
    ``"{iou}-r{k}"`` in the public TVR order (IoU outer, k inner).
    """
    spans = as_numpy(pred_spans, "pred_spans")
    gt = as_numpy(gt_spans, "gt_spans")
    if spans.ndim != 3 or spans.shape[2] != 2 or gt.shape != (spans.shape[0], 2):
        raise ValueError(
            f"svmr_recall: expected pred_spans [Q, K, 2] and gt_spans [Q, 2], got {spans.shape}, {gt.shape}"
        )
    ok = np.ones(spans.shape[:2], bool) if valid is None else as_numpy(valid, "valid").astype(bool)
    iou = temporal_iou(spans, gt[:, None, :])
    return _iou_recalls(iou, ok, ks, ious)


def vcmr_recall(
    pred_video: Any,
    pred_spans: Any,
    gt_video: Any,
    gt_spans: Any,
    ks: Sequence[int] = RECALL_KS,
    ious: Sequence[float] = IOU_THRESHOLDS,
) -> dict[str, float]:
    """Corpus moment retrieval R@k: right video (ids [Q, K], -1 = padding) and IoU >= thr."""
    gt_v = as_numpy(gt_video, "gt_video").reshape(-1)
    gt = as_numpy(gt_spans, "gt_spans")
    video, spans = _pred_arrays(pred_video, pred_spans, gt_v.shape[0])
    if gt.shape != (gt_v.shape[0], 2):
        raise ValueError(f"gt_spans: expected [{gt_v.shape[0]}, 2], got {gt.shape}")
    iou = temporal_iou(spans, gt[:, None, :])
    return _iou_recalls(iou, video == gt_v[:, None], ks, ious)


def _iou_recalls(
    iou: np.ndarray, ok: np.ndarray, ks: Sequence[int], ious: Sequence[float]
) -> dict[str, float]:
    out: dict[str, float] = {}
    for thr in ious:
        hits = first_hit((iou >= thr) & ok)
        for k, value in recall_from_first_hit(hits, ks).items():
            out[f"{thr}-r{k}"] = value
    return out


def round_trip_iou(ts: Any, n_clips: Any, clip_len: float = TVR_CLIP_LEN, duration: Any = None) -> np.ndarray:
    """IoU of moments [N, 2] with their clip-label round trip: what a perfect model can reach."""
    t = as_numpy(ts, "ts").astype(np.float64).reshape(-1, 2)
    st, ed = moment_to_clips(t, n_clips, clip_len)
    s, e = clips_to_moment(st, ed, clip_len, duration)
    return temporal_iou(np.stack([np.broadcast_to(s, st.shape), np.broadcast_to(e, st.shape)], -1), t)


__all__ = [
    "IOU_THRESHOLDS",
    "NO_HIT",
    "RECALL_KS",
    "RankedMoments",
    "clips_to_moment",
    "first_hit",
    "moment_to_clips",
    "n_clips_for",
    "nms_spans",
    "rank_moments",
    "recall_from_first_hit",
    "round_trip_iou",
    "svmr_recall",
    "temporal_iou",
    "vcmr_recall",
    "vr_recall",
]
