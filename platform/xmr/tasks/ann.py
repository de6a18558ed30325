"""Approximate nearest-neighbour indexes for large served galleries (FAISS), with their
search parameter chosen by measurement.

A served gallery holds unit embeddings, so inner product is cosine. Past a few hundred
thousand items an exact scan per query costs milliseconds of a replica's single thread;
an approximate index answers in a fraction of that at a recall the operator sets.

Three kinds (``AnnConfig.kind``):

- ``hnsw``: a graph (FAISS ``IndexHNSWFlat``): the full vectors plus ``hnsw_m`` x 2 links
  per item; no training; the search breadth ``efSearch`` trades recall for time.
- ``ivfpq``: an inverted file over product-quantised codes, re-ranked exactly (FAISS
  ``IVF{nlist},PQ{pq_m}x8,RFlat``): ``nprobe`` lists visited, ``k_factor`` x k candidates
  re-ranked with the full vectors (which it keeps, so it saves search time, not memory).
- ``ivf``: an inverted file over the full vectors (``IVF{nlist},Flat``): ``nprobe``.

The build measures rather than guesses: it takes probe queries (the other modality's
embeddings: what real queries look like), computes their exact top 10, and walks the
kind's search settings from cheapest up, keeping the first whose recall@10 on half of the
probes reaches ``recall_target``. The recall it reports is measured on the other half,
so the figure is not the one the setting was chosen on. If no setting reaches the target
the most thorough one is kept and ``met_target`` is False (``xmr index build`` says so).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

KINDS = ("hnsw", "ivfpq", "ivf")


@dataclass
class AnnConfig:
    """How to build an approximate index (the defaults are the measured choice at 1M items:
    bench/serve_latency.py's ``million`` section builds both kinds and keeps the faster at
    recall@10 0.95; on 2026-12-07 ivfpq: 0.14 ms, 1,068 B/item, built in 206 s, against
    hnsw's 0.22 ms, 1,296 B/item, 327 s; on 11-23 it had kept hnsw)."""

    kind: str = "ivfpq"
    recall_target: float = 0.95  # recall@10 against exact search, on held-out probe queries
    hnsw_m: int = 32  # links per item and layer (memory: ~2 x m x 4 bytes per item)
    hnsw_ef_construction: int = 64  # build breadth: graph quality vs build time
    ivf_nlist: int = 0  # inverted lists; 0: 4 x sqrt(n)
    pq_m: int = 0  # ivfpq: sub-quantisers (bytes per item in the codes), dividing d; 0: the largest divisor of d up to 32
    probes: int = 2000  # probe queries (half choose the setting, half measure recall)
    build_threads: int = 0  # 0: every core (the build runs once, off the serving path)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ann.kind = {self.kind!r}: use one of {', '.join(KINDS)}")
        if not 0.0 < self.recall_target <= 1.0:
            raise ValueError(f"ann.recall_target = {self.recall_target}: a recall in (0, 1]")
        for name in ("hnsw_m", "hnsw_ef_construction", "probes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ann.{name} = {getattr(self, name)}: must be at least 1")
        for name in ("ivf_nlist", "build_threads", "pq_m"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"ann.{name} = {getattr(self, name)}: 0 (automatic) or a positive count")


@dataclass
class AnnIndex:
    """A built index, the search setting chosen for it and what was measured."""

    index: Any  # a faiss.Index over the gallery side
    kind: str
    search_params: dict[str, int]  # the chosen setting (efSearch / nprobe / k_factor)
    recall_at_10: float  # on held-out probe queries, against exact search
    met_target: bool
    build_s: float  # building and calibrating
    bytes_per_item: float  # the serialised index's size over the item count
    build: dict[str, Any] = field(default_factory=dict)  # the AnnConfig it was built with, and nlist

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def vectors(self) -> np.ndarray | None:
        """The full vectors this index keeps for itself, in the order they were added (the
        gallery's), as a view of the index's own memory: ivfpq's exact re-ranking copy and
        HNSW's storage. None for ivf, which keeps them by inverted list.

        Why: a served gallery would otherwise hold its table twice (once as the gallery's
        tensor, once inside FAISS): at a million 256-d items per side that is 2 GB a shard.
        The array's base holds this index, so the memory stays valid while any array or
        tensor made from it lives."""
        import faiss

        outer = faiss.downcast_index(self.index)
        inner = getattr(outer, "refine_index", None) or getattr(outer, "storage", None)
        flat = faiss.downcast_index(inner) if inner is not None else None
        if not isinstance(flat, faiss.IndexFlat) or flat.ntotal != self.index.ntotal or flat.ntotal == 0:
            return None
        return np.asarray(_IndexMemory(self.index, flat.get_xb(), flat.ntotal, flat.d))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "search_params": self.search_params, "recall_at_10": self.recall_at_10,
                "met_target": self.met_target, "build_s": self.build_s, "bytes_per_item": self.bytes_per_item,
                "build": self.build}

    def save(self, index_file: str) -> dict[str, Any]:
        import faiss

        faiss.write_index(self.index, index_file)
        return self.describe()

    @classmethod
    def load(cls, index_file: str, meta: dict[str, Any] | None) -> "AnnIndex":
        """Read a saved index; ``meta`` is what ``save`` returned (None: an index written
        before the setting was recorded, searched as IVF with nprobe 32)."""
        import faiss

        index = faiss.read_index(index_file)
        meta = meta or {"kind": "ivf", "search_params": {"nprobe": 32}, "recall_at_10": math.nan,
                        "met_target": False, "build_s": math.nan, "bytes_per_item": math.nan}
        apply_search_params(index, meta["search_params"])
        return cls(index, meta["kind"], dict(meta["search_params"]), meta["recall_at_10"], meta["met_target"],
                   meta["build_s"], meta["bytes_per_item"], dict(meta.get("build", {})))


