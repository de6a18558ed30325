"""VR / SVMR / VCMR metrics of a QACLN-style model over a corpus (METHODS.md §5 inference).

Videos are encoded once; each query is encoded, scored against every video (φ), its top-N
videos re-ranked by span scores P_start(i)·P_end(j)·video score (i ≤ j, a length limit)
with the vectorised ``rank_moments``; the top 100 (video, t_s, t_e) are kept.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch

from xmr.metrics.vcmr import clips_to_moment, rank_moments, svmr_recall, vcmr_recall, vr_recall


@torch.no_grad()
def encode_corpus(model, video_batches: Iterable[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All videos' clip encodings, padded to one clip count, plus their ids and durations."""
    encs, ids, durations, names = [], [], [], []
    for batch in video_batches:
        if len(batch["index"]) == 0:
            continue
        device = next(model.parameters()).device
        encs.append(model.encode_videos(*(batch[k].to(device) for k in ("visual", "subtitle", "sub_mask", "clip_mask"))))
        ids.append(batch["video_index"])
        durations.append(batch["duration"])
        names.extend(batch.get("vid_name", batch["key"]))
    if not encs:
        raise ValueError("encode_corpus: the corpus split yielded no videos")
    n = max(e["h_v"].shape[1] for e in encs)
    from xmr.models.qacln import pad_encoding

    padded = [pad_encoding(e, n) for e in encs]
    corpus = {k: torch.cat([p[k] for p in padded]) for k in padded[0]}
    meta = {"video_index": torch.cat(ids), "duration": torch.cat(durations), "vid_name": names}
    return corpus, meta


@torch.no_grad()
def rank_queries(model, q: torch.Tensor, corpus: dict[str, torch.Tensor], top_videos: int, max_len: int,
                 top_k: int = 100, buckets: list | None = None):
    """(video scores [Q, V], ranked moments) for a chunk of encoded queries; ``buckets``
    (``bucket_corpus(corpus)``) saves regrouping the corpus on every call."""
    scores, top, start, end = model.search(q, corpus, top_videos, buckets=buckets)
    moments = rank_moments(scores, start.softmax(-1), end.softmax(-1), corpus["clip_mask"], top, max_len, top_k)
    return scores, moments


@torch.no_grad()
def rank_query_batches(model, corpus: dict[str, torch.Tensor], meta: dict[str, Any],
                       query_batches: Iterable[dict[str, Any]], clip_len: float, top_videos: int = 100,
                       max_len: int = 16) -> dict[str, np.ndarray]:
    """Per-query predictions against a whole encoded corpus: the VR ranking (top 100), the
    top-100 VCMR (video, t_s, t_e), the SVMR top-1 span in the ground-truth video, and the
    ground truth. Arrays over queries, so shares from several ranks concatenate."""
    position = {int(v): i for i, v in enumerate(meta["video_index"].tolist())}
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("index", "vr", "vcmr_video", "vcmr_spans", "svmr_spans",
                                                           "gt_video", "gt_spans")}
    from xmr.models.qacln import bucket_corpus

    device = corpus["clip_mask"].device
    buckets = bucket_corpus(corpus)
    for batch in query_batches:
        if len(batch["index"]) == 0:
            continue
        q = model.encode_queries(batch["q_tokens"].to(device), batch["q_mask"].to(device))
        scores, moments = rank_queries(model, q, corpus, top_videos, max_len, buckets=buckets)
        scores, moments = scores.float().cpu(), type(moments)(*(t.cpu() for t in moments))
        try:
            gt = torch.tensor([position[int(v)] for v in batch["video_index"]])
        except KeyError as exc:
            raise ValueError(f"evaluate_vcmr: query on video index {exc} that is not in the corpus split") from None
        durations = meta["duration"][moments.video.clamp(min=0)]
        t_s, t_e = clips_to_moment(moments.st.numpy(), moments.ed.numpy(), clip_len, durations.numpy())
        # SVMR: the same decoding restricted to the ground-truth video.
        only = gt[:, None].to(device)
        start, end = model.span_logits(q, corpus, only)
        single = rank_moments(torch.ones(len(gt), len(position), device=device), start.softmax(-1), end.softmax(-1),
                              corpus["clip_mask"], only, max_len, top_k=1)
        s_s, s_e = clips_to_moment(single.st.cpu().numpy(), single.ed.cpu().numpy(), clip_len,
                                   meta["duration"][gt][:, None].numpy())
        parts["index"].append(batch["index"].numpy())
        parts["vr"].append(scores.topk(min(100, scores.shape[1]), dim=1).indices.numpy())
        parts["vcmr_video"].append(moments.video.numpy())
        parts["vcmr_spans"].append(np.stack([t_s, t_e], axis=-1))
        parts["svmr_spans"].append(np.stack([s_s, s_e], axis=-1))
        parts["gt_video"].append(gt.numpy())
        parts["gt_spans"].append(batch["ts"].numpy())
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in parts.items()}


def score_vcmr(ranked: dict[str, np.ndarray]) -> dict[str, float]:
    """Recall metrics with flat keys: ``vr_r{k}``, ``svmr_{iou}_r1``, ``vcmr_{iou}_r{k}`` (fractions)."""
    if len(ranked["gt_video"]) == 0:
        raise ValueError("evaluate_vcmr: the query split yielded no queries")
    gt_v, gt_s = ranked["gt_video"], ranked["gt_spans"]
    out = {f"vr_{k}": v for k, v in vr_recall(ranked["vr"], gt_v, ks=(1, 10, 100)).items()}
    svmr = svmr_recall(ranked["svmr_spans"], gt_s, ks=(1,))
    out.update({f"svmr_{k.replace('-', '_')}": v for k, v in svmr.items()})
    vcmr = vcmr_recall(ranked["vcmr_video"], ranked["vcmr_spans"], gt_v, gt_s, ks=(1, 10, 100))
    out.update({f"vcmr_{k.replace('-', '_')}": v for k, v in vcmr.items()})
    return out


@torch.no_grad()
def evaluate_vcmr(model, video_batches: Iterable[dict[str, Any]], query_batches: Iterable[dict[str, Any]],
                  clip_len: float, top_videos: int = 100, max_len: int = 16) -> dict[str, float]:
    """Single-process VR / SVMR / VCMR recalls (see ``score_vcmr`` for the keys)."""
    was_training = model.training
    model.eval()
    try:
        corpus, meta = encode_corpus(model, video_batches)
        ranked = rank_query_batches(model, corpus, meta, query_batches, clip_len, top_videos, max_len)
    finally:
        model.train(was_training)
    return score_vcmr(ranked)
