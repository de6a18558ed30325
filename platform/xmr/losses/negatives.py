"""Where multi-negative terms get their negatives, and how K of them are picked.

Sources, in order (METHODS.md "Negatives"): the global batch, gathered across
data-parallel ranks *with gradient* (``negatives.gather``; off, each rank contrasts with its
own share only), then a FIFO memory bank of past embeddings (``negatives.memory_bank``).
The bank only fills what the batch cannot: a strategy picks among the batch's allowed
candidates first and reaches into the bank for the rest of the K. Bank entries are
negatives only, never positives (a stale copy of a same-class item is left out).

Why the order matters: a bank entry was written by an older encoder. Drawn uniformly from
batch ∪ bank, most of a large K comes from the bank, and with a bank written by the
current (fast-moving) encoder early in training the loss contrasts against stale points
and training collapses (issue 11: 0.30 test mAP on the digits against 0.94 without the
bank). Batch-first, a warm-up (``negatives.bank_warmup_steps``) and a momentum key encoder
writing the bank (``negatives.momentum``, MoCo; see ``xmr.method``) keep it safe.

Strategies (``negatives.strategy``):
- ``uniform``: a random subset;
- ``hardest``: the K most similar;
- ``semi_hard``: FaceNet's semi-hard negatives as TensorFlow's ``triplet_semihard_loss``
  picks them: first the negatives *less* similar than the anchor's positive, closest to it
  first; only where there are too few, the ones more similar than the positive, least
  similar first. Needs the positive's score per anchor (terms with one positive);
- ``class_aware``: MNS-GAN's "one negative per other class present, capped at K": the
  hardest candidate of each other class (a batch member if the class is in the batch),
  and where there are more classes than K, the K hardest of those representatives.
When K covers every allowed candidate the allowed set itself is the answer: no random
keys, no top-k (exact SupCon / InfoNCE cost one similarity matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

STRATEGIES = ("uniform", "hardest", "semi_hard", "class_aware")


class NegativeSampler:
    """Picks min(K, #allowed) negatives per anchor row; see the module docstring."""

    def __init__(self, k: int, strategy: str) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"negatives.strategy = {strategy!r}: must be one of {list(STRATEGIES)}")
        if k < 1:
            raise ValueError(f"negatives.k = {k}: K must be >= 1")
        self.k, self.strategy = int(k), strategy

    def covers(self, allowed: torch.Tensor) -> bool:
        """True when K reaches every allowed candidate of every row (the mask is the answer)."""
        if self.k >= allowed.shape[1] or allowed.shape[0] == 0:
            return True
        return int(torch.count_nonzero(allowed, dim=1).max()) <= self.k

    def __call__(self, sim: torch.Tensor, allowed: torch.Tensor, *, n_batch: int | None = None,
                 labels: torch.Tensor | None = None, pos_sim: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Bool mask like ``allowed`` [rows, cols]. Columns ``[0, n_batch)`` are the batch,
        the rest the memory bank (batch first). ``labels`` [cols] for ``class_aware``,
        ``pos_sim`` [rows] (the positive's score) for ``semi_hard``."""
        n_batch = sim.shape[1] if n_batch is None else n_batch
        if self.strategy == "class_aware":
            if labels is None:
                raise ValueError("class_aware negatives need the candidates' labels")
            return _class_aware(sim.detach(), allowed, labels.reshape(-1), n_batch, self.k)
        if self.covers(allowed):
            return allowed
        s = sim.detach()
        if self.strategy == "uniform":
            keys = torch.rand(s.shape, generator=generator, device="cpu").to(s.device)
        elif self.strategy == "hardest":
            keys = s.clone()
        else:
            if pos_sim is None:
                raise ValueError("semi_hard negatives need the positive's score per anchor (pos_sim)")
            span = s.abs().max() + 1.0
            easier = s < pos_sim.detach()[:, None]
            keys = torch.where(easier, s + 2 * span, -s)
        if n_batch < s.shape[1]:  # batch candidates outrank every bank candidate
            keys[:, :n_batch] += 2 * (keys.abs().max() + 1.0)
        return _top_k_mask(keys, allowed, self.k)


def _top_k_mask(keys: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    keys = keys.masked_fill(~allowed, float("-inf"))
    take = min(k, keys.shape[1])
    top = keys.topk(take, dim=1, sorted=False).indices
    # A row with fewer than K allowed keeps them all: its top-k reaches disallowed (-inf) columns,
    # which the final ``& allowed`` drops (top-k unsorted, so no rank test is needed).
    mask = torch.zeros_like(allowed).scatter_(1, top, True)
    return mask & allowed


def _class_aware(sim: torch.Tensor, allowed: torch.Tensor, labels: torch.Tensor, n_batch: int,
                 k: int) -> torch.Tensor:
    """One representative (the hardest, batch before bank, first column on ties) per class
    among each row's allowed candidates; the K hardest representatives."""
    span = sim.abs().max() + 1.0
    shifted = sim.clone()
    shifted[:, n_batch:] -= 4 * span  # a class present in the batch is represented from the batch
    masked = shifted.masked_fill(~allowed, float("-inf"))
    classes, inverse = labels.unique(return_inverse=True)
    n_rows, n_cols, n_cls = sim.shape[0], sim.shape[1], classes.numel()
    index = inverse.expand(n_rows, -1)
    best = masked.new_full((n_rows, n_cls), float("-inf")).scatter_reduce(1, index, masked, reduce="amax",
                                                                          include_self=True)
    is_best = (masked == best.gather(1, index)) & allowed
    col = torch.arange(n_cols, device=sim.device).expand(n_rows, -1)
    first = torch.full((n_rows, n_cls), n_cols, device=sim.device, dtype=col.dtype).scatter_reduce(
        1, index, torch.where(is_best, col, torch.full_like(col, n_cols)), reduce="amin", include_self=True)
    representative = is_best & (col == first.gather(1, index))
    return _top_k_mask(shifted, representative, k)


# --------------------------------------------------------------------------- the memory bank


@dataclass
class BankView:
    """The bank's entries for one step, oldest first: embeddings, targets, modality (0 = a, 1 = b)."""

    emb: torch.Tensor
    labels: torch.Tensor
    modality: torch.Tensor

    def __len__(self) -> int:
        return self.emb.shape[0]


class MemoryBank(nn.Module):
    """FIFO of past key embeddings with their targets and modality, used as extra negatives.

    Buffers, so it moves with the module and is saved in checkpoints: a resumed run
    continues with the same bank, warm-up counter and write position. ``label_shape`` and
    ``label_dtype`` are those of one target (a class id, a label path, a multi-hot row, or a
    pair index); targets decide which entries are relevant to an anchor (never negatives).
    """

    def __init__(self, size: int, dim: int, label_shape: tuple[int, ...] = (), label_dtype=torch.long) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"negatives.memory_bank = {size}: a bank needs >= 1 entry")
        self.size = size
        self.register_buffer("emb", torch.zeros(size, dim))
        fill = -1 if not label_dtype.is_floating_point else 0
        self.register_buffer("labels", torch.full((size, *label_shape), fill, dtype=label_dtype))
        self.register_buffer("modality", torch.zeros(size, dtype=torch.uint8))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("writes", torch.zeros((), dtype=torch.long))  # training steps that wrote

    @torch.no_grad()
    def enqueue(self, emb: torch.Tensor, labels: torch.Tensor, modality: torch.Tensor) -> None:
        emb, labels, modality = emb.detach()[-self.size:], labels.detach()[-self.size:], modality[-self.size:]
        n = emb.shape[0]
        idx = (self.ptr + torch.arange(n, device=self.emb.device)) % self.size
        self.emb[idx] = emb.to(self.emb.dtype)
        self.labels[idx] = labels.to(self.labels.dtype).reshape(n, *self.labels.shape[1:])
        self.modality[idx] = modality.to(torch.uint8)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))
        self.writes.add_(1)

    def view(self) -> BankView | None:
        """The stored entries, oldest first (None while empty)."""
        n = int(self.filled)
        if n == 0:
            return None
        if n < self.size:
            order = torch.arange(n, device=self.emb.device)
        else:
            order = (self.ptr + torch.arange(self.size, device=self.emb.device)) % self.size
        return BankView(self.emb[order], self.labels[order], self.modality[order])
