"""L_VideoCL (QACLN λ3, Eq. 8–10): NCE between a query and its video's attention-pooled
vector, against the other videos / queries of the batch.

Score f(c)ᵀg(q) (computed by the model, ``nce_*``); the positive is the pair; the
negatives are the other videos of the gathered batch for the query and the other queries
for the video (InfoNCE in both directions, averaged). ``loss.video_cl.k`` > 0 keeps a
uniform sample of that many instead of the whole batch. Why its own K: sharing the VR
hinge's ``negatives.k`` (the paper's 2) made it an InfoNCE over 3 candidates, while the
paper contrasts against the batch.
"""

from __future__ import annotations

import torch

from xmr.losses._jsd import cross_positive
from xmr.losses.negatives import NegativeSampler
from xmr.losses.registry import LossTerm, register_term


@register_term("video_cl")
class VideoCL(LossTerm):
    reads = {"k": "loss.video_cl.k"}
    needs = frozenset({"nce_q2v", "nce_v2q"})
    families = ("vcmr",)

    def __init__(self, k: int) -> None:
        super().__init__()
        self.sampler = NegativeSampler(k, "uniform") if k > 0 else None

    def per_anchor(self, out, batch, ctx):
        per_direction = []
        for scores in (out.cross.nce_q2v, out.cross.nce_v2q):
            pos, allowed = cross_positive(scores, out.cross)
            neg = self.sampler(scores, allowed) if self.sampler is not None else allowed
            neg_lse = torch.logsumexp(scores.masked_fill(~neg, float("-inf")), dim=1)
            per_direction.append(torch.logaddexp(pos, neg_lse) - pos)
        return (per_direction[0] + per_direction[1]) / 2
