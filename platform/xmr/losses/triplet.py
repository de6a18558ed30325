"""Triplet ranking loss: the K = 1 baseline every comparison includes.

Cross-modal: an anchor of one modality, its paired item of the other as the positive,
non-relevant items of the other modality (batch first, then the bank's entries of that
modality) as negatives, picked by ``negatives.strategy``. ``max(0, m + s_n - s_p)``,
averaged over the anchor's K negatives, both directions averaged. The presets use
``semi_hard`` (FaceNet; see ``xmr.losses.negatives``): with ``hardest`` from the first step
the loss sits at the margin and the baseline collapses (issue 11).
"""

from __future__ import annotations

import torch

from xmr.losses._pairs import Candidates, both_directions, class_of, relevant, step_candidates
from xmr.losses.negatives import NegativeSampler
from xmr.losses.registry import LossTerm, register_term


@register_term("triplet")
class Triplet(LossTerm):
    reads = {"margin": "loss.margin", "k": "negatives.k", "strategy": "negatives.strategy",
             "gather": "negatives.gather", "chunk_mb": "loss.chunk_mb"}
    strategies = ("uniform", "hardest", "semi_hard", "class_aware")
    uses_bank = True

    def __init__(self, margin: float, k: int, strategy: str, gather: bool, chunk_mb: float = 64.0) -> None:
        super().__init__()
        self.margin, self.gather, self.chunk_mb = margin, gather, chunk_mb
        self.sampler = NegativeSampler(k, strategy)

    def _hinge(self, sim: torch.Tensor, pos_col: torch.Tensor, anchor_y: torch.Tensor, c: Candidates) -> torch.Tensor:
        pos = sim[torch.arange(sim.shape[0], device=sim.device), pos_col]
        neg = self.sampler(sim, ~relevant(anchor_y, c.y), n_batch=c.n_batch, labels=class_of(c.y), pos_sim=pos)
        hinge = (self.margin + sim - pos[:, None]).clamp(min=0)
        return (hinge * neg).sum(dim=1) / neg.sum(dim=1).clamp(min=1)

    def per_anchor(self, out, batch, ctx):
        y = ctx.targets
        c = step_candidates(ctx, out.emb_a, out.emb_b, y, self.gather)
        return torch.cat(both_directions(self._hinge, out, y, c, ctx, self.chunk_mb))

