"""L_VVCL (QACLN λ5, intra-modal, Eq. 4–7): the JSD estimator between clips of one video.

Three anchor sets: the start clip, the end clip, and every in-moment clip; for each,
in-moment clips (other than the anchor) are positives and out-of-moment clips negatives,
with a bilinear critic C(h_a, h) = h_aᵀ W h + b. The three terms are averaged.
"""

from __future__ import annotations

import torch

from xmr.losses._jsd import BilinearCritic, jsd_loss, masked_mean, moment_masks
from xmr.losses.registry import LossTerm, register_term


@register_term("vvcl")
class VVCL(LossTerm):
    reads = {"embed_dim": "model.embed_dim"}
    families = ("vcmr",)

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.critic = BilinearCritic(embed_dim)
        with torch.no_grad():  # start near the identity: similar clips score high
            self.critic.weight.copy_(torch.eye(embed_dim) + 0.01 * torch.randn(embed_dim, embed_dim))

    def per_anchor(self, out, batch, ctx):
        h = out.h_qcf  # [B, N, d]
        inside, outside = moment_masks(batch, out.clip_mask)
        pair = self.critic(h, h)  # [B, N, N]: critic for every (anchor, clip)
        n = h.shape[1]
        rows = torch.arange(h.shape[0], device=h.device)
        idx = torch.arange(n, device=h.device)[None, :]
        terms = []
        for anchor in (batch["st"], batch["ed"]):
            not_anchor = idx != anchor[:, None]
            terms.append(jsd_loss(pair[rows, anchor], inside & not_anchor, outside))
        eye = torch.eye(n, dtype=torch.bool, device=h.device)[None]
        every = jsd_loss(pair, inside[:, None, :] & ~eye, outside[:, None, :].expand_as(pair))  # [B, N]
        terms.append(masked_mean(every, inside))
        return torch.stack(terms).mean(dim=0)
