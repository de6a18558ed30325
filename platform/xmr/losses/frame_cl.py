"""L_FrameCL (QACLN λ4, Eq. 11–12): JSD mutual information between the query and the
clips of its video: in-moment clips are positives, out-of-moment clips of the same video
negatives; critic C(q, h) = qᵀ W h + b (bilinear)."""

from __future__ import annotations

from xmr.losses._jsd import BilinearCritic, jsd_loss, moment_masks
from xmr.losses.registry import LossTerm, register_term


@register_term("frame_cl")
class FrameCL(LossTerm):
    reads = {"embed_dim": "model.embed_dim"}
    families = ("vcmr",)

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.critic = BilinearCritic(embed_dim)

    def per_anchor(self, out, batch, ctx):
        inside, outside = moment_masks(batch, out.clip_mask)
        return jsd_loss(self.critic(out.q, out.h_qcf), inside, outside)
