"""The per-epoch read plan: which shard ranges each (rank, loader worker) reads and how
its stream is cut into batches.

A pure function of the manifest's per-shard counts, seed, epoch, world size, rank and
loader workers, so every process computes the same plan with no communication. Two modes:

- ``shard``: the epoch's shuffled shard sequence is cut into contiguous unit ranges, one per
  rank (sizes differing by at most one), and each rank's range into exactly S batches
  (S = max over ranks of ceil(N_rank / local_batch)), so every rank takes the same number
  of optimiser steps (DDP needs that), all batch sizes differ by at most one, and every
  unit is read exactly once. Rank batch j is produced by loader worker ``j % W`` (the order
  in which ``DataLoader`` polls its workers), and each worker reads a contiguous sub-range.
  A shard on a rank or worker boundary is opened by both readers, each keeping its own
  positions, which costs at most one extra partial shard read per boundary and balances
  exactly whatever the shard sizes.
- ``sample``: every reader streams every shard in one seeded global order; the stream is
  cut into global batches of ``local_batch * world_size`` (near-equal sizes) and each rank
  keeps its slice of each global batch. The global batch sequence is then independent of
  the world size and the number of workers (slower: every reader reads everything).

Plans count *units*: samples, or queries for vcmr with ``unit="query"``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


class PlanError(ValueError):
    """The split cannot be divided as asked (too few shards or samples for the ranks)."""


@dataclass(frozen=True)
class ShardJob:
    """Read units ``[lo, hi)`` of manifest shard ``shard`` (which holds ``total`` units)."""

    shard: int
    lo: int
    hi: int
    total: int


@dataclass(frozen=True)
class Chunk:
    """Take the next ``size`` units of the stream; yield units ``[keep_lo, keep_hi)`` of them
    as one batch, or nothing when ``keep_lo == keep_hi`` (a batch for another worker)."""

    size: int
    keep_lo: int
    keep_hi: int


@dataclass
class WorkerPlan:
    jobs: list[ShardJob] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    shuffle_seed: str | None = None

    @property
    def num_batches(self) -> int:
        return sum(1 for c in self.chunks if c.keep_hi > c.keep_lo)


@dataclass
class RankPlan:
    steps: int
    rank_units: int
    total_units: int
    workers: list[WorkerPlan]


def near_equal(n: int, parts: int) -> list[int]:
    """``n`` split into ``parts`` sizes differing by at most one, larger first."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def shard_order(counts: list[int], seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Shard indices (empty shards dropped) in this epoch's order."""
    order = [i for i, c in enumerate(counts) if c > 0]
    if shuffle:
        random.Random(f"xmr-shards:{seed}:{epoch}").shuffle(order)
    return order


def _ranges_to_jobs(shards: list[int], counts: list[int], start: int, stop: int) -> list[ShardJob]:
    """Jobs covering units ``[start, stop)`` of the concatenation of ``shards``."""
    jobs, pos = [], 0
    for s in shards:
        lo, hi = max(start, pos), min(stop, pos + counts[s])
        if lo < hi:
            jobs.append(ShardJob(shard=s, lo=lo - pos, hi=hi - pos, total=counts[s]))
        pos += counts[s]
    return jobs


def _context(split: str, counts: list[int], world_size: int, num_workers: int) -> str:
    return (f"split {split!r}: {sum(1 for c in counts if c)} non-empty shard(s), {sum(counts)} unit(s), "
            f"world_size={world_size}, num_workers={num_workers}")


def make_plan(counts: list[int], *, split: str, local_batch_size: int, rank: int = 0, world_size: int = 1,
              num_workers: int = 0, seed: int = 0, epoch: int = 0, shuffle: bool = True,
              mode: str = "shard") -> RankPlan:
    """The plan for one rank; see the module docstring for the two modes."""
    if local_batch_size < 1:
        raise PlanError(f"local_batch_size must be >= 1, got {local_batch_size}")
    if not 0 <= rank < world_size:
        raise PlanError(f"rank {rank} is not in [0, world_size={world_size})")
    if mode not in ("shard", "sample"):
        raise PlanError(f"mode must be 'shard' or 'sample', got {mode!r}")
    n_workers = max(1, num_workers)
    ctx = _context(split, counts, world_size, num_workers)
    order = shard_order(counts, seed, epoch, shuffle)
    total = sum(counts)
    if total == 0:
        raise PlanError(f"{ctx}: nothing to read")
    if mode == "shard":
        return _shard_plan(counts, order, ctx, local_batch_size, rank, world_size, n_workers, seed, epoch, shuffle)
    return _sample_plan(counts, order, ctx, local_batch_size, rank, world_size, n_workers, seed, epoch, shuffle)


def _shard_plan(counts: list[int], order: list[int], ctx: str, batch: int, rank: int, world_size: int,
                n_workers: int, seed: int, epoch: int, shuffle: bool) -> RankPlan:
    total = sum(counts)
    n_rank = near_equal(total, world_size)
    steps = math.ceil(n_rank[0] / batch)
    short = [r for r, n in enumerate(n_rank) if n < steps]
    if short:
        raise PlanError(f"{ctx}: rank(s) {short} get {[n_rank[r] for r in short]} unit(s), fewer than the "
                        f"{steps} steps every rank must take (local_batch_size={batch})")
    sizes = near_equal(n_rank[rank], steps)
    workers, start = [], sum(n_rank[:rank])
    for w in range(n_workers):
        mine = sizes[w::n_workers]
        stop = start + sum(mine)
        seed_w = f"xmr-samples:{seed}:{epoch}:{rank}:{w}" if shuffle else None
        workers.append(WorkerPlan(jobs=_ranges_to_jobs(order, counts, start, stop),
                                  chunks=[Chunk(s, 0, s) for s in mine], shuffle_seed=seed_w))
        start = stop
    return RankPlan(steps=steps, rank_units=n_rank[rank], total_units=total, workers=workers)


def _sample_plan(counts: list[int], order: list[int], ctx: str, batch: int, rank: int, world_size: int,
                 n_workers: int, seed: int, epoch: int, shuffle: bool) -> RankPlan:
    total = sum(counts)
    steps = math.ceil(total / (batch * world_size))
    global_sizes = near_equal(total, steps)
    if global_sizes[-1] < world_size:
        raise PlanError(f"{ctx}: global batches of {global_sizes[-1]} unit(s) cannot give each of "
                        f"{world_size} ranks a sample (local_batch_size={batch})")
    jobs = [ShardJob(shard=s, lo=0, hi=counts[s], total=counts[s]) for s in order]
    seed_all = f"xmr-samples:{seed}:{epoch}" if shuffle else None
    workers = [WorkerPlan(jobs=jobs, shuffle_seed=seed_all) for _ in range(n_workers)]
    rank_units = 0
    for j, g in enumerate(global_sizes):
        parts = near_equal(g, world_size)
        lo = sum(parts[:rank])
        rank_units += parts[rank]
        for w, plan in enumerate(workers):
            keep = (lo, lo + parts[rank]) if j % n_workers == w else (0, 0)
            plan.chunks.append(Chunk(g, *keep))
    return RankPlan(steps=steps, rank_units=rank_units, total_units=total, workers=workers)
