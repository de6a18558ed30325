"""mAP, precision@k and pair recall: against scikit-learn and hand-worked rankings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from xmr.metrics.retrieval import (
    cross_modal_map,
    mean_average_precision,
    pair_recall_at_k,
    precision_at_k,
    recall_at_k,
)

pytestmark = pytest.mark.timeout(60)


def _sklearn_map(sim: np.ndarray, rel: np.ndarray) -> tuple[float, int]:
    aps = [average_precision_score(r, s) for s, r in zip(sim, rel) if r.any()]
    return float(np.mean(aps)), int((~rel.any(axis=1)).sum())


@pytest.mark.parametrize("chunk_size", [1024, 7])
def test_map_single_label_matches_sklearn(chunk_size: int) -> None:
    rng = np.random.default_rng(0)
    sim = rng.standard_normal((40, 60))
    q_lab, g_lab = rng.integers(0, 6, 40), rng.integers(0, 6, 60)
    g_lab[g_lab == 5] = 4  # class 5 has no gallery item: its queries have nothing relevant
    expected, n_none = _sklearn_map(sim, q_lab[:, None] == g_lab[None, :])
    got = mean_average_precision(sim, q_lab, g_lab, chunk_size=chunk_size)
    assert n_none > 0
    assert got["map"] == pytest.approx(expected, abs=1e-12)
    assert (got["n_queries"], got["n_no_relevant"]) == (40, n_none)


def test_map_multi_label_matches_sklearn() -> None:
    rng = np.random.default_rng(1)
    sim = torch.from_numpy(rng.standard_normal((30, 50)))  # tensors are accepted too
    q_hot = rng.random((30, 8)) < 0.2
    g_hot = rng.random((50, 8)) < 0.2
    q_hot[0] = False  # a query with no label: nothing relevant
    expected, n_none = _sklearn_map(sim.numpy(), (q_hot.astype(int) @ g_hot.T.astype(int)) > 0)
    got = mean_average_precision(sim, q_hot.astype(np.float32), g_hot.astype(np.float32), label_kind="multi")
    assert got["map"] == pytest.approx(expected, abs=1e-12)
    assert got["n_no_relevant"] == n_none >= 1


def test_map_hierarchical_uses_finest_level() -> None:
    rng = np.random.default_rng(2)
    sim = rng.standard_normal((25, 45))
    fine_q, fine_g = rng.integers(0, 9, 25), rng.integers(0, 9, 45)
    q_lab = np.stack([fine_q // 3, fine_q], axis=1)
    g_lab = np.stack([fine_g // 3, fine_g], axis=1)
    expected, _ = _sklearn_map(sim, fine_q[:, None] == fine_g[None, :])
    got = mean_average_precision(sim, q_lab, g_lab, label_kind="hierarchical")
    coarse = mean_average_precision(sim, q_lab[:, 0], g_lab[:, 0])
    assert got["map"] == pytest.approx(expected, abs=1e-12)
    assert coarse["map"] != pytest.approx(got["map"])


def test_map_at_k_and_precision_hand_worked() -> None:
    # Ranking (by score): rel, irr, rel, irr, rel ; 4 relevant items in total (one last).
    sim = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.1]])
    gallery = np.array([1, 0, 1, 0, 1, 1])
    # AP@3 = (1/1 + 2/3) / min(3, 4) ; AP@5 = (1 + 2/3 + 3/5) / 4
    assert mean_average_precision(sim, [1], gallery, k=3)["map"] == pytest.approx((1 + 2 / 3) / 3)
    assert mean_average_precision(sim, [1], gallery, k=5)["map"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)
    assert mean_average_precision(sim, [1], gallery)["map"] == pytest.approx((1 + 2 / 3 + 3 / 5 + 4 / 6) / 4)
    p = precision_at_k(sim, [1], gallery, ks=(1, 2, 3, 10))
    assert (p["p@1"], p["p@2"], p["p@3"]) == pytest.approx((1.0, 0.5, 2 / 3))
    assert p["p@10"] == pytest.approx(4 / 10)  # divisor stays k beyond the gallery size


def test_ties_rank_relevant_items_last() -> None:
    sim = np.zeros((2, 4))  # constant scores: every relevant item goes behind the irrelevant
    q_lab, g_lab = np.array([0, 1]), np.array([0, 1, 1, 1])
    got = mean_average_precision(sim, q_lab, g_lab)
    assert got["map"] == pytest.approx(((1 / 4) + (1 / 2 + 2 / 3 + 3 / 4) / 3) / 2)
    assert precision_at_k(sim, q_lab, g_lab, ks=(1,))["p@1"] == 0.0
    tied = pair_recall_at_k(np.ones((5, 5)))
    assert (tied["r@1"], tied["r@5"], tied["median_rank"]) == (0.0, 1.0, 5.0)


def test_no_relevant_queries_are_counted_and_excluded() -> None:
    sim = np.array([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8]])
    got = mean_average_precision(sim, [0, 7, 1], [0, 1])
    assert got["map"] == pytest.approx(1.0)
    assert (got["n_queries"], got["n_no_relevant"]) == (3, 1)
    none = mean_average_precision(sim, [5, 6, 7], [0, 1])
    assert np.isnan(none["map"]) and none["n_no_relevant"] == 3


def test_pair_recall_ranks() -> None:
    sim = np.array([
        [0.9, 0.1, 0.2, 0.3],  # rank 1
        [0.5, 0.4, 0.6, 0.1],  # rank 3
        [0.1, 0.2, 0.3, 0.3],  # tie with item 3: rank 2 (pessimistic)
    ])
    got = pair_recall_at_k(sim, ks=(1, 2, 5))
    assert (got["r@1"], got["r@2"], got["r@5"]) == pytest.approx((1 / 3, 2 / 3, 1.0))
    assert (got["median_rank"], got["mean_rank"]) == (2.0, 2.0)
    explicit = recall_at_k(sim, gt_index=[3, 0, 1], ks=(1,), chunk_size=2)  # ranks 2, 2, 3
    assert explicit["r@1"] == 0.0
    assert (explicit["median_rank"], explicit["mean_rank"]) == pytest.approx((2.0, 7 / 3))


def test_cross_modal_map_both_directions() -> None:
    rng = np.random.default_rng(3)
    emb_a = rng.standard_normal((20, 8))
    emb_b = 3 * rng.standard_normal((30, 8))  # scale must not matter (cosine)
    lab_a, lab_b = rng.integers(0, 4, 20), rng.integers(0, 4, 30)
    got = cross_modal_map(emb_a, emb_b, lab_a, lab_b)
    na = emb_a / np.linalg.norm(emb_a, axis=1, keepdims=True)
    nb = emb_b / np.linalg.norm(emb_b, axis=1, keepdims=True)
    sim = na @ nb.T
    a2b, _ = _sklearn_map(sim, lab_a[:, None] == lab_b[None, :])
    b2a, _ = _sklearn_map(sim.T, lab_b[:, None] == lab_a[None, :])
    assert (got["a2b"], got["b2a"]) == pytest.approx((a2b, b2a), abs=1e-5)
    assert got["mean"] == pytest.approx((a2b + b2a) / 2, abs=1e-5)


def test_errors_name_the_offending_input() -> None:
    with pytest.raises(ValueError, match="query_labels"):
        mean_average_precision(np.zeros((2, 3)), [0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="label_kind"):
        mean_average_precision(np.zeros((1, 3)), [0], [0, 1, 2], label_kind="fuzzy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        pair_recall_at_k(np.array([[np.nan]]))
    with pytest.raises(ValueError, match="gt_index"):
        recall_at_k(np.zeros((1, 3)), [3])
