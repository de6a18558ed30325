"""Ranking metrics for category retrieval and pair matching (METHODS.md, "Tasks and metrics").

Everything here takes a similarity matrix ``sim`` of shape [Q, G] (higher = more similar)
and works on numpy arrays (torch tensors are accepted and moved to the CPU). Work is
vectorised over the gallery; only the queries are processed in chunks, so a 20k x 20k
evaluation never materialises more than ``chunk_size`` x G sorted rows at once.

Ties are broken *pessimistically* everywhere: a relevant gallery item whose score equals
that of irrelevant items is ranked after all of them. A model that outputs constant
scores therefore gets the worst possible ranking instead of a lucky one.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np

LabelKind = Literal["single", "hierarchical", "multi"]
LABEL_KINDS: tuple[str, ...] = ("single", "hierarchical", "multi")
DEFAULT_CHUNK = 1024


def as_numpy(x: Any, name: str) -> np.ndarray:
    """Turn a numpy array, a torch tensor or a nested list into a numpy array.

    Torch is not imported here: anything with ``detach`` is treated as a tensor, so this
    module stays importable (and fast to import) without torch.
    """
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"{name}: expected a numeric array, got an object array")
    return arr


def _check_sim(sim: Any) -> np.ndarray:
    arr = as_numpy(sim, "sim")
    if arr.ndim != 2:
        raise ValueError(f"sim: expected a [Q, G] matrix, got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError("sim: the gallery is empty (G = 0)")
    if np.isnan(arr).any():
        raise ValueError("sim: contains NaN; rankings would be undefined")
    return arr


def _prepare_labels(labels: Any, kind: str, n: int, name: str) -> np.ndarray:
    """Reduce labels to what relevance needs: an int vector, or a bool multi-hot matrix."""
    if kind not in LABEL_KINDS:
        raise ValueError(f"label_kind: expected one of {LABEL_KINDS}, got {kind!r}")
    arr = as_numpy(labels, name)
    if arr.shape[:1] != (n,):
        raise ValueError(f"{name}: expected {n} rows to match sim, got shape {arr.shape}")
    if kind == "single":
        if arr.ndim != 1:
            raise ValueError(f"{name}: label_kind 'single' needs shape [N], got {arr.shape}")
        return arr
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"{name}: label_kind {kind!r} needs shape [N, L>0], got {arr.shape}")
    if kind == "hierarchical":
        return arr[:, -1]  # finest level decides relevance
    return arr > 0


def relevance(query_labels: np.ndarray, gallery_labels: np.ndarray, kind: str) -> np.ndarray:
    """Bool [q, G]: single/hierarchical = same (finest) label; multi = any shared label."""
    if kind == "multi":
        if query_labels.shape[1] != gallery_labels.shape[1]:
            raise ValueError(
                f"multi-hot labels: query has {query_labels.shape[1]} classes, "
                f"gallery has {gallery_labels.shape[1]}"
            )
        shared = query_labels.astype(np.float32) @ gallery_labels.astype(np.float32).T
        return shared > 0
    return query_labels[:, None] == gallery_labels[None, :]


def _sorted_relevance(sim: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """Relevance in ranked order, score descending, irrelevant-first within ties."""
    order = np.lexsort((rel.astype(np.int8), -sim), axis=-1)
    return np.take_along_axis(rel, order, axis=1)


def _chunks(n: int, chunk_size: int) -> range:
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    return range(0, n, chunk_size)


def _ranked_relevance_chunks(
    sim: Any, query_labels: Any, gallery_labels: Any, label_kind: str, chunk_size: int
):
    """Yield the ranked relevance matrix of each query chunk."""
    s = _check_sim(sim)
    q_lab = _prepare_labels(query_labels, label_kind, s.shape[0], "query_labels")
    g_lab = _prepare_labels(gallery_labels, label_kind, s.shape[1], "gallery_labels")
    for start in _chunks(s.shape[0], chunk_size):
        stop = start + chunk_size
        rel = relevance(q_lab[start:stop], g_lab, label_kind)
        yield _sorted_relevance(s[start:stop], rel)


def mean_average_precision(
    sim: Any,
    query_labels: Any,
    gallery_labels: Any,
    k: int | None = None,
    label_kind: LabelKind = "single",
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, Any]:
    """mAP@all (``k=None``) or mAP@k over the queries that have a relevant gallery item.

    AP@all = (1/n_rel) * sum_i P(i)*rel(i) over the whole ranking (scikit-learn's
    ``average_precision_score`` when scores have no ties). AP@k uses the common definition
    AP@k = (sum_{i<=k} P(i)*rel(i)) / min(k, n_rel), so a perfect top-k scores 1.
    Queries with no relevant gallery item are counted in ``n_no_relevant`` and excluded
    from the mean (``map`` is NaN when every query has none). Ties rank relevant items
    after irrelevant ones (pessimistic).

    Relevance: ``single`` = same int label; ``hierarchical`` ([N, L], coarse to fine) =
    same finest label (last column); ``multi`` (multi-hot [N, C]) = any shared label.
    """
    if k is not None and k < 1:
        raise ValueError(f"k: must be None (mAP@all) or >= 1, got {k}")
    ap_sum, n_valid, n_queries = 0.0, 0, 0
    for ranked in _ranked_relevance_chunks(sim, query_labels, gallery_labels, label_kind, chunk_size):
        n_queries += ranked.shape[0]
        depth = ranked.shape[1] if k is None else min(k, ranked.shape[1])
        hits = np.cumsum(ranked, axis=1, dtype=np.float64)
        n_rel = hits[:, -1]
        precision = hits[:, :depth] / np.arange(1, depth + 1)
        numer = (precision * ranked[:, :depth]).sum(axis=1)
        denom = n_rel if k is None else np.minimum(k, n_rel)
        has_rel = n_rel > 0
        ap_sum += float((numer[has_rel] / denom[has_rel]).sum())
        n_valid += int(has_rel.sum())
    return {
        "map": ap_sum / n_valid if n_valid else float("nan"),
        "k": k,
        "n_queries": n_queries,
        "n_no_relevant": n_queries - n_valid,
    }


def per_query_ap(
    sim: Any,
    query_labels: Any,
    gallery_labels: Any,
    label_kind: LabelKind = "single",
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """Per query: AP@all (NaN without a relevant item) and the 1-based rank of its first
    relevant gallery item (0 without one); the same ranking and ties as ``mean_average_precision``."""
    aps, firsts = [], []
    for ranked in _ranked_relevance_chunks(sim, query_labels, gallery_labels, label_kind, chunk_size):
        hits = np.cumsum(ranked, axis=1, dtype=np.float64)
        n_rel = hits[:, -1]
        precision = hits / np.arange(1, ranked.shape[1] + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            aps.append(np.where(n_rel > 0, (precision * ranked).sum(axis=1) / n_rel, np.nan))
        firsts.append(np.where(n_rel > 0, ranked.argmax(axis=1) + 1, 0))
    return np.concatenate(aps), np.concatenate(firsts)


def precision_at_k(
    sim: Any,
    query_labels: Any,
    gallery_labels: Any,
    ks: Sequence[int] = (1, 5, 10),
    label_kind: LabelKind = "single",
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, Any]:
    """P@k = (# relevant in the top k) / k, averaged like mAP (no-relevant queries excluded).

    The divisor is always k, also when the gallery is smaller than k. Keys ``p@{k}``,
    ``n_queries``, ``n_no_relevant``. Ties rank relevant items last (pessimistic).
    """
    ks = _check_ks(ks)
    sums = np.zeros(len(ks))
    n_valid, n_queries = 0, 0
    for ranked in _ranked_relevance_chunks(sim, query_labels, gallery_labels, label_kind, chunk_size):
        n_queries += ranked.shape[0]
        hits = np.cumsum(ranked, axis=1)
        has_rel = hits[:, -1] > 0
        depth = np.minimum(ks, ranked.shape[1]) - 1
        sums += (hits[has_rel][:, depth] / ks).sum(axis=0)
        n_valid += int(has_rel.sum())
    out: dict[str, Any] = {
        f"p@{k}": float(s / n_valid) if n_valid else float("nan") for k, s in zip(ks, sums)
    }
    out.update(n_queries=n_queries, n_no_relevant=n_queries - n_valid)
    return out


def _check_ks(ks: Sequence[int]) -> np.ndarray:
    arr = np.asarray(list(ks), dtype=np.int64)
    if arr.ndim != 1 or arr.size == 0 or (arr < 1).any():
        raise ValueError(f"ks: expected a non-empty list of ints >= 1, got {list(ks)}")
    return arr


def recall_at_k(
    sim: Any, gt_index: Any, ks: Sequence[int] = (1, 5, 10), chunk_size: int = DEFAULT_CHUNK
) -> dict[str, Any]:
    """Recall@k, median and mean rank when query q's only relevant item is ``gt_index[q]``.

    The 1-based rank counts every gallery item scoring >= the ground truth (the ground
    truth included), so ties rank it last (pessimistic): constant scores give rank G.
    Keys ``r@{k}`` (fractions), ``median_rank``, ``mean_rank``, ``n_queries``.
    """
    s = _check_sim(sim)
    ks_arr = _check_ks(ks)
    gt = as_numpy(gt_index, "gt_index").astype(np.int64, copy=False)
    if gt.shape != (s.shape[0],):
        raise ValueError(f"gt_index: expected shape ({s.shape[0]},), got {gt.shape}")
    bad = np.flatnonzero((gt < 0) | (gt >= s.shape[1]))
    if bad.size:
        raise ValueError(
            f"gt_index: query {bad[0]} points at gallery item {gt[bad[0]]}, outside [0, {s.shape[1]})"
        )
    ranks = np.empty(s.shape[0], dtype=np.int64)
    for start in _chunks(s.shape[0], chunk_size):
        block = s[start : start + chunk_size]
        rows = np.arange(block.shape[0])
        target = block[rows, gt[start : start + chunk_size]]
        ranks[start : start + chunk_size] = (block >= target[:, None]).sum(axis=1)
    out: dict[str, Any] = {f"r@{k}": float((ranks <= k).mean()) for k in ks_arr}
    out.update(
        median_rank=float(np.median(ranks)),
        mean_rank=float(ranks.mean()),
        n_queries=int(s.shape[0]),
    )
    return out


def pair_recall_at_k(
    sim: Any, ks: Sequence[int] = (1, 5, 10), chunk_size: int = DEFAULT_CHUNK
) -> dict[str, Any]:
    """Pair matching: query i's only relevant gallery item is item i (see ``recall_at_k``)."""
    s = _check_sim(sim)
    if s.shape[0] > s.shape[1]:
        raise ValueError(
            f"sim: pair matching needs Q <= G (query i matches gallery item i), got shape {s.shape}"
        )
    return recall_at_k(s, np.arange(s.shape[0]), ks, chunk_size)


def cosine_similarity(emb_a: Any, emb_b: Any) -> np.ndarray:
    """[Na, Nb] cosine similarity; rows are L2-normalised first (zero rows stay zero)."""
    a = as_numpy(emb_a, "emb_a").astype(np.float32, copy=False)
    b = as_numpy(emb_b, "emb_b").astype(np.float32, copy=False)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"emb_a/emb_b: expected [N, d] with equal d, got {a.shape} and {b.shape}")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def cross_modal_map(
    emb_a: Any,
    emb_b: Any,
    labels_a: Any,
    labels_b: Any,
    k: int | None = None,
    label_kind: LabelKind = "single",
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, Any]:
    """mAP in both directions (A->B, B->A) and their mean, on cosine similarity.

    Keys ``a2b``, ``b2a``, ``mean`` and ``a2b_n_no_relevant``, ``b2a_n_no_relevant``.
    """
    sim = cosine_similarity(emb_a, emb_b)
    a2b = mean_average_precision(sim, labels_a, labels_b, k, label_kind, chunk_size)
    b2a = mean_average_precision(sim.T, labels_b, labels_a, k, label_kind, chunk_size)
    return {
        "a2b": a2b["map"],
        "b2a": b2a["map"],
        "mean": (a2b["map"] + b2a["map"]) / 2,
        "a2b_n_no_relevant": a2b["n_no_relevant"],
        "b2a_n_no_relevant": b2a["n_no_relevant"],
    }
