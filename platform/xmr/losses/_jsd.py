"""Shared by QACLN's terms: the Jensen–Shannon MI estimator, the moment's clips, a
bilinear critic, and which (query, video) pairs of a batch are negatives.

JSD estimator (Hjelm et al., Deep InfoMax): E_pos[−softplus(−C)] − E_neg[softplus(C)] for
critic scores C of positive and negative pairs. The loss is its negation,
E_pos[softplus(−C)] + E_neg[softplus(C)], per row with masked means; a row without
negatives contributes its positive part only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def jsd_loss(scores: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Per-row −(JSD MI estimate) for critic ``scores`` with bool ``pos`` / ``neg`` masks."""
    return masked_mean(F.softplus(-scores), pos) + masked_mean(F.softplus(scores), neg)


def moment_masks(batch, clip_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(in-moment, out-of-moment) clip masks [B, N]: the moment is clips st..ed, both
    inclusive (QACLN §2.1: m* = {v_i | i = i_s..i_e})."""
    idx = torch.arange(clip_mask.shape[1], device=clip_mask.device)[None, :]
    inside = (idx >= batch["st"][:, None]) & (idx <= batch["ed"][:, None]) & clip_mask
    return inside, clip_mask & ~inside


class BilinearCritic(nn.Module):
    """C(x, h) = xᵀ W h + b, computed as (x W)·h: one matmul instead of ``nn.Bilinear`` over
    every expanded (x, h) pair."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) / dim)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """x [B, d] against h [B, N, d] -> [B, N]; x [B, M, d] against h -> [B, M, N]."""
        xw = x @ self.weight
        if xw.dim() == 2:
            return torch.einsum("bd,bnd->bn", xw, h) + self.bias
        return xw @ h.transpose(1, 2) + self.bias


def cross_positive(scores: torch.Tensor, cross) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive score [b], allowed negatives [b, B]) for local rows against gathered
    columns. Row i's positive is column offset + i; a column showing the same video as
    row i is never a negative (a batch can hold several queries on one video)."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    pos = scores[rows, rows + cross.offset]
    return pos, cross.video_index[:, None] != cross.all_video_index[None, :]
