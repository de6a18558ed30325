"""Self-similarity polynomial loss (CDAML; Wei et al., CVPR 2020, "Universal Weighting
Metric Learning for Cross-Modal Matching").

Cross-modal: for each anchor, pairs with items of the other modality (the batch, then the
bank's entries of that modality as further negatives). Informative pairs only: positives
whose similarity is below the hardest negative's + margin, negatives whose similarity is
above the easiest positive's − margin (the paper's pair mining). Each informative pair is
weighted by a polynomial of its own similarity, ``w(s) = Σ_q c_q s^q`` (``loss.polynomial.pos`` /
``loss.polynomial.neg``; defaults w_p = 1 − s, so harder positives weigh more, and w_n = 1 + s, so
harder negatives weigh more); weights are not differentiated. Per anchor:
``Σ_neg w_n(s_n)·s_n − Σ_pos w_p(s_p)·s_p``. Negatives are restricted to K per anchor by
``negatives``; positives come from the batch only.
"""

from __future__ import annotations

import torch

from xmr.losses._pairs import Candidates, both_directions, class_of, relevant, step_candidates
from xmr.losses.negatives import NegativeSampler
from xmr.losses.registry import LossTerm, register_term


def polyval(coeffs: list[float], s: torch.Tensor) -> torch.Tensor:
    """Σ_q coeffs[q] · s^q (Horner)."""
    out = torch.zeros_like(s)
    for c in reversed(coeffs):
        out = out * s + c
    return out


@register_term("polynomial")
class Polynomial(LossTerm):
    reads = {"margin": "loss.margin", "poly_pos": "loss.polynomial.pos", "poly_neg": "loss.polynomial.neg",
             "k": "negatives.k", "strategy": "negatives.strategy", "gather": "negatives.gather",
             "chunk_mb": "loss.chunk_mb"}
    strategies = ("uniform", "hardest", "class_aware")
    uses_bank = True

    def __init__(self, margin: float, poly_pos: list[float], poly_neg: list[float], k: int,
                 strategy: str, gather: bool, chunk_mb: float = 64.0) -> None:
        super().__init__()
        self.margin, self.gather, self.chunk_mb = margin, gather, chunk_mb
        self.poly_pos, self.poly_neg = list(poly_pos), list(poly_neg)
        self.sampler = NegativeSampler(k, strategy)

    def _pairs(self, sim: torch.Tensor, pos_col: torch.Tensor, anchor_y: torch.Tensor, c: Candidates) -> torch.Tensor:
        s = sim.detach()
        rel = relevant(anchor_y, c.y)
        pos_ok = rel.clone()
        pos_ok[:, c.n_batch:] = False
        neg_ok = self.sampler(sim, ~rel, n_batch=c.n_batch, labels=class_of(c.y))
        hardest_neg = s.masked_fill(~neg_ok, float("-inf")).amax(dim=1, keepdim=True)
        easiest_pos = s.masked_fill(~pos_ok, float("inf")).amin(dim=1, keepdim=True)
        pos = pos_ok & (s < hardest_neg + self.margin)
        neg = neg_ok & (s > easiest_pos - self.margin)
        w_pos = polyval(self.poly_pos, s).clamp(min=0)
        w_neg = polyval(self.poly_neg, s).clamp(min=0)
        return (w_neg * sim * neg).sum(dim=1) - (w_pos * sim * pos).sum(dim=1)

    def per_anchor(self, out, batch, ctx):
        y = ctx.targets
        c = step_candidates(ctx, out.emb_a, out.emb_b, y, self.gather)
        return torch.cat(both_directions(self._pairs, out, y, c, ctx, self.chunk_mb))
