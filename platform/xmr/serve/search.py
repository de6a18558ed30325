"""The endpoint's compute: batched top-k over a gallery, and batched VCMR / single-video SVMR."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from xmr.metrics.vcmr import clips_to_moment, rank_moments
from xmr.serve.gallery import CategoryGallery, Loaded, VideoCorpus


# Exact top-k with a float16 pre-scan. A query's scan is bound by the gallery's bytes
# (100k x 256 float32 = 100 MB), so the pre-scan reads a float16 copy (half the bytes), takes
# k + MARGIN candidates, rescores them in float32 and keeps the result only when a
# certificate proves it exact: for unit vectors every float16 score is within HALF_EPS of the
# float32 one, so when the last candidate's float16 score is more than 2·HALF_EPS below the
# k-th exact score no other item can enter the top k. Rows without the certificate scan
# float32. torch's float16 product on the CPU is one pass over the gallery per query, so
# batches of more than GEMV_MAX_BATCH queries widen blocks of the float16 gallery to float32
# (cache-sized, BLOCK_ROWS rows) and multiply each block by the whole batch: one pass for all.
GEMV_MAX_BATCH = 2
BLOCK_ROWS = 4096
HALF_MIN_ITEMS = 8192
HALF_EPS = 2e-3  # input rounding 2·2^-11·|q||g| + output rounding, float32 accumulation (checked at load)
MARGIN = 64


def half_prescan_ok(emb: torch.Tensor) -> bool:
    """Use the float16 pre-scan only for large galleries of unit vectors whose float16 scores
    stay within HALF_EPS / 2 of float32 on a sample (the bound the certificate relies on)."""
    if emb.shape[0] < HALF_MIN_ITEMS or emb.dtype != torch.float32:
        return False
    norms = emb.norm(dim=1)
    if (norms - 1).abs().max() > 1e-3:
        return False
    sample = emb[torch.randperm(emb.shape[0], generator=torch.Generator().manual_seed(0))[:64]]
    err = ((sample.half() @ emb.half().T).float() - sample @ emb.T).abs().max()
    return bool(err <= HALF_EPS / 2)


def half_scores(q: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """[B, N] float32 scores of q against the float16 gallery (see the note above)."""
    if q.shape[0] <= GEMV_MAX_BATCH:
        return (q.half() @ half.T).float()
    b = q.shape[0]
    if b % 4:  # the CPU GEMM is much slower for 3, 5, 6, ... rows than for the next multiple of 4
        q = torch.cat([q, q.new_zeros(4 - b % 4, q.shape[1])])
    out = torch.empty(q.shape[0], half.shape[0])
    block = torch.empty(min(BLOCK_ROWS, half.shape[0]), half.shape[1])
    for lo in range(0, half.shape[0], BLOCK_ROWS):
        rows = half[lo:lo + BLOCK_ROWS]
        wide = block[: rows.shape[0]]
        wide.copy_(rows)
        torch.mm(q, wide.T, out=out[:, lo:lo + rows.shape[0]])
    return out[:b]


def topk_scores(q: torch.Tensor, emb: torch.Tensor, half: torch.Tensor | None, k: int):
    """(scores, indices) [B, k] of the exact top-k of q @ emb.T (see the note above)."""
    n = emb.shape[0]
    if half is None or k + MARGIN >= n:
        return (q @ emb.T).topk(k, dim=1)
    cand = half_scores(q, half).topk(k + MARGIN, dim=1)
    exact = torch.einsum("bd,bmd->bm", q, emb[cand.indices])
    scores, order = exact.topk(k, dim=1)
    idx = cand.indices.gather(1, order)
    unproven = cand.values[:, -1] + 2 * HALF_EPS >= scores[:, -1]
    if unproven.any():
        rows = unproven.nonzero().flatten()
        full = (q[rows] @ emb.T).topk(k, dim=1)
        scores[rows], idx[rows] = full.values, full.indices
    return scores, idx


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
            scores, top = topk_scores(q, g.emb[other], g.half.get(other), k_max)
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
             clip_len: float) -> list[list[dict[str, Any]]]:
    """Result rows for [B, k] decoded spans, converted to seconds in one vectorised pass
    (padding entries, video -1, dropped)."""
    v = video.numpy()
    t_s, t_e = clips_to_moment(st_.numpy(), ed.numpy(), clip_len, corpus.durations.numpy()[np.maximum(v, 0)])
    t_s, t_e = np.round(t_s, 3).tolist(), np.round(t_e, 3).tolist()
    ids, rows = corpus.ids, []
    for vr, ar, br, sr in zip(v.tolist(), t_s, t_e, score.tolist()):
        rows.append([{"video": ids[i], "start": a, "end": b, "score": c}
                     for i, a, b, c in zip(vr, ar, br, sr) if i >= 0])
    return rows


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
        rows = _moments(corpus, ranked.video, ranked.st, ranked.ed, ranked.score, st.manifest.clip_len or 1.0)
        for row, i in zip(rows, idx):
            out[i] = row[: items[i][2]]
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
    return _moments(corpus, ranked.video, ranked.st, ranked.ed, ranked.score, st.manifest.clip_len or 1.0)[0]
