"""L_FrameCL (QACLN λ4): JSD mutual information between the query and the clips of its
video: in-moment clips are positives, out-of-moment clips of the same video negatives;
critic C(q, h) = qᵀ W h (bilinear)."""

from __future__ import annotations

from torch import nn

from xmr.losses._jsd import jsd_loss, moment_masks
from xmr.losses.negatives import local_mean
from xmr.losses.registry import LossTerm, register_term


@register_term("frame_cl")
class FrameCL(LossTerm):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        d = cfg.model.embed_dim
        self.critic = nn.Bilinear(d, d, 1)

    def forward(self, out, batch):
        h = out["h_qcf"]
        q = out["q"][:, None, :].expand_as(h).contiguous()
        scores = self.critic(q, h).squeeze(-1)  # [B, N]
        inside, outside = moment_masks(batch, out["clip_mask"])
        return local_mean(jsd_loss(scores, inside, outside))
