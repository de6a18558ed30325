"""Negative selection (counts, strategies, batch before bank) and the FIFO memory bank."""

import pytest
import torch

from xmr.losses.negatives import MemoryBank, NegativeSampler

pytestmark = pytest.mark.timeout(60)


def setup(n=10, m=30, classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    sim = torch.rand(n, m, generator=g) * 2 - 1
    labels = torch.randint(0, classes, (m,), generator=g)
    anchor_labels = torch.randint(0, classes, (n,), generator=g)
    allowed = anchor_labels[:, None] != labels[None, :]
    pos = torch.rand(n, generator=g) * 2 - 1
    return sim, allowed, labels, pos


def pick(strategy, k, sim, allowed, labels, pos, n_batch=None, seed=1):
    return NegativeSampler(k, strategy)(sim, allowed, n_batch=n_batch, labels=labels, pos_sim=pos,
                                        generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strategy", ["uniform", "hardest", "semi_hard"])
@pytest.mark.parametrize("k", [1, 3, 8, 1000])
def test_exact_counts_and_never_a_positive(strategy, k):
    sim, allowed, labels, pos = setup()
    mask = pick(strategy, k, sim, allowed, labels, pos)
    assert not (mask & ~allowed).any()
    assert torch.equal(mask.sum(dim=1), torch.clamp(allowed.sum(dim=1), max=k))


def test_hardest_is_the_true_top_k():
    sim, allowed, labels, pos = setup()
    mask = pick("hardest", 4, sim, allowed, labels, pos)
    for i in range(sim.shape[0]):
        cand = sim[i].masked_fill(~allowed[i], float("-inf"))
        assert set(mask[i].nonzero().flatten().tolist()) == set(cand.topk(4).indices.tolist())


@pytest.mark.parametrize("k", [1, 3, 16])
def test_class_aware_is_one_per_other_class_capped_at_k(k):
    """METHODS §2: one negative per other class present, capped at K: with K = 16 and 5
    other classes an anchor gets 5 negatives, not 16."""
    sim, allowed, labels, pos = setup(classes=6)
    mask = pick("class_aware", k, sim, allowed, labels, pos)
    for i in range(sim.shape[0]):
        chosen = mask[i].nonzero().flatten()
        classes = labels[chosen].tolist()
        n_other = labels[allowed[i]].unique().numel()
        assert len(classes) == len(set(classes)) == min(k, n_other)  # exactly one per class
        reps = {int(c): float(sim[i][allowed[i] & (labels == c)].max()) for c in labels[allowed[i]].unique()}
        for j in chosen.tolist():  # each chosen one is its class's hardest allowed candidate
            assert float(sim[i, j]) == reps[int(labels[j])]
        # capped at K: the K hardest representatives
        assert sorted(float(sim[i, j]) for j in chosen) == sorted(reps.values())[-len(chosen):]


def test_semi_hard_matches_facenet_rule():
    """K = 1: the most similar negative that is less similar than the positive; where none
    is, the least similar of those more similar (TensorFlow's triplet_semihard_loss)."""
    sim, allowed, labels, pos = setup(seed=3)
    mask = pick("semi_hard", 1, sim, allowed, labels, pos)
    for i in range(sim.shape[0]):
        cand = [(float(sim[i, j]), j) for j in range(sim.shape[1]) if allowed[i, j]]
        easier = [c for c in cand if c[0] < float(pos[i])]
        want = max(easier)[1] if easier else min(cand)[1]
        assert mask[i].nonzero().flatten().tolist() == [want]


@pytest.mark.parametrize("strategy", ["uniform", "hardest", "semi_hard", "class_aware"])
def test_batch_candidates_come_before_the_bank(strategy):
    """Columns [0, n_batch) are the batch: the bank only fills what the batch cannot."""
    sim, _, _, pos = setup(n=12, m=40, seed=2)
    labels = torch.arange(40)  # one class per column, so class_aware may take every candidate
    allowed = torch.rand(12, 40, generator=torch.Generator().manual_seed(3)) > 0.2
    n_batch = 16
    for k in (3, 30):
        mask = pick(strategy, k, sim, allowed, labels, pos, n_batch=n_batch)
        in_batch = allowed[:, :n_batch].sum(dim=1)
        got_batch = mask[:, :n_batch].sum(dim=1)
        assert torch.equal(got_batch, torch.clamp(in_batch, max=k))  # the batch is used up first
        assert torch.equal(mask[:, n_batch:].sum(dim=1), torch.clamp(mask.sum(dim=1) - got_batch, min=0))
        assert torch.equal(mask.sum(dim=1), torch.clamp(allowed.sum(dim=1), max=k))


def test_k_covering_every_candidate_returns_the_allowed_set_without_drawing():
    sim, allowed, labels, pos = setup()
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    mask = NegativeSampler(1000, "uniform")(sim, allowed, generator=g)
    assert mask is allowed and torch.equal(g.get_state(), state)


def test_uniform_is_seeded_and_spreads():
    sim, allowed, labels, pos = setup()
    m1, m2 = pick("uniform", 3, sim, allowed, labels, pos, seed=5), pick("uniform", 3, sim, allowed, labels, pos, seed=5)
    m3 = pick("uniform", 3, sim, allowed, labels, pos, seed=6)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)


def test_bad_arguments():
    sim, allowed, labels, _ = setup()
    with pytest.raises(ValueError, match="K must be >= 1"):
        NegativeSampler(0, "uniform")
    with pytest.raises(ValueError, match="must be one of"):
        NegativeSampler(2, "random")
    with pytest.raises(ValueError, match="pos_sim"):
        NegativeSampler(2, "semi_hard")(sim, allowed)
    with pytest.raises(ValueError, match="labels"):
        NegativeSampler(2, "class_aware")(sim, allowed)


def test_memory_bank_is_fifo_and_checkpointed():
    bank = MemoryBank(size=5, dim=2)
    assert bank.view() is None
    bank.enqueue(torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0]))
    view = bank.view()
    assert view.labels.tolist() == [0, 1, 2] and view.modality.tolist() == [0, 1, 0]
    bank.enqueue(torch.arange(8.0).reshape(4, 2) + 100, torch.tensor([3, 4, 5, 6]), torch.ones(4))
    view = bank.view()
    assert view.labels.tolist() == [2, 3, 4, 5, 6]  # the two oldest dropped, order kept
    assert view.emb[0].tolist() == [4.0, 5.0] and int(bank.writes) == 2
    again = MemoryBank(size=5, dim=2)
    again.load_state_dict(bank.state_dict())  # buffers are saved: a resumed run keeps its bank
    assert torch.equal(again.view().emb, view.emb) and int(again.writes) == 2


def test_memory_bank_holds_multi_hot_and_label_paths():
    multi = MemoryBank(size=4, dim=3, label_shape=(6,), label_dtype=torch.float32)
    rows = torch.zeros(2, 6)
    rows[0, [1, 4]] = 1
    multi.enqueue(torch.randn(2, 3), rows, torch.zeros(2))
    assert torch.equal(multi.view().labels, rows)
    paths = MemoryBank(size=4, dim=3, label_shape=(2,))
    paths.enqueue(torch.randn(3, 3), torch.tensor([[0, 1], [1, 3], [1, 2]]), torch.zeros(3))
    assert paths.view().labels.tolist() == [[0, 1], [1, 3], [1, 2]]
