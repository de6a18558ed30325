"""Negative selection (counts, strategies) and the FIFO memory bank."""

import pytest
import torch

from losses_helpers import embeddings, make_cfg, unit
from xmr.losses.negatives import MemoryBank, select_negatives
from xmr.losses.registry import get_term

pytestmark = pytest.mark.timeout(60)


def setup(n=10, m=30, classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    sim = torch.rand(n, m, generator=g) * 2 - 1
    labels = torch.randint(0, classes, (m,), generator=g)
    anchor_labels = torch.randint(0, classes, (n,), generator=g)
    allowed = anchor_labels[:, None] != labels[None, :]
    return sim, allowed, labels


@pytest.mark.parametrize("strategy", ["uniform", "hardest", "class_aware"])
@pytest.mark.parametrize("k", [1, 3, 8, 1000])
def test_exact_counts_and_never_a_positive(strategy, k):
    sim, allowed, labels = setup()
    mask = select_negatives(sim, allowed, k, strategy, candidate_labels=labels,
                            generator=torch.Generator().manual_seed(1))
    assert not (mask & ~allowed).any()
    assert torch.equal(mask.sum(dim=1), torch.clamp(allowed.sum(dim=1), max=k))


def test_hardest_is_the_true_top_k():
    sim, allowed, _ = setup()
    mask = select_negatives(sim, allowed, 4, "hardest")
    for i in range(sim.shape[0]):
        cand = sim[i].masked_fill(~allowed[i], float("-inf"))
        assert set(mask[i].nonzero().flatten().tolist()) == set(cand.topk(4).indices.tolist())


def test_class_aware_takes_the_hardest_of_each_other_class_first():
    sim, allowed, labels = setup(classes=6)
    mask = select_negatives(sim, allowed, 3, "class_aware", candidate_labels=labels)
    for i in range(sim.shape[0]):
        chosen = mask[i].nonzero().flatten()
        classes = labels[chosen].tolist()
        n_other = labels[allowed[i]].unique().numel()
        assert len(set(classes)) == min(3, n_other)  # one per class while classes last
        for j in chosen.tolist():  # each chosen one is its class's hardest allowed candidate
            same = allowed[i] & (labels == labels[j])
            assert sim[i, j] == sim[i][same].max()


def test_uniform_is_seeded_and_spreads():
    sim, allowed, _ = setup()
    m1 = select_negatives(sim, allowed, 3, "uniform", generator=torch.Generator().manual_seed(5))
    m2 = select_negatives(sim, allowed, 3, "uniform", generator=torch.Generator().manual_seed(5))
    m3 = select_negatives(sim, allowed, 3, "uniform", generator=torch.Generator().manual_seed(6))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)


def test_bad_arguments():
    sim, allowed, _ = setup()
    with pytest.raises(ValueError, match="K must be >= 1"):
        select_negatives(sim, allowed, 0, "uniform")
    with pytest.raises(ValueError, match="must be one of"):
        select_negatives(sim, allowed, 2, "random")


def test_memory_bank_is_fifo():
    bank = MemoryBank(size=5, dim=2)
    bank.enqueue(torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 2]))
    emb, lab = bank.get()
    assert lab.flatten().tolist() == [0, 1, 2]
    bank.enqueue(torch.arange(8.0).reshape(4, 2) + 100, torch.tensor([3, 4, 5, 6]))
    emb, lab = bank.get()
    assert lab.flatten().tolist() == [2, 3, 4, 5, 6]  # the two oldest dropped, order kept
    assert emb[0].tolist() == [4.0, 5.0]


def test_multineg_draws_from_the_bank_when_k_exceeds_the_batch():
    a, b, y = embeddings(n=4, classes=4, seed=3)
    a, b = unit(a), unit(b)
    cfg = make_cfg(k=64, lambdas={"multineg": 1.0})
    cfg.negatives.memory_bank = 32
    term = get_term("multineg")(cfg)
    first = term({"emb_a": a, "emb_b": b}, {"label": y})  # bank empty: 2*4 candidates only
    a2, b2, y2 = embeddings(n=4, classes=4, seed=4)
    term({"emb_a": unit(a2), "emb_b": unit(b2)}, {"label": y2})  # fills the bank
    again = term({"emb_a": a, "emb_b": b}, {"label": y})
    assert int(term.bank.filled) == 24  # every call enqueues its 2 x 4 embeddings
    assert again.item() > first.item()  # more negatives in every denominator
