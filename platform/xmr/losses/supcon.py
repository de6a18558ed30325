"""Cross-modal supervised contrastive loss (SCCMRL; SupCon, Khosla et al. 2020).

Both modalities' embeddings are pooled. For each anchor, positives are all other
embeddings with the same label (either modality); negatives are K of those with another
label (``negatives.k`` / ``negatives.strategy``; K >= all gives exact SupCon). Per anchor:
``-1/|P| Σ_p log(exp(s_p/τ) / Σ_{c ∈ P ∪ N_K} exp(s_c/τ))``. Anchors without a positive
are left out of the mean (as pytorch-metric-learning's SupConLoss does).
"""

from __future__ import annotations

import torch

from xmr.losses._common import gathered_pair, negative_mask, relevant, targets
from xmr.losses.negatives import local_mean
from xmr.losses.registry import LossTerm, register_term


@register_term("supcon")
class SupervisedContrastive(LossTerm):
    def forward(self, out, batch):
        y = targets(batch, self.cfg.task)
        cand, cand_y, offset, n_global = gathered_pair(out["emb_a"], out["emb_b"], y)
        b = out["emb_a"].shape[0]
        anchors = torch.cat([out["emb_a"], out["emb_b"]])
        anchor_y = torch.cat([y, y])
        # Global positions of the local anchors inside ``cand`` (a-half, then b-half).
        local = torch.arange(b, device=cand.device) + offset
        self_col = torch.cat([local, local + n_global])
        logits = anchors @ cand.T / self.cfg.loss.temperature
        not_self = torch.ones_like(logits, dtype=torch.bool)
        not_self[torch.arange(2 * b, device=cand.device), self_col] = False
        rel = relevant(anchor_y, cand_y)
        pos = rel & not_self
        neg = negative_mask(logits, ~rel, self.cfg, cand_y)
        denom = torch.logsumexp(logits.masked_fill(~(pos | neg), float("-inf")), dim=1, keepdim=True)
        log_prob = (logits - denom).masked_fill(~pos, 0.0)
        n_pos = pos.sum(dim=1)
        has_pos = n_pos > 0
        per_anchor = -(log_prob.sum(dim=1)[has_pos] / n_pos[has_pos])
        return local_mean(per_anchor)
