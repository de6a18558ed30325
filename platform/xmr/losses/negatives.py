"""Where multi-negative terms get their negatives, and how K of them are picked.

Sources, in order: the global batch gathered across data-parallel ranks *with gradient*,
then a FIFO memory bank of past (detached) embeddings when K exceeds the global batch.

The local-loss pattern: each rank scores only its own anchors against the gathered set,
with the anchors' positions offset by the rank's start in the global batch. A term returns
``sum over local anchors / N_global * world_size`` (see ``local_mean``), so the mean of the
values over ranks is the single-process loss on the concatenated batch, and after DDP
averages gradients over ranks they equal the single-process gradients.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

STRATEGIES = ("uniform", "hardest", "class_aware")


def world_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` from every rank along dim 0 (local sizes may differ).

    Returns (gathered, offset of this rank's rows). Gradients flow back to the rank that
    owns each row (``torch.distributed.nn.functional.all_gather`` sums them there).
    """
    rank, world = world_info()
    if world == 1:
        return x, 0
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes_list = [int(s.item()) for s in sizes]
    longest = max(sizes_list)
    padded = x
    if x.shape[0] < longest:
        pad = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
        padded = torch.cat([x, pad], dim=0)
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the autograd-aware gather
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(padded)
    gathered = torch.cat([p[:n] for p, n in zip(parts, sizes_list)], dim=0)
    return gathered, sum(sizes_list[:rank])


def gather_labels(y: torch.Tensor) -> torch.Tensor:
    """Gather non-differentiable per-row data (labels, ids) the same way."""
    rank, world = world_info()
    if world == 1:
        return y
    with torch.no_grad():
        gathered, _ = gather_with_grad(y.float() if y.dtype == torch.bool else y)
    return gathered.to(y.dtype)


def global_count(n_local: int, device: torch.device) -> int:
    """Number of anchors over all ranks."""
    _, world = world_info()
    if world == 1:
        return n_local
    t = torch.tensor([n_local], device=device, dtype=torch.long)
    dist.all_reduce(t)
    return int(t.item())


def local_mean(per_anchor: torch.Tensor) -> torch.Tensor:
    """The local share of the global mean, scaled for DDP's gradient average (module doc)."""
    _, world = world_info()
    if world == 1:
        return per_anchor.mean() if per_anchor.numel() else per_anchor.sum()
    n_global = global_count(per_anchor.shape[0], per_anchor.device)
    return per_anchor.sum() / max(n_global, 1) * world


class MemoryBank(torch.nn.Module):
    """FIFO of past embeddings (detached) with their labels, used as extra negatives.

    Kept as buffers so it moves with the module between devices; not saved in checkpoints
    (``persistent=False``): a resumed run refills it within a few steps.
    """

    def __init__(self, size: int, dim: int, label_width: int = 1) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("emb", torch.zeros(size, dim), persistent=False)
        self.register_buffer("labels", torch.full((size, label_width), -1, dtype=torch.long), persistent=False)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("filled", torch.zeros((), dtype=torch.long), persistent=False)

    @torch.no_grad()
    def enqueue(self, emb: torch.Tensor, labels: torch.Tensor) -> None:
        emb = emb.detach()[-self.size:]
        labels = labels.detach().reshape(labels.shape[0], -1)[-self.size:].long()
        n = emb.shape[0]
        idx = (self.ptr + torch.arange(n, device=emb.device)) % self.size
        self.emb[idx] = emb.to(self.emb.dtype)
        self.labels[idx] = labels
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored embeddings and labels, oldest first."""
        n = int(self.filled)
        if n < self.size:
            return self.emb[:n], self.labels[:n]
        order = (self.ptr + torch.arange(self.size, device=self.emb.device)) % self.size
        return self.emb[order], self.labels[order]


def select_negatives(sim: torch.Tensor, allowed: torch.Tensor, k: int, strategy: str,
                     candidate_labels: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick min(k, #allowed) negatives per row; returns a bool mask like ``allowed``.

    - ``uniform``: a random subset (random keys, top-k of them);
    - ``hardest``: the k most similar;
    - ``class_aware``: the hardest of each other class first (one per class), then, if
      fewer classes than k, the next hardest — MNS-GAN's "one negative per other class".
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"negatives.strategy = {strategy!r}: must be one of {list(STRATEGIES)}")
    if k < 1:
        raise ValueError(f"negatives.k = {k}: K must be >= 1")
    n_allowed = allowed.sum(dim=1, keepdim=True)
    if strategy == "uniform":
        keys = torch.rand(sim.shape, generator=generator, device="cpu").to(sim.device)
    elif strategy == "hardest":
        keys = sim.detach().clone()
    else:
        if candidate_labels is None:
            raise ValueError("class_aware negatives need candidate_labels")
        keys = _class_aware_keys(sim.detach(), allowed, candidate_labels)
    keys = keys.masked_fill(~allowed, float("-inf"))
    take = min(k, sim.shape[1])
    if take == 0:
        return torch.zeros_like(allowed)
    top = keys.topk(take, dim=1).indices
    mask = torch.zeros_like(allowed)
    rank = torch.arange(take, device=sim.device).expand_as(top)
    mask.scatter_(1, top, rank < n_allowed)  # rows with fewer allowed than k keep them all
    return mask & allowed


def _class_aware_keys(sim: torch.Tensor, allowed: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Keys that rank each class's hardest allowed candidate above every second-hardest."""
    labels = labels.reshape(-1)
    masked = sim.masked_fill(~allowed, float("-inf"))
    classes, inverse = labels.unique(return_inverse=True)
    n_rows, n_cls = sim.shape[0], classes.numel()
    best = masked.new_full((n_rows, n_cls), float("-inf"))
    best = best.scatter_reduce(1, inverse.expand(n_rows, -1), masked, reduce="amax", include_self=True)
    is_best = (masked == best.gather(1, inverse.expand(n_rows, -1))) & allowed
    # Only the first column achieving each class's max counts as that class's representative.
    col = torch.arange(sim.shape[1], device=sim.device).expand(n_rows, -1)
    cand = torch.where(is_best, col, torch.full_like(col, sim.shape[1]))
    first_col = torch.full((n_rows, n_cls), sim.shape[1], device=sim.device, dtype=col.dtype)
    first_col = first_col.scatter_reduce(1, inverse.expand(n_rows, -1), cand, reduce="amin", include_self=True)
    first = col == first_col.gather(1, inverse.expand(n_rows, -1))
    first &= is_best
    # Similarities lie in [-1, 1] (cosine) or are bounded logits: shift representatives up.
    span = (sim.abs().max() + 1.0) * 4
    return sim + first.to(sim.dtype) * span
