"""Data-parallel helpers: who am I, gather rows (with gradient), reduce, share objects.

Every function is a no-op in a single process (no initialised process group), so the
same model, loss and evaluation code runs in a notebook, in a Ray Train worker and in the
endpoint. Why a module of its own: models (QACLN gathers videos), losses (gathered
negatives) and training (metrics, checkpoints) all need these, and none should import
another layer to get them.

The local-loss pattern (open_clip's ``gather_features``): each rank scores only its own
anchors against the gathered set, with the anchors' positions offset by the rank's start
in the global batch. A term returns ``sum over local anchors / N_global * world_size``
(``local_mean``), so the mean of the values over ranks is the single-process loss on the
concatenated batch, and after DDP averages gradients over ranks they equal the
single-process gradients.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sizes(n: int, device: torch.device) -> list[int]:
    world = world_info()[1]
    size = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` from every rank along dim 0 (local sizes may differ).

    Returns (gathered, offset of this rank's rows). Gradients flow back to the rank that
    owns each row (``torch.distributed.nn.functional.all_gather`` sums them there).
    """
    rank, world = world_info()
    if world == 1:
        return x, 0
    sizes = _sizes(x.shape[0], x.device)
    longest = max(sizes)
    padded = x
    if x.shape[0] < longest:
        padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))], dim=0)
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the autograd-aware gather
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0), sum(sizes[:rank])


@torch.no_grad()
def gather_rows(y: torch.Tensor) -> torch.Tensor:
    """Gather per-row data without gradient (labels, ids, key embeddings) the same way."""
    _, world = world_info()
    if world == 1:
        return y
    src = y.float() if y.dtype == torch.bool else y
    sizes = _sizes(src.shape[0], src.device)
    longest = max(sizes)
    if src.shape[0] < longest:
        src = torch.cat([src, src.new_zeros((longest - src.shape[0], *src.shape[1:]))], dim=0)
    parts = [torch.empty_like(src) for _ in range(world)]
    dist.all_gather(parts, src.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0).to(y.dtype)


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


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (returns ``t``)."""
    if world_info()[1] > 1:
        dist.all_reduce(t)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (a one-item list without a process group)."""
    _, world = world_info()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    _, world = world_info()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
