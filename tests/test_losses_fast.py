"""The multi-negative terms against their straightforward formulas,
written here as explicit per-anchor loops: values and gradients, across batch sizes, K,
single / hierarchical / multi-hot labels, anchors without a positive, tied embeddings and
a memory bank; and the row-chunked form (``loss.chunk_mb``) against the unchunked one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from losses_helpers import bank, ctx, make_cfg, pair, term
from xmr.losses.registry import TermContext

pytestmark = pytest.mark.timeout(120)


def _inputs(n, dim=8, classes=4, seed=0, ties=False, kind="single"):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, dim, generator=g)
    b = torch.randn(n, dim, generator=g)
    if ties and n > 2:  # identical embeddings: equal logits everywhere they meet
        a[1], b[2] = a[0], a[0]
    fine = torch.randint(0, classes, (n,), generator=g)
    if kind == "hierarchical":
        y = torch.stack([fine // 2, fine], dim=1)
    elif kind == "multi":
        y = F.one_hot(fine, classes).float()
        y[torch.arange(n) % 3 == 0, (fine[torch.arange(n) % 3 == 0] + 1) % classes] = 1.0
    else:
        y = fine
    return a.requires_grad_(), b.requires_grad_(), y


def _relevant(yi, yj):
    if yi.is_floating_point():
        return bool((yi * yj).sum() > 0)
    return bool(yi.reshape(-1)[-1] == yj.reshape(-1)[-1])


def supcon_loop(a, b, y, tau, bank_view=None):
    """-1/|P| Σ_p log(exp(s_p/τ) / Σ_{c ≠ i, c not a same-class bank entry} exp(s_c/τ))."""
    emb = torch.cat([F.normalize(a, dim=1), F.normalize(b, dim=1)])
    ys = torch.cat([y, y])
    bank_emb = bank_view.emb if bank_view is not None else emb.new_zeros(0, emb.shape[1])
    losses = []
    for i in range(len(emb)):
        logits = [emb[i] @ emb[j] / tau for j in range(len(emb)) if j != i]
        logits += [emb[i] @ bank_emb[j] / tau for j in range(len(bank_emb))
                   if not _relevant(ys[i], bank_view.labels[j])]
        positives = [emb[i] @ emb[j] / tau for j in range(len(emb)) if j != i and _relevant(ys[i], ys[j])]
        if not positives:
            continue
        lse = torch.logsumexp(torch.stack(logits), dim=0)
        losses.append(-torch.stack([p - lse for p in positives]).mean())
    return torch.stack(losses).mean()


def multineg_loop(a, b, y, tau):
    """Both directions: -log(e^{s_p} / (e^{s_p} + Σ_{n not relevant} e^{s_n})), partner positive."""
    emb = torch.cat([F.normalize(a, dim=1), F.normalize(b, dim=1)])
    ys, n = torch.cat([y, y]), len(a)
    out = []
    for i in range(2 * n):
        partner = i + n if i < n else i - n
        pos = emb[i] @ emb[partner] / tau
        negs = [emb[i] @ emb[j] / tau for j in range(2 * n) if not _relevant(ys[i], ys[j])]
        out.append(torch.logsumexp(torch.stack([pos, *negs]), dim=0) - pos)
    return torch.stack(out).mean()


def triplet_all_loop(a, b, y, margin):
    """Cross-modal, every non-relevant item of the other modality: mean hinge per anchor."""
    ua, ub = F.normalize(a, dim=1), F.normalize(b, dim=1)
    out = []
    for q, g in ((ua, ub), (ub, ua)):
        for i in range(len(q)):
            hinges = [(margin + q[i] @ g[j] - q[i] @ g[i]).clamp(min=0) for j in range(len(g))
                      if not _relevant(y[i], y[j])]
            out.append(torch.stack(hinges).mean() if hinges else (q[i] * 0).sum())
    return torch.stack(out).mean()


def _value_and_grads(name, cfg, a, b, y, bank_view=None, task=None):
    t = term(name, cfg)
    loss = t(pair(F.normalize(a, dim=1), F.normalize(b, dim=1)), {"label": y}, ctx(y, bank_view))
    return loss, torch.autograd.grad(loss, (a, b))


def _close(x, y, atol=1e-5):
    (v1, g1), (v2, g2) = x, y
    assert torch.allclose(v1, v2, atol=atol), (float(v1), float(v2))
    for p, q in zip(g1, g2):
        assert torch.allclose(p, q, atol=atol), float((p - q).abs().max())


@pytest.mark.parametrize("n", [2, 5, 16, 33])
@pytest.mark.parametrize("kind", ["single", "hierarchical", "multi"])
@pytest.mark.parametrize("ties", [False, True])
def test_exact_supcon_equals_its_formula(n, kind, ties):
    a, b, y = _inputs(n, kind=kind, ties=ties, classes=6 if n > 5 else 3)
    cfg = make_cfg(k=10_000, temperature=0.2, num_classes=(3, 6) if kind == "hierarchical" else (6,))
    ours = _value_and_grads("supcon", cfg, a, b, y)
    ref = supcon_loop(a, b, y, 0.2)
    _close(ours, (ref, torch.autograd.grad(ref, (a, b))))


def test_exact_supcon_with_a_bank_equals_its_formula():
    a, b, y = _inputs(12, dim=16, classes=5)
    view = bank(n=9, dim=16, classes=5)
    ours = _value_and_grads("supcon", make_cfg(k=10_000, temperature=0.1), a, b, y, view)
    ref = supcon_loop(a, b, y, 0.1, view)
    _close(ours, (ref, torch.autograd.grad(ref, (a, b))))


@pytest.mark.parametrize("n", [2, 7, 20])
@pytest.mark.parametrize("task", ["category", "pair"])
def test_multineg_with_every_negative_equals_its_formula(n, task):
    a, b, y = _inputs(n, classes=3)
    y = torch.arange(n) if task == "pair" else y
    ours = _value_and_grads("multineg", make_cfg(task=task, k=10_000, temperature=0.3), a, b, y)
    ref = multineg_loop(a, b, y, 0.3)
    _close(ours, (ref, torch.autograd.grad(ref, (a, b))))


@pytest.mark.parametrize("n", [3, 11])
@pytest.mark.parametrize("ties", [False, True])
def test_triplet_shared_similarity_equals_its_formula(n, ties):
    """One process without a bank: both directions from one matmul (b -> a its transpose)."""
    a, b, y = _inputs(n, classes=3, ties=ties)
    ours = _value_and_grads("triplet", make_cfg(k=10_000, margin=0.3), a, b, y)
    ref = triplet_all_loop(a, b, y, 0.3)
    _close(ours, (ref, torch.autograd.grad(ref, (a, b))))


def test_terms_of_one_step_share_their_candidates_and_similarity():
    a, b, y = _inputs(8)
    out = pair(F.normalize(a, dim=1), F.normalize(b, dim=1))
    context = TermContext(targets=y)
    term("triplet", make_cfg(k=2, strategy="hardest"))(out, {"label": y}, context)
    term("polynomial", make_cfg(k=10_000))(out, {"label": y}, context)
    assert sum(k[0] == "candidates" for k in context.cache) == 1  # one gather for both terms
    assert sum(k[0] == "sim" for k in context.cache) == 1  # one a·bᵀ for four directions


CHUNKED = [  # (term, config overrides, with a bank)
    ("supcon", {"k": 10_000}, False), ("supcon", {"k": 10_000}, True), ("supcon", {"k": 3, "strategy": "hardest"}, False),
    ("multineg", {"k": 10_000}, False), ("multineg", {"k": 4, "strategy": "semi_hard"}, True),
    ("triplet", {"k": 10_000}, False), ("triplet", {"k": 1, "strategy": "hardest"}, True),
    ("polynomial", {"k": 10_000}, False), ("polynomial", {"k": 5, "strategy": "hardest"}, True),
    ("supcon", {"k": 2, "strategy": "class_aware"}, False),
]


@pytest.mark.parametrize("name, overrides, with_bank", CHUNKED,
                         ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in o.items())}-{'bank' if b else 'nobank'}"
                              for n, o, b in CHUNKED])
def test_row_chunked_equals_unchunked(name, overrides, with_bank):
    a, b, y = _inputs(29, dim=16, classes=5, seed=3)
    view = bank(n=11, dim=16, classes=5) if with_bank else None
    whole = _value_and_grads(name, make_cfg(chunk_mb=0, **overrides), a, b, y, view)
    # 58 anchors x <= 69 candidates x 4 bytes: a budget of 1e-3 MB is chunks of 3-4 rows
    chunked = _value_and_grads(name, make_cfg(chunk_mb=1e-3, **overrides), a, b, y, view)
    _close(whole, chunked)


def test_chunks_bound_what_backward_keeps():
    """Saved-for-backward bytes: the whole logits unchunked, about one chunk's chunked."""
    n, d = 256, 32
    a, b, y = _inputs(n, dim=d, classes=16)

    def saved_bytes(chunk_mb):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        t = term("supcon", make_cfg(k=10_000, chunk_mb=chunk_mb, dim=d))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            t(pair(F.normalize(a, dim=1), F.normalize(b, dim=1)), {"label": y}, ctx(y))
        return sum(sizes)

    logits_bytes = (2 * n) ** 2 * 4
    assert saved_bytes(0) >= logits_bytes  # the [2B, 2B] logits are kept
    assert saved_bytes(0.25) < 0.5 * logits_bytes  # chunks of 128 rows: their inputs only


def test_checkpointed_chunks_draw_the_same_negatives_in_backward(monkeypatch):
    """Row chunks are recomputed in backward (checkpoint): the uniform draws there must be
    the forward's, or the gradient would belong to other negatives than the value."""
    from xmr.losses import negatives

    a, b, y = _inputs(29, dim=16, classes=5, seed=3)
    drawn = []
    real = negatives.NegativeSampler.__call__
    monkeypatch.setattr(negatives.NegativeSampler, "__call__",
                        lambda self, *args, **kw: drawn.append(real(self, *args, **kw)) or drawn[-1])
    _value_and_grads("supcon", make_cfg(k=3, chunk_mb=1e-3), a, b, y, None)
    half = len(drawn) // 2
    assert half > 1 and len(drawn) == 2 * half  # every chunk drew twice: forward, then its recomputation
    forward, backward = drawn[:half], drawn[half:]
    assert not all(torch.equal(f, forward[0]) for f in forward[1:])  # random draws, not one fixed mask
    assert sorted(map(lambda t: t.tolist(), forward)) == sorted(map(lambda t: t.tolist(), backward))