class _IndexMemory:
    """The float32 [n, d] block a FAISS index owns, exposed through the array interface with
    the index as a reference: an array viewing it (and a tensor from that array) keeps the
    index, and so the block, alive."""

    def __init__(self, index, pointer, n: int, d: int) -> None:
        self.index = index
        address = int(pointer)  # a SWIG float* converts to its address
        self.__array_interface__ = {"shape": (n, d), "typestr": "<f4", "data": (address, False), "version": 3}


def default_pq_m(d: int) -> int:
    """IVF-PQ's sub-quantisers when ``ann.pq_m`` is 0: 32 one-byte codes an item at d = 256
    (the measured setting), and for another d its largest divisor up to 32 (any d builds)."""
    return max(m for m in range(1, min(32, d) + 1) if d % m == 0)


def apply_search_params(index, params: dict[str, int]) -> None:
    import faiss

    for name, value in params.items():
        if name == "efSearch":
            faiss.downcast_index(index).hnsw.efSearch = int(value)
        elif name == "nprobe":
            faiss.extract_index_ivf(index).nprobe = int(value)
        elif name == "k_factor":  # the exact re-ranking wrapper (RFlat)
            faiss.downcast_index(index).k_factor = float(value)
        else:
            raise ValueError(f"unknown search parameter {name!r} (efSearch, nprobe, k_factor)")


def _settings(kind: str, nlist: int) -> list[dict[str, int]]:
    """Search settings from cheapest to most thorough."""
    if kind == "hnsw":
        return [{"efSearch": e} for e in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)]
    probes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if p <= nlist] or [nlist]
    if kind == "ivf":
        return [{"nprobe": p} for p in probes]
    return [{"nprobe": p, "k_factor": f} for p in probes for f in (4, 16, 64)]


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact top 10 that the approximate top 10 also holds."""
    return float(np.mean([len(set(e.tolist()) & set(f.tolist())) / exact.shape[1] for e, f in zip(exact, found)]))


def exact_top10(gallery: np.ndarray, queries: np.ndarray, chunk: int = 262_144) -> np.ndarray:
    """Exact inner-product top 10 of each query, scanning the gallery in chunks (no [q, n]
    score matrix at a million items)."""
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    best_s = torch.full((len(q), 10), -math.inf)
    best_i = torch.zeros((len(q), 10), dtype=torch.long)
    for lo in range(0, len(gallery), chunk):
        g = torch.from_numpy(np.ascontiguousarray(gallery[lo:lo + chunk], dtype=np.float32))
        s, i = (q @ g.T).topk(min(10, len(g)), dim=1)
        s, pick = torch.cat([best_s, s], 1).topk(10, dim=1)
        best_s, best_i = s, torch.cat([best_i, i + lo], 1).gather(1, pick)
    return best_i.numpy()


def build_ann(gallery: np.ndarray, probes: np.ndarray, cfg: AnnConfig | None = None) -> AnnIndex:
    """Build ``cfg.kind`` over ``gallery`` [n, d] (unit rows) and choose its search setting on
    ``probes`` [m, d] (queries of the kind it will serve)."""
    import faiss

    cfg = cfg or AnnConfig()
    x = np.ascontiguousarray(gallery, dtype=np.float32)
    n, d = x.shape
    pq_m = cfg.pq_m or default_pq_m(d)
    if cfg.kind == "ivfpq" and d % pq_m:
        raise ValueError(f"ann.pq_m = {pq_m} must divide the embedding size {d}")
    threads_before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(cfg.build_threads or os.cpu_count() or 1)
    t0 = time.perf_counter()
    try:
        nlist = max(1, min(cfg.ivf_nlist or int(4 * math.sqrt(n)), n // 39 or 1))  # FAISS wants >= 39 points a list
        if cfg.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = cfg.hnsw_ef_construction
        else:
            bits = 8 if n >= 256 * 39 else max(4, int(math.log2(max(16, n // 39))))  # 2^bits codes need 39x points
            bits = max(1, min(bits, int(math.log2(max(2, n)))))  # and never more codes than items (a tiny gallery)
            spec = f"IVF{nlist},PQ{pq_m}x{bits},RFlat" if cfg.kind == "ivfpq" else f"IVF{nlist},Flat"
            index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
            sample = np.random.default_rng(0).choice(n, min(n, max(64 * nlist, 10_000)), replace=False)
            index.train(x[np.sort(sample)])
        index.add(x)
        p = np.ascontiguousarray(probes[: cfg.probes], dtype=np.float32)
        exact = exact_top10(x, p)
        half = max(1, len(p) // 2)
        (cal_q, cal_e), (held_q, held_e) = (p[:half], exact[:half]), (p[half:] if len(p) > 1 else p,
                                                                        exact[half:] if len(p) > 1 else exact)
        chosen, met = None, False
        for setting in _settings(cfg.kind, nlist):
            apply_search_params(index, setting)
            chosen = setting
            if recall_at_10(index.search(cal_q, 10)[1], cal_e) >= cfg.recall_target:
                met = True
                break
        held = recall_at_10(index.search(held_q, 10)[1], held_e)
        build_s = time.perf_counter() - t0
    finally:
        faiss.omp_set_num_threads(threads_before)
    size = int(faiss.serialize_index(index).size)
    return AnnIndex(index, cfg.kind, dict(chosen or {}), held, met and held >= cfg.recall_target,
                    round(build_s, 2), size / n, {**asdict(cfg), "nlist": nlist if cfg.kind != "hnsw" else None,
                                               "pq_m": pq_m if cfg.kind == "ivfpq" else cfg.pq_m})
