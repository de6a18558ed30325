"""L_VR (QACLN λ1): hinge on the VR score with K negative videos and K negative queries.

For each positive (q, v): Σ over K negative videos v' of max(0, Δ + φ(q, v') − φ(q, v))
plus Σ over K negative queries q' of max(0, Δ + φ(q', v) − φ(q, v)), each averaged over
its K; Δ = ``loss.vr_margin``; K and the strategy from ``negatives`` (paper: K = 2).
With only ``vr_hinge`` and ``moment`` on and K = 1 this is the VCMR triplet baseline.
"""

from __future__ import annotations

from xmr.losses._qacln import cross_negatives
from xmr.losses.negatives import local_mean
from xmr.losses.registry import LossTerm, register_term


@register_term("vr_hinge")
class VRHinge(LossTerm):
    def forward(self, out, batch):
        margin = self.cfg.loss.vr_margin
        total = 0.0
        for key in ("phi_q2v", "phi_v2q"):
            pos, neg = cross_negatives(out[key], out, self.cfg)
            hinge = (margin + out[key] - pos[:, None]).clamp(min=0) * neg
            total = total + hinge.sum(dim=1) / neg.sum(dim=1).clamp(min=1)
        return local_mean(total)
