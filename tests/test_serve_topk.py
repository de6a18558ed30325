"""The endpoint's exact top-k: the float16 pre-scan (one GEMV per query, or float16 blocks
widened to float32 for a batch) with its certificate gives exactly the float32 top-k, for
every batch size, and falls back to a float32 scan when near-ties leave it unproven."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xmr.tasks.topk import HALF_EPS, MARGIN, half_prescan_ok, half_scores, topk_scores

pytestmark = pytest.mark.timeout(120)


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture(scope="module")
def gallery():
    emb = unit(20_000, 64, seed=0)
    assert half_prescan_ok(emb)
    return emb, emb.half()


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 8, 13, 32])
def test_prescan_gives_the_exact_top_k(gallery, batch):
    emb, half = gallery
    q = unit(batch, 64, seed=batch)
    scores, idx = topk_scores(q, emb, half, 10)
    ref = (q @ emb.T).topk(10, dim=1)
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(scores, ref.values, rtol=0, atol=1e-6)
    # the pre-scan's scores stay inside the bound the certificate relies on
    assert (half_scores(q, half) - q @ emb.T).abs().max() <= HALF_EPS / 2


def test_near_ties_fall_back_to_the_float32_scan():
    """Items crowded around the query: float16 cannot order them, so the certificate fails
    and the exact float32 scan answers."""
    q = unit(1, 64, seed=1)
    crowd = F.normalize(q + 1e-3 * torch.randn(300, 64, generator=torch.Generator().manual_seed(2)), dim=-1)
    emb = torch.cat([unit(10_000, 64, seed=3), crowd])
    half = emb.half()
    exact = (q @ emb.T).topk(10, dim=1)
    prescan = half_scores(q, half).topk(10 + MARGIN, dim=1)
    assert prescan.values[0, -1] + 2 * HALF_EPS >= exact.values[0, -1]  # unproven: the fallback runs
    assert not torch.equal(prescan.indices[0, :10], exact.indices[0])  # and float16 alone would be wrong
    scores, idx = topk_scores(q, emb, half, 10)
    assert torch.equal(idx, exact.indices)
    torch.testing.assert_close(scores, exact.values, rtol=0, atol=0)
