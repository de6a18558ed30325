"""Loss terms against pytorch-metric-learning and explicit formulas: values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, reducers

from losses_helpers import bank, ctx, embeddings, make_cfg, pair, term, unit

pytestmark = pytest.mark.timeout(60)


def grads(value, *tensors):
    return torch.autograd.grad(value, tensors)


def test_supcon_matches_pml_supconloss():
    a, b, y = embeddings(n=16)
    ours = term("supcon", make_cfg(temperature=0.07))(pair(unit(a), unit(b)), {"label": y}, ctx(y))
    # Union of both modalities; ref_labels is labels, so PML drops self-pairs as SupCon needs.
    emb, lab = torch.cat([a, b]), torch.cat([y, y])
    ref = losses.SupConLoss(temperature=0.07)(emb, lab)
    assert torch.allclose(ours, ref, atol=1e-5)
    for g1, g2 in zip(grads(ours, a, b), grads(ref, a, b)):
        assert torch.allclose(g1, g2, atol=1e-5)


def test_multineg_matches_pml_ntxent_on_pair_task():
    a, b, _ = embeddings(n=10)
    idx = torch.arange(10)
    ours = term("multineg", make_cfg(task="pair", temperature=0.2))(pair(unit(a), unit(b)), {"index": idx, "label": idx}, ctx(idx))
    # NT-Xent over [a; b] with pair ids: each item's only positive is its partner; every
    # other item (both modalities) is a negative. Same as InfoNCE with K >= all, both directions.
    ref = losses.NTXentLoss(temperature=0.2)(torch.cat([a, b]), torch.cat([idx, idx]))
    assert torch.allclose(ours, ref, atol=1e-5)
    for g1, g2 in zip(grads(ours, a, b), grads(ref, a, b)):
        assert torch.allclose(g1, g2, atol=1e-5)


def _pml_triplet(a, b, y, neg_a2b, neg_b2a, margin):
    ref_loss = losses.TripletMarginLoss(margin=margin, distance=distances.CosineSimilarity(),
                                        reducer=reducers.MeanReducer())
    rows = torch.arange(len(y))
    # ref_labels is a clone: otherwise PML treats (i, i) across the two sets as a self-pair.
    a2b = ref_loss(a, y, indices_tuple=(rows, rows, neg_a2b), ref_emb=b, ref_labels=y.clone())
    b2a = ref_loss(b, y, indices_tuple=(rows, rows, neg_b2a), ref_emb=a, ref_labels=y.clone())
    return (a2b + b2a) / 2


def test_triplet_matches_pml_with_hardest_negative_triplets():
    a, b, y = embeddings(n=14, classes=4)
    ours = term("triplet", make_cfg(k=1, strategy="hardest", margin=0.3))(pair(unit(a), unit(b)), {"label": y}, ctx(y))

    def hardest(q, g):
        sim = (unit(q) @ unit(g).T).detach().masked_fill(y[:, None] == y[None, :], float("-inf"))
        return sim.argmax(dim=1)

    ref = _pml_triplet(a, b, y, hardest(a, b), hardest(b, a), 0.3)
    assert torch.allclose(ours, ref, atol=1e-6)
    for g1, g2 in zip(grads(ours, a, b), grads(ref, a, b)):
        assert torch.allclose(g1, g2, atol=1e-6)


def test_triplet_semi_hard_matches_pml_with_facenet_triplets():
    a, b, y = embeddings(n=14, classes=4, seed=2)
    ours = term("triplet", make_cfg(k=1, strategy="semi_hard", margin=0.3))(pair(unit(a), unit(b)), {"label": y}, ctx(y))

    def semi_hard(q, g):
        sim = (unit(q) @ unit(g).T).detach()
        out = []
        for i in range(len(y)):
            negs = [(float(sim[i, j]), j) for j in range(len(y)) if y[j] != y[i]]
            easier = [n for n in negs if n[0] < float(sim[i, i])]
            out.append(max(easier)[1] if easier else min(negs)[1])
        return torch.tensor(out)

    ref = _pml_triplet(a, b, y, semi_hard(a, b), semi_hard(b, a), 0.3)
    assert torch.allclose(ours, ref, atol=1e-6)
    for g1, g2 in zip(grads(ours, a, b), grads(ref, a, b)):
        assert torch.allclose(g1, g2, atol=1e-6)


def test_center_against_its_formula():
    a, b, y = embeddings(n=9)
    a, b = unit(a), unit(b)
    center = term("center", make_cfg(lambdas={"center": 1.0}))
    emb = torch.cat([a, b])
    expected = 0.5 * ((emb - center.centers[torch.cat([y, y])]) ** 2).sum(dim=1).mean()
    assert torch.allclose(center(pair(a, b), {"label": y}, ctx(y)), expected)


def test_label_is_a_scaled_cosine_classifier():
    """NormFace: logits = s · cos(x, w_c); the embeddings' norm cannot cap the logits."""
    a, b, y = embeddings(n=9)
    label = term("label", make_cfg(label={"scale": 20.0}))
    w = label.heads[0].weight
    emb = torch.cat([unit(a), unit(b)])
    expected = F.cross_entropy(20.0 * unit(emb) @ unit(w).T, torch.cat([y, y]))
    assert torch.allclose(label(pair(unit(a), unit(b)), {"label": y}, ctx(y)), expected, atol=1e-6)
    confident = term("label", make_cfg(label={"scale": 20.0}))
    with torch.no_grad():  # one-hot class directions: a plain unit-norm linear head stays near chance
        confident.heads[0].weight.copy_(torch.eye(5, 16))
    x = F.one_hot(torch.cat([y, y]), 16).float()
    assert confident(pair(x[:9], x[9:]), {"label": y}, ctx(y)).item() < 0.01 < math.log(5) - 1


