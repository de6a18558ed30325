"""Loss terms against pytorch-metric-learning and explicit formulas: values and gradients."""

import pytest
import torch
from pytorch_metric_learning import distances, losses, reducers

from losses_helpers import embeddings, make_cfg, unit
from xmr.losses.registry import get_term

pytestmark = pytest.mark.timeout(60)


def grads(value, *tensors):
    return torch.autograd.grad(value, tensors)


def test_supcon_matches_pml_supconloss():
    a, b, y = embeddings(n=16)
    ours = get_term("supcon")(make_cfg(temperature=0.07))({"emb_a": unit(a), "emb_b": unit(b)}, {"label": y})
    # Union of both modalities; ref_labels is labels, so PML drops self-pairs as SupCon needs.
    emb, lab = torch.cat([a, b]), torch.cat([y, y])
    ref = losses.SupConLoss(temperature=0.07)(emb, lab)
    assert torch.allclose(ours, ref, atol=1e-5)
    for g1, g2 in zip(grads(ours, a, b), grads(ref, a, b)):
        assert torch.allclose(g1, g2, atol=1e-5)


def test_multineg_matches_pml_ntxent_on_pair_task():
    a, b, _ = embeddings(n=10)
    idx = torch.arange(10)
    ours = get_term("multineg")(make_cfg(task="pair", temperature=0.2))({"emb_a": unit(a), "emb_b": unit(b)},
                                                                        {"index": idx, "label": idx})
    # NT-Xent over [a; b] with pair ids: each item's only positive is its partner; every
    # other item (both modalities) is a negative. Same as InfoNCE with K >= all, both directions.
    ref = losses.NTXentLoss(temperature=0.2)(torch.cat([a, b]), torch.cat([idx, idx]))
    assert torch.allclose(ours, ref, atol=1e-5)
    for g1, g2 in zip(grads(ours, a, b), grads(ref, a, b)):
        assert torch.allclose(g1, g2, atol=1e-5)


def test_triplet_matches_pml_with_hardest_negative_triplets():
    a, b, y = embeddings(n=14, classes=4)
    term = get_term("triplet")(make_cfg(k=1, strategy="hardest", margin=0.3))
    ours = term({"emb_a": unit(a), "emb_b": unit(b)}, {"label": y})

    def hardest(q, g):
        sim = (unit(q) @ unit(g).T).detach().masked_fill(y[:, None] == y[None, :], float("-inf"))
        return sim.argmax(dim=1)

    ref_loss = losses.TripletMarginLoss(margin=0.3, distance=distances.CosineSimilarity(),
                                        reducer=reducers.MeanReducer())
    rows = torch.arange(14)
    # ref_labels is a clone: otherwise PML treats (i, i) across the two sets as a self-pair.
    a2b = ref_loss(a, y, indices_tuple=(rows, rows, hardest(a, b)), ref_emb=b, ref_labels=y.clone())
    b2a = ref_loss(b, y, indices_tuple=(rows, rows, hardest(b, a)), ref_emb=a, ref_labels=y.clone())
    ref = (a2b + b2a) / 2
    assert torch.allclose(ours, ref, atol=1e-6)
    for g1, g2 in zip(grads(ours, a, b), grads(ref, a, b)):
        assert torch.allclose(g1, g2, atol=1e-6)


def test_center_and_label_against_explicit_formulas():
    a, b, y = embeddings(n=9)
    a, b = unit(a), unit(b)
    cfg = make_cfg(lambdas={"center": 1.0})
    center = get_term("center")(cfg)
    emb = torch.cat([a, b])
    expected = 0.5 * ((emb - center.centers[torch.cat([y, y])]) ** 2).sum(dim=1).mean()
    assert torch.allclose(center({"emb_a": a, "emb_b": b}, {"label": y}), expected)
    label = get_term("label")(cfg)
    head = label.heads[0]
    expected = torch.nn.functional.cross_entropy(head(emb), torch.cat([y, y]))
    assert torch.allclose(label({"emb_a": a, "emb_b": b}, {"label": y}), expected)


def test_hierarchical_label_uses_per_level_embeddings():
    a, b, _ = embeddings(n=8)
    a, b = unit(a), unit(b)
    y = torch.stack([torch.tensor([0, 0, 1, 1, 0, 1, 0, 1]), torch.tensor([0, 1, 2, 3, 1, 2, 0, 3])], dim=1)
    label = get_term("label")(make_cfg(num_classes=(2, 4)))
    levels_a, levels_b = [a * 0.5, a], [b * 0.5, b]
    got = label({"emb_a": a, "emb_b": b, "levels_a": levels_a, "levels_b": levels_b}, {"label": y})
    ce = torch.nn.functional.cross_entropy
    expected = (ce(label.heads[0](torch.cat([levels_a[0], levels_b[0]])), torch.cat([y[:, 0], y[:, 0]]))
                + ce(label.heads[1](torch.cat([a, b])), torch.cat([y[:, 1], y[:, 1]]))) / 2
    assert torch.allclose(got, expected, atol=1e-6)


def test_polynomial_against_an_explicit_loop():
    a, b, y = embeddings(n=7, classes=3)
    a, b = unit(a).detach(), unit(b).detach()
    cfg = make_cfg(margin=0.1, poly_pos=[1.0, -1.0], poly_neg=[0.5, 1.0, 0.25])
    got = get_term("polynomial")(cfg)({"emb_a": a, "emb_b": b}, {"label": y})
    total = []
    for q, g in ((a, b), (b, a)):
        for i in range(7):
            s = [float(q[i] @ g[j]) for j in range(7)]
            pos = [j for j in range(7) if y[j] == y[i]]
            neg = [j for j in range(7) if y[j] != y[i]]
            hardest_neg = max((s[j] for j in neg), default=float("-inf"))
            easiest_pos = min(s[j] for j in pos)
            loss = 0.0
            for j in neg:
                if s[j] > easiest_pos - 0.1:
                    loss += max(0.0, 0.5 + s[j] + 0.25 * s[j] ** 2) * s[j]
            for j in pos:
                if s[j] < hardest_neg + 0.1:
                    loss -= max(0.0, 1.0 - s[j]) * s[j]
            total.append(loss)
    assert got.item() == pytest.approx(sum(total) / len(total), abs=1e-5)


def test_supcon_with_k_restricts_negatives():
    a, b, y = embeddings(n=12)
    a, b = unit(a), unit(b)
    full = get_term("supcon")(make_cfg(k=10_000))({"emb_a": a, "emb_b": b}, {"label": y})
    few = get_term("supcon")(make_cfg(k=2, strategy="hardest"))({"emb_a": a, "emb_b": b}, {"label": y})
    assert few.item() < full.item()  # fewer terms in every denominator
