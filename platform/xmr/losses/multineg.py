"""Multi-negative N-pair / InfoNCE loss with K negatives (MNS-GAN, the mixer's retrieval head).

Every embedding of each modality is an anchor; its positive is its paired item in the
other modality; its negatives are K items of *either* modality (intra- and inter-modal)
that are not relevant to it (another class for category data, another pair for pair
matching), drawn from the gathered global batch first and the memory bank after. Per
anchor: ``-log(exp(s_p/τ) / (exp(s_p/τ) + Σ_{n ∈ N_K} exp(s_n/τ)))``; both directions averaged.
"""

from __future__ import annotations

import torch

from xmr.losses._pairs import candidates, class_of, relevant
from xmr.losses.negatives import NegativeSampler
from xmr.losses.registry import LossTerm, register_term


@register_term("multineg")
class MultiNegative(LossTerm):
    reads = {"temperature": "loss.temperature", "k": "negatives.k",
             "strategy": "negatives.strategy", "gather": "negatives.gather"}
    strategies = ("uniform", "hardest", "semi_hard", "class_aware")
    uses_bank = True

    def __init__(self, temperature: float, k: int, strategy: str, gather: bool) -> None:
        super().__init__()
        self.temperature, self.gather = temperature, gather
        self.sampler = NegativeSampler(k, strategy)

    def per_anchor(self, out, batch, ctx):
        y = ctx.targets
        c = candidates(out.emb_a, out.emb_b, y, self.gather, ctx.bank)
        b = out.emb_a.shape[0]
        anchors = torch.cat([out.emb_a, out.emb_b])
        local = torch.arange(b, device=anchors.device) + c.offset
        partner = torch.cat([local + c.n_global, local])  # a's partner is in the b-half and vice versa
        logits = anchors @ c.emb.T / self.temperature
        pos_logit = logits[torch.arange(2 * b, device=anchors.device), partner]
        neg = self.sampler(logits, ~relevant(torch.cat([y, y]), c.y), n_batch=c.n_batch, labels=class_of(c.y),
                           pos_sim=pos_logit)
        neg_lse = torch.logsumexp(logits.masked_fill(~neg, float("-inf")), dim=1)
        return torch.logaddexp(pos_logit, neg_lse) - pos_logit
