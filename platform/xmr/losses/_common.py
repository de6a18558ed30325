"""Shared pieces of the category / pair terms: relevance, candidates and their negatives."""

from __future__ import annotations

from typing import Any

import torch

from xmr.losses.negatives import gather_labels, gather_with_grad, select_negatives


def targets(batch: dict[str, Any], task: str) -> torch.Tensor:
    """What decides relevance: the pair identity for pair matching, else the labels."""
    if task == "pair":
        return batch["index"].reshape(-1)
    return batch["label"]


def finest(labels: torch.Tensor) -> torch.Tensor:
    """Single labels [B] stay; hierarchical paths [B, L] give their finest level."""
    return labels[:, -1] if labels.dim() == 2 and not labels.is_floating_point() else labels


def relevant(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Bool [Nq, Ng]: same (finest) label, or any shared label for multi-hot float labels."""
    if q.is_floating_point():  # multi-label, multi-hot
        return (q.float() @ g.float().T) > 0
    q, g = finest(q), finest(g)
    return q.reshape(-1, 1) == g.reshape(1, -1)


def gathered_pair(emb_a: torch.Tensor, emb_b: torch.Tensor, y: torch.Tensor):
    """Gather both modalities and the targets across ranks.

    Returns (cand [2B, d] = all a then all b, cand_y [2B, ...], offset of local rows in the
    a-half, B = global batch).
    """
    all_a, offset = gather_with_grad(emb_a)
    all_b, _ = gather_with_grad(emb_b)
    all_y = gather_labels(y)
    return torch.cat([all_a, all_b]), torch.cat([all_y, all_y]), offset, all_a.shape[0]


def negative_mask(sim: torch.Tensor, allowed: torch.Tensor, cfg, cand_y: torch.Tensor) -> torch.Tensor:
    """K negatives per anchor by the configured strategy (class-aware uses finest labels)."""
    labels = finest(cand_y) if not cand_y.is_floating_point() else cand_y.argmax(dim=1)
    return select_negatives(sim, allowed, cfg.negatives.k, cfg.negatives.strategy, candidate_labels=labels)
