# FROZEN COPY, for bench/train_step.py and tests/test_train_step.py only: the supcon loss term (masks over the full logits) as it was
# before issue 14 (commit ce80db5), kept so the optimised code is measured and checked against
# it side by side. Not registered, not imported by the library; do not edit.
"""Cross-modal supervised contrastive loss (SCCMRL; SupCon, Khosla et al. 2020).

Both modalities' embeddings are pooled. For each anchor, positives are all other batch
embeddings with the same label (either modality); negatives are K of those with another
label (``negatives.k`` / ``negatives.strategy``; K >= all gives exact SupCon), drawn from the
batch first and the memory bank after. Per anchor:
``-1/|P| Σ_p log(exp(s_p/τ) / Σ_{c ∈ P ∪ N_K} exp(s_c/τ))``. Anchors without a positive are
left out of the mean (as pytorch-metric-learning's SupConLoss does). Bank entries are
negatives only: a same-class bank entry is a stale copy, not a positive.
"""

from __future__ import annotations

import torch

from xmr.losses._pairs import candidates, class_of, relevant
from xmr.losses.negatives import NegativeSampler
from xmr.losses.registry import LossTerm


class SupConBefore(LossTerm):
    reads = {"temperature": "loss.temperature", "k": "negatives.k",
             "strategy": "negatives.strategy", "gather": "negatives.gather"}
    strategies = ("uniform", "hardest", "class_aware")
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
        self_col = torch.cat([local, local + c.n_global])  # the anchors' own columns
        logits = anchors @ c.emb.T / self.temperature
        rel = relevant(torch.cat([y, y]), c.y)
        pos = rel.clone()
        pos[:, c.n_batch:] = False
        pos[torch.arange(2 * b, device=anchors.device), self_col] = False
        neg = self.sampler(logits, ~rel, n_batch=c.n_batch, labels=class_of(c.y))
        denom = torch.logsumexp(logits.masked_fill(~(pos | neg), float("-inf")), dim=1, keepdim=True)
        log_prob = (logits - denom).masked_fill(~pos, 0.0)
        n_pos = pos.sum(dim=1)
        has_pos = n_pos > 0
        return -(log_prob.sum(dim=1)[has_pos] / n_pos[has_pos])