def test_hierarchical_label_sums_levels_with_their_weights():
    a, b, _ = embeddings(n=8)
    a, b = unit(a), unit(b)
    y = torch.stack([torch.tensor([0, 0, 1, 1, 0, 1, 0, 1]), torch.tensor([0, 1, 2, 3, 1, 2, 0, 3])], dim=1)
    levels_a, levels_b = [unit(a * 0.5 + 0.1), a], [unit(b * 0.5 - 0.1), b]
    out = pair(a, b, levels_a=levels_a, levels_b=levels_b)
    for weights in ([], [0.5, 2.0]):
        label = term("label", make_cfg(num_classes=(2, 4), label={"level_weights": weights}))
        ce = [F.cross_entropy(label.heads[i](torch.cat([levels_a[i], levels_b[i]])), torch.cat([y[:, i], y[:, i]]))
              for i in range(2)]
        w = weights or [1.0, 1.0]
        assert torch.allclose(label(out, {"label": y}, ctx(y)), w[0] * ce[0] + w[1] * ce[1], atol=1e-6)
    flat = term("label", make_cfg(num_classes=(4,)))  # the flat variant: the fine level, weight 1 as above
    expected = F.cross_entropy(flat.heads[0](torch.cat([a, b])), torch.cat([y[:, 1], y[:, 1]]))
    assert torch.allclose(flat(pair(a, b), {"label": y}, ctx(y)), expected, atol=1e-6)


def _polynomial_loop(a, b, y, margin, poly_pos, poly_neg, bank_view=None):
    def w(coeffs, s):
        return max(0.0, sum(c * s ** q for q, c in enumerate(coeffs)))

    total = []
    n = len(y)
    for q, g, m_other in ((a, b, 1), (b, a, 0)):
        extra = [] if bank_view is None else [(bank_view.emb[j], int(bank_view.labels[j])) for j in range(len(bank_view))
                                              if int(bank_view.modality[j]) == m_other]
        for i in range(n):
            s = [float(q[i] @ g[j]) for j in range(n)]
            pos = [s[j] for j in range(n) if y[j] == y[i]]
            neg = [s[j] for j in range(n) if y[j] != y[i]] + [float(q[i] @ e) for e, lab in extra if lab != int(y[i])]
            hardest_neg, easiest_pos = max(neg, default=float("-inf")), min(pos)
            loss = sum(w(poly_neg, sn) * sn for sn in neg if sn > easiest_pos - margin)
            loss -= sum(w(poly_pos, sp) * sp for sp in pos if sp < hardest_neg + margin)
            total.append(loss)
    return sum(total) / len(total)


def test_polynomial_against_an_explicit_loop():
    a, b, y = embeddings(n=7, classes=3)
    a, b = unit(a).detach(), unit(b).detach()
    cfg = make_cfg(margin=0.1, polynomial={"pos": [1.0, -1.0], "neg": [0.5, 1.0, 0.25]})
    got = term("polynomial", cfg)(pair(a, b), {"label": y}, ctx(y))
    assert got.item() == pytest.approx(_polynomial_loop(a, b, y, 0.1, [1.0, -1.0], [0.5, 1.0, 0.25]), abs=1e-5)


