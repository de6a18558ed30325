"""Self-similarity polynomial loss (CDAML; Wei et al., CVPR 2020, "Universal Weighting
Metric Learning for Cross-Modal Matching").

Cross-modal: for each anchor, pairs with items of the other modality. Informative pairs
only: positives whose similarity is below the hardest negative's + margin, negatives
whose similarity is above the easiest positive's − margin (the paper's pair mining).
Each informative pair is weighted by a polynomial of its own similarity,
``w(s) = Σ_q c_q s^q`` (``loss.poly_pos`` / ``loss.poly_neg``; defaults w_p = 1 − s, so
harder positives weigh more, and w_n = 1 + s, so harder negatives weigh more); weights
are not differentiated. Per anchor: ``Σ_neg w_n(s_n)·s_n − Σ_pos w_p(s_p)·s_p``.
Negatives are restricted to K per anchor by ``cfg.negatives``.
"""

from __future__ import annotations

import torch

from xmr.losses._common import negative_mask, relevant, targets
from xmr.losses.negatives import gather_labels, gather_with_grad, local_mean
from xmr.losses.registry import LossTerm, register_term


def polyval(coeffs: list[float], s: torch.Tensor) -> torch.Tensor:
    """Σ_q coeffs[q] · s^q."""
    out = torch.zeros_like(s)
    for q, c in enumerate(coeffs):
        out = out + c * s.pow(q)
    return out


@register_term("polynomial")
class Polynomial(LossTerm):
    def _direction(self, anchors, cand, anchor_y, cand_y):
        sim = anchors @ cand.T
        rel = relevant(anchor_y, cand_y)
        neg_allowed = negative_mask(sim, ~rel, self.cfg, cand_y)
        margin = self.cfg.loss.margin
        hardest_neg = sim.detach().masked_fill(~neg_allowed, float("-inf")).amax(dim=1, keepdim=True)
        easiest_pos = sim.detach().masked_fill(~rel, float("inf")).amin(dim=1, keepdim=True)
        pos = rel & (sim.detach() < hardest_neg + margin)
        neg = neg_allowed & (sim.detach() > easiest_pos - margin)
        w_pos = polyval(self.cfg.loss.poly_pos, sim.detach()).clamp(min=0)
        w_neg = polyval(self.cfg.loss.poly_neg, sim.detach()).clamp(min=0)
        return (w_neg * sim * neg).sum(dim=1) - (w_pos * sim * pos).sum(dim=1)

    def forward(self, out, batch):
        y = targets(batch, self.cfg.task)
        all_a, _ = gather_with_grad(out["emb_a"])
        all_b, _ = gather_with_grad(out["emb_b"])
        all_y = gather_labels(y)
        a2b = self._direction(out["emb_a"], all_b, y, all_y)
        b2a = self._direction(out["emb_b"], all_a, y, all_y)
        return local_mean(torch.cat([a2b, b2a]))
