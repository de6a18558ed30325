"""Multi-negative N-pair / InfoNCE loss with K negatives (MNS-GAN, the mixer's retrieval head).

Every embedding of each modality is an anchor; its positive is its paired item in the
other modality; its negatives are K items of *either* modality (intra- and inter-modal)
that are not relevant to it (another class for category data, another pair for pair
matching), drawn from the gathered global batch and then the memory bank. Per anchor:
``-log(exp(s_p/τ) / (exp(s_p/τ) + Σ_{n ∈ N_K} exp(s_n/τ)))``; both directions averaged.
"""

from __future__ import annotations

import torch

from xmr.losses._common import gathered_pair, negative_mask, relevant, targets
from xmr.losses.negatives import MemoryBank, local_mean
from xmr.losses.registry import LossTerm, register_term


@register_term("multineg")
class MultiNegative(LossTerm):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        size = cfg.negatives.memory_bank
        width = max(1, len(cfg.model.num_classes)) if cfg.task != "pair" else 1
        self.bank = MemoryBank(size, cfg.model.embed_dim, width) if size > 0 else None

    def forward(self, out, batch):
        emb_a, emb_b = out["emb_a"], out["emb_b"]
        y = targets(batch, self.cfg.task)
        cand, cand_y, offset, n_global = gathered_pair(emb_a, emb_b, y)
        b = emb_a.shape[0]
        anchors = torch.cat([emb_a, emb_b])
        anchor_y = torch.cat([y, y])
        local = torch.arange(b, device=cand.device) + offset
        pos_col = torch.cat([local + n_global, local])  # a's partner is in the b-half and vice versa
        if self.bank is not None and not cand_y.is_floating_point():
            bank_emb, bank_y = self.bank.get()
            bank_y = bank_y.reshape(bank_y.shape[0], *cand_y.shape[1:])
            cand_all, y_all = torch.cat([cand, bank_emb.to(cand.dtype)]), torch.cat([cand_y, bank_y])
        else:
            cand_all, y_all = cand, cand_y
        logits = anchors @ cand_all.T / self.cfg.loss.temperature
        rows = torch.arange(2 * b, device=cand.device)
        pos_logit = logits[rows, pos_col]
        neg = negative_mask(logits, ~relevant(anchor_y, y_all), self.cfg, y_all)
        neg_lse = torch.logsumexp(logits.masked_fill(~neg, float("-inf")), dim=1)
        per_anchor = torch.logaddexp(pos_logit, neg_lse) - pos_logit
        if self.bank is not None and self.training:
            self.bank.enqueue(cand, cand_y)
        return local_mean(per_anchor)
