"""Cross-modal supervised contrastive loss (SCCMRL; SupCon, Khosla et al. 2020).

Both modalities' embeddings are pooled. For each anchor, positives are all other batch
embeddings with the same label (either modality); negatives are K of those with another
label (``negatives.k`` / ``negatives.strategy``; K >= all gives exact SupCon), drawn from the
batch first and the memory bank after. Per anchor:
``-1/|P| Σ_p log(exp(s_p/τ) / Σ_{c ∈ P ∪ N_K} exp(s_c/τ))``. Anchors without a positive are
left out of the mean (as pytorch-metric-learning's SupConLoss does). Bank entries are
negatives only: a same-class bank entry is a stale copy, not a positive.

One form for every case (K below or above the candidates, a bank, multi-hot labels): the
textbook's, masks over the [anchors, candidates] logits. Its one optimisation is row
chunking past ``loss.chunk_mb`` (memory linear in the batch: 336 MB against 1,288 MB at
B = 4,096, bench/results/losses.json). Specialised forms for exact SupCon (per-class
sums, K drawn as columns) were removed in issue 35: no preset, spec or search space reaches
the sizes where they paid.
"""

from __future__ import annotations

import torch

from xmr.losses._pairs import Candidates, by_rows, candidate_logits, class_of, pooled_anchors, relevant, step_candidates
from xmr.losses.negatives import NegativeSampler
from xmr.losses.registry import LossTerm, register_term


@register_term("supcon")
class SupervisedContrastive(LossTerm):
    reads = {"temperature": "loss.temperature", "k": "negatives.k",
             "strategy": "negatives.strategy", "gather": "negatives.gather", "chunk_mb": "loss.chunk_mb"}
    strategies = ("uniform", "hardest", "class_aware")
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
        self_col = torch.cat([local, local + c.n_global])  # the anchors' own columns
        return by_rows(lambda a, s, ry: self._rows(a, s, ry, c), (anchors, self_col, torch.cat([y, y])),
                       c.emb.shape[0], self.chunk_mb)

    def _rows(self, anchors, self_col, rows_y, c: Candidates):
        """The loss of each anchor row that has a positive."""
        logits = candidate_logits(anchors, c, self.temperature)
        rows = torch.arange(anchors.shape[0], device=anchors.device)
        pos = relevant(rows_y, c.y)
        allowed = ~pos
        neg = self.sampler(logits, allowed, n_batch=c.n_batch, labels=class_of(c.y))
        pos[rows, self_col] = False
        with_bank = c.emb.shape[0] > c.n_batch
        if with_bank:
            pos[:, c.n_batch:] = False  # bank entries are never positives
        # Out of each denominator: the anchor itself, and where K leaves some out or a bank holds
        # same-class entries, all but positives and drawn negatives. In place: nothing saved
        # for backward needs the logits' values.
        logits.index_put_((rows, self_col), logits.new_tensor(float("-inf")))
        if neg is not allowed or with_bank:
            logits.masked_fill_(~(pos | neg), float("-inf"))
        n_pos = pos.sum(dim=1)
        has_pos = n_pos > 0
        if not bool(has_pos.all()):  # rows without a positive leave the mean
            logits, pos, n_pos = logits[has_pos], pos[has_pos], n_pos[has_pos]
        return torch.logsumexp(logits, dim=1) - logits.masked_fill(~pos, 0.0).sum(dim=1) / n_pos
