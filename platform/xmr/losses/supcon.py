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

from xmr.losses._pairs import (Candidates, by_rows, by_rows_fits, candidate_logits, class_of, finest, pooled_anchors,
                               relevant, step_candidates)
from xmr.losses.negatives import NegativeSampler
from xmr.losses.registry import LossTerm, register_term


# (anchor, candidate) cells up to which exact SupCon takes ``_dense``. Measured (d = 256, one
# thread, forward + backward, interleaved): dense / class sums took 0.80 at B = 32 (64 x 64
# cells), 0.85 at 64, 0.88 at 128, 0.95 at 256 (512 x 512), 1.05 at 384, 1.14 at 512, 1.39 at 1,024.
DENSE_MAX_CELLS = 512 * 512


@register_term("supcon")
class SupervisedContrastive(LossTerm):
    """Cost: one similarity matmul and one logsumexp when K covers every candidate (exact
    SupCon) with single labels: the positives' summed logits come from per-class sums of
    the candidates (a·Σ_p c_p), so no [anchors, candidates] mask is built; up to
    ``DENSE_MAX_CELLS`` the dense mask is cheaper than that bookkeeping and is used.
    Multi-label rows, a memory bank or K below the candidates take the masked form."""

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
        rows_y = torch.cat([y, y])
        every = self.sampler.strategy != "class_aware" and self.sampler.k >= c.emb.shape[0] - 1
        if every and not y.is_floating_point() and c.emb.shape[0] == c.n_batch:
            n_rows, n_cols = anchors.shape[0], c.emb.shape[0]
            if n_rows * n_cols <= DENSE_MAX_CELLS and by_rows_fits(n_rows, n_cols, self.chunk_mb):
                return self._dense(anchors, self_col, rows_y, c)
            sums = _class_sums(c, rows_y)
            return by_rows(lambda a, s, ry: self._exact(a, s, ry, c, sums), (anchors, self_col, rows_y),
                           c.emb.shape[0], self.chunk_mb)
        return by_rows(lambda a, s, ry: self._masked(a, s, ry, c), (anchors, self_col, rows_y),
                       c.emb.shape[0], self.chunk_mb)

    def _dense(self, anchors, self_col, rows_y, c: Candidates):
        """``_exact`` as the textbook writes it, for small batches: a dense positive mask.
        Below ``DENSE_MAX_CELLS`` its few whole-matrix passes cost less than the class
        bookkeeping (unique, per-class sums, lookups) that spares them at scale."""
        logits = candidate_logits(anchors, c, self.temperature)
        rows = torch.arange(anchors.shape[0], device=anchors.device)
        logits.index_put_((rows, self_col), logits.new_tensor(float("-inf")))  # in place, as ``_exact``
        pos = finest(rows_y)[:, None] == finest(c.y)[None, :]
        pos[rows, self_col] = False
        return torch.logsumexp(logits, dim=1) - logits.masked_fill(~pos, 0.0).sum(dim=1) / pos.sum(dim=1)

    def _exact(self, anchors, self_col, rows_y, c: Candidates, sums):
        """Every other candidate in the denominator; Σ_p s_p = a·(Σ_class c − c_self).

        Every anchor has a positive here: its own pair in the other modality carries its
        label and is a batch candidate (single labels, no bank), so n_pos >= 1 and no row
        is dropped."""
        class_sum, class_count, slot, row_class = sums
        logits = candidate_logits(anchors, c, self.temperature)
        rows = torch.arange(anchors.shape[0], device=anchors.device)
        # In place (no copy of the logits): nothing saved for backward needs their values.
        logits.index_put_((rows, self_col), logits.new_tensor(float("-inf")))
        if anchors is c.emb:  # the Gram matrix: anchor i is candidate i
            cls, own = slot, anchors
        else:
            cls, own = row_class(rows_y), c.emb[self_col]
        denom = torch.logsumexp(logits, dim=1)
        n_pos = class_count[cls] - 1
        pos_sum = (anchors * (class_sum[cls] - own)).sum(dim=1)
        return denom - pos_sum / (n_pos * self.temperature)

    def _masked(self, anchors, self_col, rows_y, c: Candidates):
        rows = torch.arange(anchors.shape[0], device=anchors.device)
        logits = candidate_logits(anchors, c, self.temperature)
        drawn = self.sampler.outside_class(finest(c.y), finest(rows_y), c.n_batch) if not c.y.is_floating_point() else None
        if drawn is not None:
            return self._drawn(logits, self_col, rows_y, *drawn)
        rel = relevant(rows_y, c.y)
        pos = rel.clone()
        pos[:, c.n_batch:] = False
        pos[rows, self_col] = False
        neg = self.sampler(logits, ~rel, n_batch=c.n_batch, labels=class_of(c.y))
        denom = torch.logsumexp(logits.masked_fill(~(pos | neg), float("-inf")), dim=1, keepdim=True)
        log_prob = (logits - denom).masked_fill(~pos, 0.0)
        n_pos = pos.sum(dim=1)
        has_pos = n_pos > 0
        return -(log_prob.sum(dim=1)[has_pos] / n_pos[has_pos])


    @staticmethod
    def _drawn(logits, self_col, rows_y, neg_cols, neg_ok, blocks):
        """``_masked`` on gathered columns: each row's positives (its class block but itself)
        and its K drawn negatives, not masks over every candidate (``outside_class``)."""
        start, size = blocks.of_rows(finest(rows_y))
        slot = torch.arange(int(size.max()), device=logits.device)
        pos_cols = blocks.order[(start[:, None] + slot).clamp(max=logits.shape[1] - 1)]
        pos_ok = (slot < size[:, None]) & (pos_cols != self_col[:, None])
        z = logits.gather(1, torch.cat([pos_cols, neg_cols], dim=1))
        ok = torch.cat([pos_ok, neg_ok], dim=1)
        denom = torch.logsumexp(z.masked_fill(~ok, float("-inf")), dim=1)
        n_pos = pos_ok.sum(dim=1)
        pos_sum = z[:, : len(slot)].masked_fill(~pos_ok, 0.0).sum(dim=1)
        has_pos = n_pos > 0
        return (denom - pos_sum / n_pos.clamp(min=1))[has_pos]


def _class_sums(c: Candidates, rows_y: torch.Tensor):
    """Per class of the batch candidates: the sum of their embeddings and their count, each
    candidate's class slot, and a map from row labels to class slots (single labels, finest
    level)."""
    cand = finest(c.y[: c.n_batch])
    classes, slot = torch.unique(cand, return_inverse=True)
    class_sum = c.emb.new_zeros(len(classes), c.emb.shape[1]).index_add(0, slot, c.emb[: c.n_batch])
    class_count = torch.bincount(slot, minlength=len(classes))

    def row_class(ry: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(classes, finest(ry).contiguous())

    return class_sum, class_count, slot, row_class
