"""Temporal IoU, clip labels, VCMR decoding (vs brute force) and VR/SVMR/VCMR recalls."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_tvr
import torch

from xmr.metrics.vcmr import (
    clips_to_moment,
    moment_to_clips,
    n_clips_for,
    rank_moments,
    round_trip_iou,
    svmr_recall,
    temporal_iou,
    vcmr_recall,
    vr_recall,
)

pytestmark = pytest.mark.timeout(60)

TVR_VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "tvr" / "tvr_val_release.jsonl"


def test_temporal_iou_hand_worked() -> None:
    pred = np.array([[0.0, 10.0], [5.0, 15.0], [10.0, 20.0], [2.0, 4.0], [3.0, 3.0], [0.0, 7.0]])
    got = temporal_iou(pred, [0.0, 10.0])
    # touching spans and a zero-length span inside the gt do not overlap: IoU 0
    assert got.tolist() == pytest.approx([1.0, 5 / 15, 0.0, 0.2, 0.0, 0.7])
    assert temporal_iou([[3.0, 3.0]], [3.0, 3.0]).tolist() == [0.0]  # zero "union"
    # disjoint spans: public definition divides by the hull; still 0
    assert temporal_iou([[0.0, 1.0]], [[5.0, 6.0]]).tolist() == [0.0]
    rowwise = temporal_iou([[0.0, 2.0], [1.0, 3.0]], [[0.0, 4.0], [2.0, 3.0]])
    assert rowwise.tolist() == pytest.approx([0.5, 0.5])
    assert temporal_iou(np.float32([[0, 7]]), np.float32([0, 10])).dtype == np.float32
    with pytest.raises(ValueError, match="last axis of 2"):
        temporal_iou([[0.0, 1.0, 2.0]], [0.0, 1.0])


def test_moment_to_clips_edges() -> None:
    """Inclusive labels (QACLN §2.1): st = floor(t_s/1.5), ed = ceil(t_e/1.5) - 1, st <= ed."""
    assert moment_to_clips([0.0, 2.29], 38) == (0, 1)  # starts at 0, ends inside clip 1
    assert moment_to_clips([3.2, 7.6], 40) == (2, 5)  # the public docstring's example, last clip reached = 5
    assert moment_to_clips([4.5, 6.0], 4) == (3, 3)  # ends at the video end: the last clip
    assert moment_to_clips([55.0, 57.35], 57.35) == (36, 38)  # float = duration: ceil(57.35/1.5) = 39 clips
    assert moment_to_clips([60.0, 60.0], 40) == (39, 39)  # start past the last clip is clipped too
    assert moment_to_clips([3.0, 3.0], 40) == (2, 2)  # a zero-length moment keeps one clip
    st, ed = moment_to_clips(np.array([[0.0, 1.5], [1.6, 1.7]]), np.array([10, 10]))
    assert st.tolist() == [0, 1] and ed.tolist() == [0, 1]
    assert n_clips_for(60.0).item() == 40 and n_clips_for(0.0).item() == 1
    with pytest.raises(ValueError, match="row 0"):
        moment_to_clips([5.0, 4.0], 10)
    with pytest.raises(TypeError, match="bool"):
        moment_to_clips([0.0, 1.0], True)


def test_clips_to_moment_edges() -> None:
    assert clips_to_moment(2, 6) == (3.0, 10.5)  # inclusive end: (ed + 1) x 1.5 s, the public XML decoding
    assert clips_to_moment(36, 38, duration=57.35) == (54.0, 57.35)  # last partial clip
    s, e = clips_to_moment(np.array([0, 3]), np.array([0, 3]), duration=np.array([100.0, 5.0]))
    assert s.tolist() == [0.0, 4.5] and e.tolist() == [1.5, 5.0]  # a one-clip span is 1.5 s, never empty
    # A moment ending at the video end round-trips to an exact match.
    st, ed = moment_to_clips([4.5, 6.0], 4)
    assert temporal_iou([clips_to_moment(st, ed, duration=6.0)], [4.5, 6.0]).tolist() == [1.0]


@needs_tvr
def test_labels_and_decoding_agree_on_tvr_val() -> None:
    """A perfect model (its predicted span = the label) reaches IoU >= 0.7 on most TVR val
    moments, and no round trip is empty. The old pairing (exclusive ceil end labels with an
    inclusive-start decoder that allowed st == ed, i.e. zero-length spans) lost moments."""
    rows = [json.loads(line) for line in TVR_VAL.read_text().splitlines()[:2000]]
    ts = np.array([r["ts"] for r in rows], dtype=np.float64)
    dur = np.array([r["duration"] for r in rows])
    iou = round_trip_iou(ts, n_clips_for(dur), duration=dur)
    st, ed = moment_to_clips(ts, n_clips_for(dur))
    s, e = clips_to_moment(st, ed, duration=dur)
    assert (e > s).all() and (st <= ed).all()
    # the old convention: ed_exclusive = ceil(t_e / 1.5) clipped, decoded as ed_exclusive * 1.5
    old_ed = np.minimum(np.ceil(ts[:, 1] / 1.5), n_clips_for(dur) - 1)
    old_e = np.minimum(np.where(old_ed >= n_clips_for(dur) - 1, dur, old_ed * 1.5), dur)
    old_iou = temporal_iou(np.stack([s, old_e], -1), ts)
    print(f"\nround-trip IoU>=0.7: {np.mean(iou >= 0.7):.3f} (old convention {np.mean(old_iou >= 0.7):.3f})")
    assert np.mean(iou >= 0.7) >= np.mean(old_iou >= 0.7) > 0.5


def _brute_force(video_scores, p_start, p_end, clip_mask, top_video_idx, max_len, top_k):
    out = []
    for q in range(p_start.shape[0]):
        cands = []
        for n in range(p_start.shape[1]):
            v = int(top_video_idx[q, n])
            for i in range(p_start.shape[2]):
                for j in range(i, p_start.shape[2]):
                    if j - i < max_len and clip_mask[v, i] and clip_mask[v, j]:
                        score = float(p_start[q, n, i] * p_end[q, n, j] * video_scores[q, v])
                        cands.append((score, v, i, j))
        cands.sort(key=lambda c: -c[0])
        out.append(cands[:top_k])
    return out


@pytest.mark.parametrize("max_len,chunk_size", [(3, None), (4, 2), (50, 1)])
def test_rank_moments_matches_brute_force(max_len: int, chunk_size: int | None) -> None:
    gen = torch.Generator().manual_seed(max_len)
    q, v, n, length, top_k = 5, 9, 4, 8, 12
    video_scores = torch.rand(q, v, generator=gen)
    p_start = torch.softmax(torch.randn(q, n, length, generator=gen), -1)
    p_end = torch.softmax(torch.randn(q, n, length, generator=gen), -1)
    lengths = torch.randint(2, length + 1, (v,), generator=gen)
    clip_mask = torch.arange(length)[None, :] < lengths[:, None]  # padded videos
    top_idx = torch.stack([torch.randperm(v, generator=gen)[:n] for _ in range(q)])
    got = rank_moments(video_scores, p_start, p_end, clip_mask, top_idx, max_len, top_k, chunk_size)
    expected = _brute_force(video_scores, p_start, p_end, clip_mask, top_idx, max_len, top_k)
    for row in range(q):
        exp = expected[row]
        assert got.score[row].tolist() == pytest.approx([c[0] for c in exp], rel=1e-5)
        spans = list(zip(got.video[row].tolist(), got.st[row].tolist(), got.ed[row].tolist()))
        assert spans == [c[1:] for c in exp]
    # per-(query, video) masks give the same result as per-video masks
    per_query = clip_mask[top_idx]
    again = rank_moments(video_scores, p_start, p_end, per_query, top_idx, max_len, top_k)
    assert torch.equal(again.video, got.video) and torch.equal(again.st, got.st)


def test_rank_moments_padding_ties_and_errors() -> None:
    # one video with 2 valid clips, max_len 2: only 3 valid spans; ask for 5
    p = torch.full((1, 1, 3), 0.5)
    mask = torch.tensor([[True, True, False]])
    got = rank_moments(torch.ones(1, 1), p, p, mask, torch.zeros(1, 1, dtype=torch.long), 2, top_k=5)
    # all valid scores tie (0.25): ordered by (st, ed); padding is -1 / -inf
    assert list(zip(got.st[0].tolist(), got.ed[0].tolist()))[:3] == [(0, 0), (0, 1), (1, 1)]
    assert got.video[0].tolist() == [0, 0, 0, -1, -1]
    assert torch.isneginf(got.score[0, 3:]).all()
    with pytest.raises(ValueError, match="video_scores"):
        rank_moments(-torch.ones(1, 1), p, p, mask, torch.zeros(1, 1, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="clip_mask"):
        rank_moments(torch.ones(1, 1), p, p, mask[:, :2], torch.zeros(1, 1, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="top_video_idx"):
        rank_moments(torch.ones(1, 1), p, p, mask, torch.ones(1, 1, dtype=torch.long), 2)


def test_vr_recall_hand_worked() -> None:
    ranked = np.array([[3, 1, 2], [0, 2, -1], [1, 0, 2]])
    got = vr_recall(ranked, [3, 2, 5], ks=(1, 2, 100))
    assert got == pytest.approx({"r1": 1 / 3, "r2": 2 / 3, "r100": 2 / 3})


def test_svmr_and_vcmr_recall_hand_worked() -> None:
    gt_spans = np.array([[0.0, 10.0], [50.0, 57.35]])  # second moment ends at the video end
    pred_spans = np.array([
        [[0.0, 6.0], [0.0, 7.0], [0.0, 10.0]],  # IoU 0.6, 0.7 (exactly), 1.0
        [[49.5, 57.35], [40.0, 45.0], [50.0, 57.35]],  # IoU 0.936, 0, 1.0
    ])
    svmr = svmr_recall(pred_spans, gt_spans, ks=(1, 2))
    assert svmr == pytest.approx({"0.5-r1": 1.0, "0.5-r2": 1.0, "0.7-r1": 0.5, "0.7-r2": 1.0})
    assert svmr_recall(pred_spans, gt_spans, ks=(3,), ious=(0.7,)) == {"0.7-r3": 1.0}
    masked = svmr_recall(pred_spans, gt_spans, ks=(3,), ious=(0.7,), valid=[[True, False, False], [True] * 3])
    assert masked == {"0.7-r3": 0.5}  # padding never counts, even within the first k
    # VCMR: the same spans, but query 0's first two predictions are on the wrong video
    pred_video = np.array([[8, 8, 4], [2, 2, 2]])
    vcmr = vcmr_recall(pred_video, pred_spans, [4, 2], gt_spans, ks=(1, 2, 3), ious=(0.5,))
    assert vcmr == pytest.approx({"0.5-r1": 0.5, "0.5-r2": 0.5, "0.5-r3": 1.0})
