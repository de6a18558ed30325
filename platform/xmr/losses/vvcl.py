"""L_VVCL (QACLN λ5, intra-modal): the JSD estimator between clips of one video.

Three anchor sets: the start clip, the last in-moment clip, and every in-moment clip;
for each, in-moment clips (other than the anchor) are positives and out-of-moment clips
negatives, with a bilinear critic C(h_a, h) = h_aᵀ W h. The three terms are averaged.
"""

from __future__ import annotations

import torch
from torch import nn

from xmr.losses._jsd import jsd_loss, masked_mean, moment_masks
from xmr.losses.negatives import local_mean
from xmr.losses.registry import LossTerm, register_term


@register_term("vvcl")
class VVCL(LossTerm):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        d = cfg.model.embed_dim
        self.weight = nn.Parameter(torch.eye(d) + 0.01 * torch.randn(d, d))

    def forward(self, out, batch):
        h = out["h_qcf"]  # [B, N, d]
        inside, outside = moment_masks(batch, out["clip_mask"])
        pair = torch.einsum("bnd,de,bme->bnm", h, self.weight, h)  # critic for every (anchor, clip)
        eye = torch.eye(h.shape[1], dtype=torch.bool, device=h.device)[None]
        rows = torch.arange(h.shape[0], device=h.device)
        idx = torch.arange(h.shape[1], device=h.device)[None, :]
        last_in = torch.where(inside, idx, -1).amax(dim=1)
        terms = []
        for anchor in (batch["st"], last_in):
            scores = pair[rows, anchor]  # [B, N]
            not_anchor = idx != anchor[:, None]
            terms.append(jsd_loss(scores, inside & not_anchor, outside))
        per_anchor = jsd_loss(pair, inside[:, None, :] & ~eye, outside[:, None, :].expand_as(pair))  # [B, N]
        terms.append(masked_mean(per_anchor, inside))
        return local_mean(torch.stack(terms).mean(dim=0))
