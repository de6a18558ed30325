# FROZEN COPY, for bench/losses.py and bench/train_step.py only: the supcon term as it was before issue 35 (commit
# e21b123), with its four forms (``_dense``, ``_exact`` by per-class sums, ``_masked``, and
# ``_drawn``: K uniform negatives drawn as columns), so the one form that replaced them is
# timed against it in the same rounds. Self-contained (torch only), cut to what the bench
# runs: one process, no memory bank, uniform negatives. Not imported by the library or the
# tests; do not edit.
"""Cross-modal SupCon before issue 35 (see ``xmr.losses.supcon`` for the loss itself)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def finest(labels: torch.Tensor) -> torch.Tensor:
    return labels[:, -1] if labels.dim() == 2 and not labels.is_floating_point() else labels


def relevant(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    if q.is_floating_point():
        return (q.float() @ g.float().T) > 0
    return finest(q).reshape(-1, 1) == finest(g).reshape(1, -1)


@dataclass
class Candidates:
    emb: torch.Tensor
    y: torch.Tensor
    n_batch: int
    n_global: int
    offset: int = 0


def candidates(emb_a: torch.Tensor, emb_b: torch.Tensor, y: torch.Tensor) -> Candidates:
    return Candidates(torch.cat([emb_a, emb_b]), torch.cat([y, y]), 2 * emb_a.shape[0], emb_a.shape[0])


GRAM_ONE_MATMUL_MAX_ROWS = 512  # bench on this machine, [n, n] grad, d = 256, one thread:
# (G + Gᵀ) E against G E + Gᵀ E took 0.62x at n = 128, 0.82x at 512, 1.30x at 2048, 1.55x at
# 8192: the transposed read of G costs more than the matmul it saves once G leaves the cache.


class _Gram(torch.autograd.Function):
    """E Eᵀ whose backward is one matmul, (G + Gᵀ) E, for small E (autograd's ``e @ e.T``
    runs two); past ``GRAM_ONE_MATMUL_MAX_ROWS`` rows the two, as one ``addmm``."""

    @staticmethod
    def forward(ctx, e: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(e)
        return e @ e.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (e,) = ctx.saved_tensors
        if e.shape[0] <= GRAM_ONE_MATMUL_MAX_ROWS:
            return (grad + grad.T) @ e
        return torch.addmm(grad @ e, grad.T, e)


def candidate_logits(anchors: torch.Tensor, c: Candidates, temperature: float) -> torch.Tensor:
    """anchors · candidatesᵀ / τ. When the anchors *are* the candidates (``pooled_anchors``,
    unchunked) the logits are the Gram matrix E Eᵀ, and its backward is one matmul
    instead of two (issue 14: a third of a pooled term's matmul work). Under autocast the
    plain product (the Function's backward would see mixed dtypes)."""
    if anchors is c.emb and not torch.is_autocast_enabled(anchors.device.type):
        return _Gram.apply(anchors) / temperature
    return anchors @ c.emb.T / temperature


def rows_per_chunk(n_rows: int, n_cols: int, budget_mb: float) -> int:
    """How many anchor rows keep one chunk's float32 logits within ``budget_mb`` (0: all)."""
    if budget_mb <= 0 or n_rows == 0:
        return max(n_rows, 1)
    return max(1, min(n_rows, int(budget_mb * 2**20 // (4 * max(n_cols, 1)))))


def by_rows_fits(n_rows: int, n_cols: int, budget_mb: float) -> bool:
    """Whether all rows' logits fit the budget in one piece."""
    return rows_per_chunk(n_rows, n_cols, budget_mb) >= n_rows


def by_rows(fn: Callable[..., torch.Tensor], rows: tuple[torch.Tensor, ...], n_cols: int,
            budget_mb: float) -> torch.Tensor:
    """``fn(*rows)`` -> one value per row, computed in chunks of rows when the logits of all
    rows against ``n_cols`` candidates would pass ``budget_mb``. Each chunk is checkpointed
    (its logits are recomputed in backward rather than kept), so peak extra memory is one
    chunk's logits: linear in the batch, as open_clip's per-rank local loss. Rows are
    independent given the candidates (which ``fn`` closes over), so the values and
    gradients are those of the unchunked form; the RNG state is restored for the
    recomputation, so even uniform sampling draws the same negatives twice."""
    n = rows[0].shape[0]
    size = rows_per_chunk(n, n_cols, budget_mb)
    if size >= n:
        return fn(*rows)
    parts = [checkpoint(fn, *(r[lo:lo + size] for r in rows), use_reentrant=False) if torch.is_grad_enabled()
             else fn(*(r[lo:lo + size] for r in rows)) for lo in range(0, n, size)]
    return torch.cat(parts)


def rows_per_chunk(n_rows: int, n_cols: int, budget_mb: float) -> int:
    if budget_mb <= 0 or n_rows == 0:
        return max(n_rows, 1)
    return max(1, min(n_rows, int(budget_mb * 2**20 // (4 * max(n_cols, 1)))))


def by_rows_fits(n_rows: int, n_cols: int, budget_mb: float) -> bool:
    return rows_per_chunk(n_rows, n_cols, budget_mb) >= n_rows


def by_rows(fn: Callable[..., torch.Tensor], rows: tuple[torch.Tensor, ...], n_cols: int,
            budget_mb: float) -> torch.Tensor:
    n = rows[0].shape[0]
    size = rows_per_chunk(n, n_cols, budget_mb)
    if size >= n:
        return fn(*rows)
    parts = [checkpoint(fn, *(r[lo:lo + size] for r in rows), use_reentrant=False) if torch.is_grad_enabled()
             else fn(*(r[lo:lo + size] for r in rows)) for lo in range(0, n, size)]
    return torch.cat(parts)


class NegativeSampler:
    def __init__(self, k: int, strategy: str) -> None:
        if strategy != "uniform":
            raise ValueError("the frozen copy keeps uniform negatives only")
        self.k, self.strategy = int(k), strategy

    def covers(self, allowed: torch.Tensor) -> bool:
        if self.k >= allowed.shape[1] or allowed.shape[0] == 0:
            return True
        return int(torch.count_nonzero(allowed, dim=1).max()) <= self.k

    def outside_class(self, candidate_labels: torch.Tensor, row_labels: torch.Tensor, n_batch: int,
                      generator: torch.Generator | None = None):
        """K uniform negatives per row as columns, where the allowed set is "every candidate
        of another class": (columns [rows, K], valid [rows, K], the candidates' class
        blocks), or None where the caller must build a mask (another strategy, multi-hot
        labels, a bank behind the batch, or K covering every row's candidates).

        Columns, not a [rows, C] mask, so a term gathers K + |P| logits per row instead of
        masking, exponentiating and reducing the whole matrix (issue 14). A small K (at most
        ``FAST_UNIFORM_MAX_SHARE`` of every row's allowed count) is drawn by rejection
        (``uniform_outside_class``); a larger one by random keys and a top-k, whose indices
        are the columns (a row with fewer allowed candidates than K marks the rest invalid)."""
        if (self.strategy != "uniform" or candidate_labels.is_floating_point() or candidate_labels.dim() != 1
                or n_batch != candidate_labels.shape[0] or row_labels.shape[0] == 0 or self.k >= n_batch
                or row_labels.shape[0] * n_batch < COLUMNS_MIN_CELLS):
            return None
        blocks = ClassBlocks.of(candidate_labels)
        n_cols = candidate_labels.shape[0]
        fewest = n_cols - int(blocks.size.max())  # the smallest allowed count of any row
        if self.k <= FAST_UNIFORM_MAX_SHARE * fewest:
            cols = uniform_outside_class(blocks, row_labels, self.k, generator)
            return cols, torch.ones_like(cols, dtype=torch.bool), blocks
        allowed = row_labels[:, None] != candidate_labels[None, :]
        most = int(allowed.sum(dim=1).max())
        if most <= self.k:
            return None  # K covers every candidate: the allowed mask itself is the answer
        keys = torch.rand(allowed.shape, generator=generator, device="cpu").to(allowed.device)
        cols = keys.masked_fill_(~allowed, -1.0).topk(self.k, dim=1, sorted=False).indices
        return cols, allowed.gather(1, cols), blocks

    def __call__(self, sim: torch.Tensor, allowed: torch.Tensor, *, n_batch: int | None = None,
                 labels: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform negatives as a mask (the bench's strategy; the others are in the live sampler)."""
        if self.covers(allowed):
            return allowed
        keys = torch.rand(sim.shape, generator=generator, device="cpu").to(sim.device)
        return _top_k_mask(keys, allowed, self.k)


def _top_k_mask(keys: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    keys = keys.masked_fill(~allowed, float("-inf"))
    take = min(k, keys.shape[1])
    top = keys.topk(take, dim=1, sorted=False).indices
    # A row with fewer than K allowed keeps them all: its top-k reaches disallowed (-inf) columns,
    # which the final ``& allowed`` drops (top-k unsorted, so no rank test is needed).
    mask = torch.zeros_like(allowed).scatter_(1, top, True)
    return mask & allowed


@dataclass
class ClassBlocks:
    """Candidates grouped by (single, finest-level) class: ``order`` lists the candidate
    columns class by class; a class's members are ``order[start : start + size]``."""

    classes: torch.Tensor  # sorted class ids [n_classes]
    order: torch.Tensor  # candidate columns sorted by class [C]
    start: torch.Tensor  # [n_classes]
    size: torch.Tensor  # [n_classes]

    @classmethod
    def of(cls, labels: torch.Tensor) -> "ClassBlocks":
        classes, slot = torch.unique(labels, return_inverse=True)
        size = torch.bincount(slot, minlength=len(classes))
        start = torch.cumsum(size, 0) - size
        return cls(classes, torch.argsort(slot, stable=True), start, size)

    def of_rows(self, row_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, size) of each row's class among the candidates (size 0: not present)."""
        slot = torch.searchsorted(self.classes, row_labels.contiguous()).clamp(max=len(self.classes) - 1)
        found = self.classes[slot] == row_labels
        return torch.where(found, self.start[slot], 0), torch.where(found, self.size[slot], 0)


COLUMNS_MIN_CELLS = 32768  # below this many (row, candidate) cells a mask is as cheap (measured: at
# 128 x 128 the mask form took 0.7-1.1x the columns' time, at 256 x 256 1.1-1.6x)
FAST_UNIFORM_MAX_SHARE = 0.15  # K up to this share of every row's allowed candidates: drawn by rejection,
# past it by random keys and a top-k. Measured (one thread, 32 classes, rejection against top-k): 2,048
# rows x K = 255 (share 0.13) 64 / 77 ms; 256 x 60 (0.25) 2.8 / 1.6; 1,024 x 255 (0.26) 40 / 24;
# 512 x 170 (0.35) 11 / 5; 512 x 255 (0.52) 21 / 6.


def distinct_ranks(n: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """K distinct integers per row, uniform among the K-subsets of [0, n_row) ([rows, K];
    needs K <= n_row).

    Each row draws i.i.d. and keeps its first K distinct values, which is sampling without
    replacement, one value at a time: every K-subset equally likely. Vectorised: M > K
    draws a row (enough that fewer than K distinct among them is rare; such rows draw again),
    one stable sort to find each value's first draw, and a cumulative count to keep the
    first K. No [rows, n] matrix is read, and no Python loop per draw."""
    rows, device = n.shape[0], n.device
    out = torch.empty(rows, k, dtype=torch.long, device=device)
    n_min = int(n.min()) if rows else 1
    if n_min < k:
        raise ValueError(f"{k} distinct values asked of a row that has only {n_min}")
    m = k + int(2 * k * k / max(n_min, 1)) + 8  # twice the expected repeats among K draws, and a margin
    todo = torch.arange(rows, device=device)
    while len(todo):
        limit = n[todo][:, None]
        u = torch.rand(len(todo), m, generator=generator, device="cpu").to(device)
        draws = torch.minimum((u * limit).long(), limit - 1)
        value, order = draws.sort(dim=1, stable=True)  # equal values keep their draw order
        first_sorted = torch.ones_like(value, dtype=torch.bool)
        first_sorted[:, 1:] = value[:, 1:] != value[:, :-1]
        first = torch.zeros_like(first_sorted).scatter_(1, order, first_sorted)  # first draw of its value
        keep = first & (first.cumsum(dim=1) <= k)
        done = keep.sum(dim=1) == k
        out[todo[done]] = draws[done][keep[done]].view(-1, k)
        todo = todo[~done]
    return out


def uniform_outside_class(blocks: ClassBlocks, row_labels: torch.Tensor, k: int,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """For each row, K candidate columns drawn uniformly without replacement from those of
    another class ([rows, K]; ``NegativeSampler.outside_class`` checks that K is at most
    ``FAST_UNIFORM_MAX_SHARE`` of every row's allowed count).

    Why not random keys and a top-k: those fill and sort a [rows, C] matrix per step, 2 to
    4 times the loss itself once K is below the candidates (issue 14). A row's allowed
    candidates are every column but its own class block, so K ranks among them
    (``distinct_ranks``) map to columns by stepping over that block in ``order``."""
    own_start, own_size = blocks.of_rows(row_labels)
    ranks = distinct_ranks(blocks.order.shape[0] - own_size, k, generator)
    position = torch.where(ranks >= own_start[:, None], ranks + own_size[:, None], ranks)
    return blocks.order[position]


# (anchor, candidate) cells up to which exact SupCon takes ``_dense``. Measured (d = 256, one
# thread, forward + backward, interleaved): dense / class sums took 0.80 at B = 32 (64 x 64
# cells), 0.85 at 64, 0.88 at 128, 0.95 at 256 (512 x 512), 1.05 at 384, 1.14 at 512, 1.39 at 1,024.
DENSE_MAX_CELLS = 512 * 512


class SupConIssue35(nn.Module):
    """Cost: one similarity matmul and one logsumexp when K covers every candidate (exact
    SupCon) with single labels: the positives' summed logits come from per-class sums of
    the candidates (a·Σ_p c_p), so no [anchors, candidates] mask is built; up to
    ``DENSE_MAX_CELLS`` the dense mask is cheaper than that bookkeeping and is used.
    Multi-label rows, a memory bank or K below the candidates take the masked form."""

    def __init__(self, temperature: float, k: int, strategy: str, gather: bool, chunk_mb: float = 64.0) -> None:
        super().__init__()
        self.temperature, self.gather, self.chunk_mb = temperature, gather, chunk_mb
        self.sampler = NegativeSampler(k, strategy)

    diagnostics: dict = {}  # the rest of the loss-term contract the training step calls

    def param_groups(self, lr: float) -> list:
        return []

    def after_step(self, optimizer) -> dict:
        return {}

    def forward(self, out, batch, ctx):
        return self.per_anchor(out, batch, ctx).mean()

    def per_anchor(self, out, batch, ctx):
        y = ctx.targets
        c = candidates(out.emb_a, out.emb_b, y)
        b = out.emb_a.shape[0]
        anchors = c.emb  # one process, no bank: the anchors are the candidates
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
        neg = self.sampler(logits, ~rel, n_batch=c.n_batch, labels=None)
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
