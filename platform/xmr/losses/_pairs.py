"""Shared by the category / pair terms: relevance, the candidates an anchor is scored
against (the gathered batch of both modalities, then the memory bank), once per step, and
row-chunked evaluation of a term's logits for large batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from xmr.distributed import gather_rows, gather_with_grad
from xmr.losses.negatives import BankView


def finest(labels: torch.Tensor) -> torch.Tensor:
    """Single labels [B] stay; hierarchical paths [B, L] give their finest level."""
    return labels[:, -1] if labels.dim() == 2 and not labels.is_floating_point() else labels


def relevant(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Bool [Nq, Ng]: same (finest) label, or any shared label for multi-hot float labels."""
    if q.is_floating_point():  # multi-label, multi-hot
        return (q.float() @ g.float().T) > 0
    return finest(q).reshape(-1, 1) == finest(g).reshape(1, -1)


def class_of(y: torch.Tensor) -> torch.Tensor:
    """One class id per candidate for class-aware sampling (a multi-hot row: its first label)."""
    return y.argmax(dim=1) if y.is_floating_point() else finest(y)


@dataclass
class Candidates:
    """Rows an anchor is scored against: ``[0, n_batch)`` the (gathered) batch, then the bank."""

    emb: torch.Tensor  # [C, d]
    y: torch.Tensor  # [C, ...] targets
    modality: torch.Tensor  # long [C]: 0 = a, 1 = b
    n_batch: int
    offset: int  # the local rows' position in the gathered batch of one modality
    n_global: int  # batch size of one modality over all ranks

    def of_modality(self, m: int) -> "Candidates":
        """The candidates of one modality, batch first (cross-modal terms)."""
        keep = self.modality == m
        n_batch = int(keep[: self.n_batch].sum())
        return Candidates(self.emb[keep], self.y[keep], self.modality[keep], n_batch, self.offset, self.n_global)


def candidates(emb_a: torch.Tensor, emb_b: torch.Tensor, y: torch.Tensor, gather: bool,
               bank: BankView | None) -> Candidates:
    """Both modalities' embeddings of the batch (all a, then all b), gathered across ranks
    with gradient when ``gather``, followed by the bank's entries."""
    if gather:
        all_a, offset = gather_with_grad(emb_a)
        all_b, _ = gather_with_grad(emb_b)
        all_y = gather_rows(y)
    else:
        all_a, all_b, all_y, offset = emb_a, emb_b, y, 0
    n = all_a.shape[0]
    emb = torch.cat([all_a, all_b])
    ys = torch.cat([all_y, all_y])
    modality = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)]).to(emb.device)
    if bank is not None and len(bank):
        emb = torch.cat([emb, bank.emb.to(emb.dtype)])
        ys = torch.cat([ys, bank.labels.to(ys.dtype).reshape(len(bank), *ys.shape[1:])])
        modality = torch.cat([modality, bank.modality.long()])
    return Candidates(emb, ys, modality, 2 * n, offset, n)


def step_candidates(ctx, emb_a: torch.Tensor, emb_b: torch.Tensor, y: torch.Tensor, gather: bool) -> Candidates:
    """``candidates`` once per step (one all-gather), shared by every term that asks."""
    return ctx.shared(("candidates", id(emb_a), id(emb_b), gather),
                      lambda: candidates(emb_a, emb_b, y, gather, ctx.bank))


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


def pooled_anchors(emb_a: torch.Tensor, emb_b: torch.Tensor, c: Candidates) -> torch.Tensor:
    """The anchors of a pooled term (both modalities, a then b). With one process and no
    bank they are the candidates themselves, and this returns ``c.emb`` (the same tensor),
    which ``candidate_logits`` turns into a Gram matrix."""
    if c.emb.shape[0] == c.n_batch and c.n_global == emb_a.shape[0] and c.offset == 0:
        return c.emb
    return torch.cat([emb_a, emb_b])


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


def both_directions(fn, out, y: torch.Tensor, c: Candidates, ctx, chunk_mb: float) -> list[torch.Tensor]:
    """``fn(sim, positive column, anchor targets, candidates)`` for a -> b and b -> a.

    One process without a bank: the candidates are the batch itself, so b -> a is the
    transpose of a -> b's similarity and one matmul serves both (shared through ``ctx`` with
    any other term of the step). Otherwise each direction against its candidates, in row
    chunks past ``chunk_mb``."""
    b = out.emb_a.shape[0]
    to_b, to_a = c.of_modality(1), c.of_modality(0)
    pos_col = torch.arange(b, device=out.emb_a.device) + c.offset
    if c.emb.shape[0] == c.n_batch and c.n_global == b and by_rows_fits(b, b, chunk_mb):
        sim = ctx.similarity(out.emb_a, out.emb_b)
        return [fn(sim, pos_col, y, to_b), fn(sim.T, pos_col, y, to_a)]
    return [by_rows(lambda a, p, ry, cc=cands: fn(a @ cc.emb.T, p, ry, cc), (anchors, pos_col, y), cands.emb.shape[0],
                    chunk_mb) for anchors, cands in ((out.emb_a, to_b), (out.emb_b, to_a))]
