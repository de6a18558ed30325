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


# ------------------------------------------------------------- uniform K without a full pass


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
