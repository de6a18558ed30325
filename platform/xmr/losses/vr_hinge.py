"""L_VR (QACLN λ1, Eq. 14): hinge on the VR score φ with K negative videos per query.

For each positive (q, v): Σ over K negative videos v' of max(0, Δ + φ(q, v') − φ(q, v)),
summed over the negatives as the paper writes it (its K = 2: φ' and φ''), averaged over
queries; Δ = ``loss.vr_hinge.margin``; K and the strategy from ``negatives``.
``loss.vr_hinge.query_negatives`` adds the other direction (K negative queries per video, the
form XML and ReLoCLNet train with; the paper does not). With only ``vr_hinge`` and
``moment`` on and K = 1 this is the VCMR triplet baseline.
"""

from __future__ import annotations

from xmr.losses._jsd import cross_positive
from xmr.losses.negatives import NegativeSampler
from xmr.losses.registry import LossTerm, register_term


@register_term("vr_hinge")
class VRHinge(LossTerm):
    reads = {"margin": "loss.vr_hinge.margin", "query_negatives": "loss.vr_hinge.query_negatives",
             "k": "negatives.k", "strategy": "negatives.strategy"}
    needs = frozenset({"phi_q2v"})
    families = ("vcmr",)
    strategies = ("uniform", "hardest", "semi_hard")

    @classmethod
    def outputs(cls, settings):
        """φ of the local queries against the videos; with ``query_negatives`` also of the
        local videos against the queries."""
        return cls.needs | ({"phi_v2q"} if settings["query_negatives"] else set())

    def __init__(self, margin: float, k: int, strategy: str, query_negatives: bool) -> None:
        super().__init__()
        self.margin, self.query_negatives = margin, query_negatives
        self.sampler = NegativeSampler(k, strategy)

    def _hinges(self, phi, cross):
        pos, allowed = cross_positive(phi, cross)
        neg = self.sampler(phi, allowed, pos_sim=pos)
        self.report("active", ((self.margin + phi - pos[:, None] > 0) & neg).float().sum() / neg.sum().clamp(min=1))
        return ((self.margin + phi - pos[:, None]).clamp(min=0) * neg).sum(dim=1)

    def per_anchor(self, out, batch, ctx):
        total = self._hinges(out.cross.phi_q2v, out.cross)
        if self.query_negatives:
            total = total + self._hinges(out.cross.phi_v2q, out.cross)
        return total
