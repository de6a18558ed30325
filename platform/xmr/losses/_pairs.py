"""Shared by the category / pair terms: relevance, and the candidates an anchor is scored
against (the gathered batch of both modalities, then the memory bank)."""

from __future__ import annotations

from dataclasses import dataclass
import torch

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
