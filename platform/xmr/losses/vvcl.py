"""L_VVCL (QACLN λ5, intra-modal, Eq. 4–7): the JSD estimator between clips of one video.

Three anchor sets: the start clip, the end clip, and every in-moment clip; for each,
in-moment clips (other than the anchor) are positives and out-of-moment clips negatives,
with a bilinear critic C(h_a, h) = h_aᵀ W h + b. The three terms are averaged.

Only in-moment clips are ever anchors (the start and end clips are in the moment too), so
the critic is evaluated for those rows only: [B, M, N] with M the longest moment of the
batch, not [B, N, N] for every clip as an anchor (issue 14: a moment is a few clips of a
video's tens, so the full square was mostly rows whose loss weight is zero).
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
        b, n = h.shape[:2]
        inside, outside = moment_masks(batch, out.clip_mask)
        st, ed = batch["st"], batch["ed"]
        offsets = torch.arange(int((ed - st).max()) + 1, device=h.device)[None, :]  # [1, M]
        anchor = (st[:, None] + offsets).clamp(max=n - 1)  # clip index of moment row m
        is_anchor = (offsets <= (ed - st)[:, None]) & inside.gather(1, anchor)  # [B, M]
        rows = torch.arange(b, device=h.device)[:, None]
        pair = self.critic(h[rows, anchor], h)  # [B, M, N]: critic for every (anchor, clip)
        clip = torch.arange(n, device=h.device)[None, None, :]
        not_anchor = clip != anchor[..., None]  # [B, M, N]
        pos, neg = inside[:, None, :] & not_anchor, outside[:, None, :].expand_as(pair)
        every = jsd_loss(pair, pos, neg)  # [B, M]
        first, last = torch.zeros_like(st), ed - st  # the start and end clips' moment rows
        terms = [jsd_loss(pair[rows[:, 0], m], pos[rows[:, 0], m], neg[rows[:, 0], m]) for m in (first, last)]
        terms.append(masked_mean(every, is_anchor))
        return torch.stack(terms).mean(dim=0)
