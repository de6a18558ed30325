"""Triplet ranking loss: the K = 1 baseline every comparison includes.

Cross-modal: an anchor of one modality, its paired item of the other as the positive,
one non-relevant item of the other modality as the negative (picked by
``negatives.strategy``; the presets use ``hardest``). ``max(0, m + s_n - s_p)``, both
directions averaged. With K > 1 the hinge is averaged over the K negatives.
"""

from __future__ import annotations

import torch

from xmr.losses._common import negative_mask, relevant, targets
from xmr.losses.negatives import gather_labels, gather_with_grad, local_mean
from xmr.losses.registry import LossTerm, register_term


@register_term("triplet")
class Triplet(LossTerm):
    def _direction(self, anchors, cand, anchor_y, cand_y, offset):
        sim = anchors @ cand.T
        rows = torch.arange(anchors.shape[0], device=sim.device)
        pos = sim[rows, rows + offset]
        neg = negative_mask(sim, ~relevant(anchor_y, cand_y), self.cfg, cand_y)
        hinge = (self.cfg.loss.margin + sim - pos[:, None]).clamp(min=0)
        n_neg = neg.sum(dim=1).clamp(min=1)
        return (hinge * neg).sum(dim=1) / n_neg

    def forward(self, out, batch):
        y = targets(batch, self.cfg.task)
        all_a, offset = gather_with_grad(out["emb_a"])
        all_b, _ = gather_with_grad(out["emb_b"])
        all_y = gather_labels(y)
        a2b = self._direction(out["emb_a"], all_b, y, all_y, offset)
        b2a = self._direction(out["emb_b"], all_a, y, all_y, offset)
        return local_mean(torch.cat([a2b, b2a]))
