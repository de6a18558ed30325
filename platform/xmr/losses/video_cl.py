"""L_VideoCL (QACLN λ3): NCE between a query and its video's attention-pooled vector.

Score f(c)ᵀg(q) (computed by the model, ``nce_*``); the positive is the pair, the
negatives K other videos for the query and K other queries for the video (InfoNCE in both
directions, averaged).
"""

from __future__ import annotations

import torch

from xmr.losses._qacln import cross_negatives
from xmr.losses.negatives import local_mean
from xmr.losses.registry import LossTerm, register_term


@register_term("video_cl")
class VideoCL(LossTerm):
    def forward(self, out, batch):
        per_anchor = []
        for key in ("nce_q2v", "nce_v2q"):
            scores = out[key]
            pos, neg = cross_negatives(scores, out, self.cfg)
            neg_lse = torch.logsumexp(scores.masked_fill(~neg, float("-inf")), dim=1)
            per_anchor.append(torch.logaddexp(pos, neg_lse) - pos)
        return local_mean((per_anchor[0] + per_anchor[1]) / 2)
