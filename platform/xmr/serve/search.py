"""The endpoint's compute: batched top-k over a gallery, and batched VCMR / single-video SVMR."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from xmr.metrics.vcmr import clips_to_moment, rank_moments
from xmr.serve.gallery import CategoryGallery, Loaded, VideoCorpus


@torch.inference_mode()
def search_category(items: list[tuple]) -> list[list[dict[str, Any]]]:
    """items: (loaded, query role, query array, k). One encoder pass and one matrix product
    (or FAISS search) per (model, role) group; results in item order."""
    out: list[list[dict[str, Any]] | None] = [None] * len(items)
    groups: dict[tuple[int, str], list[int]] = {}
    for i, (st, role, _, _) in enumerate(items):
        groups.setdefault((id(st), role), []).append(i)
    for (_, role), idx in groups.items():
        st: Loaded = items[idx[0]][0]
        g: CategoryGallery = st.gallery  # type: ignore[assignment]
        other = "b" if role == "a" else "a"
        x = torch.from_numpy(np.stack([items[i][2] for i in idx]))
        q = st.method.model.encode(role, x).float()
        k_max = max(items[i][3] for i in idx)
        if other in g.approx:
            scores_np, top_np = g.approx[other].search(np.ascontiguousarray(q.numpy()), k_max)
            scores, top = torch.from_numpy(scores_np), torch.from_numpy(top_np)
        else:
            scores, top = (q @ g.emb[other].T).topk(k_max, dim=1)
        for row, i in enumerate(idx):
            k = items[i][3]
            out[i] = [{"id": g.ids[j], "score": float(s), "label": g.labels[j]}
                      for j, s in zip(top[row, :k].tolist(), scores[row, :k].tolist()) if j >= 0]
    return out  # type: ignore[return-value]


def _pad_tokens(arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(a.shape[0] for a in arrays)
    tokens = torch.zeros(len(arrays), t, arrays[0].shape[1])
    mask = torch.zeros(len(arrays), t, dtype=torch.bool)
    for i, a in enumerate(arrays):
        tokens[i, : a.shape[0]] = torch.from_numpy(a)
        mask[i, : a.shape[0]] = True
    return tokens, mask


def _moments(corpus: VideoCorpus, video: torch.Tensor, st_: torch.Tensor, ed: torch.Tensor, score: torch.Tensor,
             clip_len: float) -> list[dict[str, Any]]:
    valid = video >= 0
    video, st_, ed, score = video[valid], st_[valid], ed[valid], score[valid]
    t_s, t_e = clips_to_moment(st_.numpy(), ed.numpy(), clip_len, corpus.durations[video].numpy())
    return [{"video": corpus.ids[v], "start": round(float(a), 3), "end": round(float(b), 3), "score": float(s)}
            for v, a, b, s in zip(video.tolist(), t_s, t_e, score.tolist())]


@torch.inference_mode()
def moments_batch(items: list[tuple]) -> list[list[dict[str, Any]]]:
    """items: (loaded, token array [T, d], k). VCMR over the whole corpus, batched per model."""
    out: list[list[dict[str, Any]] | None] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for i, (st, _, _) in enumerate(items):
        groups.setdefault(id(st), []).append(i)
    for idx in groups.values():
        st: Loaded = items[idx[0]][0]
        corpus: VideoCorpus = st.gallery  # type: ignore[assignment]
        model, m = st.method.model, st.cfg.model
        tokens, mask = _pad_tokens([items[i][1] for i in idx])
        q = model.encode_queries(tokens, mask)
        k_max = max(items[i][2] for i in idx)
        scores, top, start, end = model.search(q, corpus.enc, min(m.top_videos, corpus.size), buckets=corpus.buckets)
        ranked = rank_moments(scores, start.softmax(-1), end.softmax(-1), corpus.enc["clip_mask"], top,
                              m.max_moment_clips, k_max)
        for row, i in enumerate(idx):
            k = items[i][2]
            out[i] = _moments(corpus, ranked.video[row, :k], ranked.st[row, :k], ranked.ed[row, :k],
                              ranked.score[row, :k], st.manifest.clip_len or 1.0)
    return out  # type: ignore[return-value]


@torch.inference_mode()
def svmr_one(st: Loaded, tokens: np.ndarray, position: int, k: int) -> list[dict[str, Any]]:
    """Top-k spans within one video (the same span decoding, restricted to it)."""
    corpus: VideoCorpus = st.gallery  # type: ignore[assignment]
    model = st.method.model
    t, mask = _pad_tokens([tokens])
    q = model.encode_queries(t, mask)
    only = torch.tensor([[position]])
    start, end = model.span_logits(q, corpus.enc, only)
    ranked = rank_moments(torch.ones(1, corpus.size), start.softmax(-1), end.softmax(-1), corpus.enc["clip_mask"],
                          only, st.cfg.model.max_moment_clips, k)
    return _moments(corpus, ranked.video[0], ranked.st[0], ranked.ed[0], ranked.score[0], st.manifest.clip_len or 1.0)
