"""Multi-negative N-pair / InfoNCE loss with K negatives (MNS-GAN, the mixer's retrieval head).

Every embedding of each modality is an anchor; its positive is its paired item in the
other modality; its negatives are K items of *either* modality (intra- and inter-modal)
that are not relevant to it (another class for category data, another pair for pair
matching), drawn from the gathered global batch first and the memory bank after. Per
anchor: ``-log(exp(s_p/τ) / (exp(s_p/τ) + Σ_{n ∈ N_K} exp(s_n/τ)))``; both directions averaged.
"""

from __future__ import annotations

import torch

from xmr.losses._pairs import Candidates, by_rows, candidate_logits, class_of, pooled_anchors, relevant, step_candidates
from xmr.losses.negatives import NegativeSampler
from xmr.losses.registry import LossTerm, register_term


@register_term("multineg")
class MultiNegative(LossTerm):
    reads = {"temperature": "loss.temperature", "k": "negatives.k",
             "strategy": "negatives.strategy", "gather": "negatives.gather", "chunk_mb": "loss.chunk_mb"}
    strategies = ("uniform", "hardest", "semi_hard", "class_aware")
    uses_bank = True

    def __init__(self, temperature: float, k: int, strategy: str, gather: bool, chunk_mb: float = 64.0) -> None:
        super().__init__()
        self.temperature, self.gather, self.chunk_mb = temperature, gather, chunk_mb
        self.sampler = NegativeSampler(k, strategy)

    def per_anchor(self, out, batch, ctx):
        y = ctx.targets
        c = step_candidates(ctx, out.emb_a, out.emb_b, y, self.gather)
        b = out.emb_a.shape[0]
        anchors = pooled_anchors(out.emb_a, out.emb_b, c)
        local = torch.arange(b, device=anchors.device) + c.offset
        partner = torch.cat([local + c.n_global, local])  # a's partner is in the b-half and vice versa
        return by_rows(lambda a, p, ry: self._rows(a, p, ry, c), (anchors, partner, torch.cat([y, y])),
                       c.emb.shape[0], self.chunk_mb)

    def _rows(self, anchors, partner, rows_y, c: Candidates):
        logits = candidate_logits(anchors, c, self.temperature)
        pos_logit = logits[torch.arange(anchors.shape[0], device=anchors.device), partner]
        relevant_ = relevant(rows_y, c.y)
        allowed = ~relevant_
        neg = self.sampler(logits, allowed, n_batch=c.n_batch, labels=class_of(c.y), pos_sim=pos_logit)
        # K covering every candidate returns the allowed set itself: mask by its complement, no third pass
        # In place (no copy of the logits): pos_logit is already taken, and nothing saved for
        # backward needs their values.
        masked = logits.masked_fill_(relevant_ if neg is allowed else ~neg, float("-inf"))
        return torch.logaddexp(pos_logit, torch.logsumexp(masked, dim=1)) - pos_logit
