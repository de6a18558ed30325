"""Shared by QACLN's batch-level terms: which (query, video) pairs are negatives."""

from __future__ import annotations

import torch

from xmr.losses.negatives import select_negatives


def cross_negatives(scores: torch.Tensor, out: dict, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive score [b], negative mask [b, B]) for local rows against gathered columns.

    Row i's positive is column offset + i; a column showing the same video as row i is
    never a negative (a batch can hold several queries on one video).
    """
    rows = torch.arange(scores.shape[0], device=scores.device)
    pos = scores[rows, rows + out["offset"]]
    allowed = out["video_index"][:, None] != out["all_video_index"][None, :]
    neg = select_negatives(scores, allowed, cfg.negatives.k, cfg.negatives.strategy)
    return pos, neg