def test_supcon_with_k_restricts_negatives():
    a, b, y = embeddings(n=12)
    a, b = unit(a), unit(b)
    full = term("supcon", make_cfg(k=10_000))(pair(a, b), {"label": y}, ctx(y))
    few = term("supcon", make_cfg(k=2, strategy="hardest"))(pair(a, b), {"label": y}, ctx(y))
    assert few.item() < full.item()  # fewer terms in every denominator


# ------------------------------------------------------------- the memory bank as extra negatives


def test_supcon_with_a_bank_adds_other_class_entries_to_every_denominator():
    a, b, y = embeddings(n=6, classes=3)
    a, b, y = unit(a).detach(), unit(b).detach(), y
    bv = bank(n=7, classes=3)
    got = term("supcon", make_cfg(temperature=0.5))(pair(a, b), {"label": y}, ctx(y, bv))
    emb, lab = torch.cat([a, b]), torch.cat([y, y])
    per = []
    for i in range(12):
        pos = [j for j in range(12) if j != i and lab[j] == lab[i]]
        if not pos:
            continue
        cand = [float(emb[i] @ emb[j]) / 0.5 for j in range(12) if j != i]  # batch positives and negatives
        cand += [float(emb[i] @ bv.emb[j]) / 0.5 for j in range(7) if int(bv.labels[j]) != int(lab[i])]
        lse = math.log(sum(math.exp(c) for c in cand))
        per.append(-sum(float(emb[i] @ emb[j]) / 0.5 - lse for j in pos) / len(pos))
    assert got.item() == pytest.approx(sum(per) / len(per), abs=1e-5)


def test_multineg_with_a_bank_adds_non_relevant_entries():
    a, b, y = embeddings(n=5, classes=5, seed=4)
    a, b = unit(a).detach(), unit(b).detach()
    bv = bank(n=6, classes=5)
    got = term("multineg", make_cfg(temperature=0.3))(pair(a, b), {"label": y}, ctx(y, bv))
    emb, lab, partner = torch.cat([a, b]), torch.cat([y, y]), list(range(5, 10)) + list(range(5))
    per = []
    for i in range(10):
        p = float(emb[i] @ emb[partner[i]]) / 0.3
        negs = [float(emb[i] @ emb[j]) / 0.3 for j in range(10) if lab[j] != lab[i]]
        negs += [float(emb[i] @ bv.emb[j]) / 0.3 for j in range(6) if int(bv.labels[j]) != int(lab[i])]
        per.append(-p + math.log(math.exp(p) + sum(math.exp(n) for n in negs)))
    assert got.item() == pytest.approx(sum(per) / len(per), abs=1e-5)


def test_triplet_with_a_bank_uses_the_other_modalitys_entries_after_the_batch():
    a, b, y = embeddings(n=4, classes=4, seed=5)
    a, b = unit(a).detach(), unit(b).detach()
    bv = bank(n=8, classes=4)
    got = term("triplet", make_cfg(k=50, strategy="uniform", margin=0.2))(pair(a, b), {"label": y}, ctx(y, bv))
    per = []
    for q, g, m_other in ((a, b, 1), (b, a, 0)):
        for i in range(4):
            sp = float(q[i] @ g[i])
            negs = [float(q[i] @ g[j]) for j in range(4) if y[j] != y[i]]
            negs += [float(q[i] @ bv.emb[j]) for j in range(8) if int(bv.modality[j]) == m_other
                     and int(bv.labels[j]) != int(y[i])]
            per.append(sum(max(0.0, 0.2 + sn - sp) for sn in negs) / max(1, len(negs)))
    assert got.item() == pytest.approx(sum(per) / len(per), abs=1e-5)


def test_polynomial_with_a_bank_against_the_loop():
    a, b, y = embeddings(n=6, classes=3, seed=6)
    a, b = unit(a).detach(), unit(b).detach()
    bv = bank(n=8, classes=3)
    got = term("polynomial", make_cfg(margin=0.1))(pair(a, b), {"label": y}, ctx(y, bv))
    assert got.item() == pytest.approx(_polynomial_loop(a, b, y, 0.1, [1.0, -1.0], [1.0, 1.0], bv), abs=1e-5)
