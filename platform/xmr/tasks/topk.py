"""Exact top-k of cosine scores over a large gallery, with a certified float16 pre-scan.

Kept in a module of its own: it is pure torch and the one hot loop of category serving.
"""

from __future__ import annotations

import torch

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
