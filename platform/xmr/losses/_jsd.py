"""Jensen–Shannon mutual-information estimator (Hjelm et al., Deep InfoMax), as a loss.

Estimate: E_pos[−softplus(−C)] − E_neg[softplus(C)] for critic scores C of positive and
negative pairs. The loss is its negation, E_pos[softplus(−C)] + E_neg[softplus(C)], per
row with masked means; a row without negatives contributes its positive part only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def jsd_loss(scores: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Per-row −(JSD MI estimate) for critic ``scores`` with bool ``pos`` / ``neg`` masks."""
    return masked_mean(F.softplus(-scores), pos) + masked_mean(F.softplus(scores), neg)


def moment_masks(batch, clip_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(in-moment, out-of-moment) clip masks [B, N] from the clip labels.

    The end label is ceil(t_e / clip_len), the clip *after* the moment, except when it was
    clipped to the last clip (the moment runs to the video's end); the start clip always
    counts, so a moment inside one clip keeps one positive.
    """
    n = clip_mask.shape[1]
    idx = torch.arange(n, device=clip_mask.device)[None, :]
    st, ed = batch["st"][:, None], batch["ed"][:, None]
    last = clip_mask.sum(dim=1, keepdim=True) - 1
    inside = ((idx >= st) & (idx < ed)) | (idx == st) | ((idx == ed) & (ed == last))
    inside &= clip_mask
    return inside, clip_mask & ~inside
