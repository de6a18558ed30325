"""The faster QACLN step (issue 14) computes what the straightforward one computes.

- the packed, length-grouped encoder layers against ``nn.TransformerEncoderLayer``
  (norm_first) with the same weights, at every valid token, values and gradients;
- the whole QACLN model against the frozen copy of the step before issue 14
  (``tests/qacln_before.py``) in eval mode: every loss term and every gradient;
- VVCL scored on the moment's anchors only against the full [B, N, N] formula;
- the CPU dropout's keep rate, scale and determinism under a seed;
- the fused AdamW against the per-parameter loop.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from xmr.losses._jsd import jsd_loss, masked_mean, moment_masks
from xmr.losses.vvcl import VVCL
from xmr.models.attention import Dropout, Encoder, Packed, attention_groups


def padded_batch(b, n, d, seed, min_len=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, n + 1, (b,), generator=g)
    lengths[0] = n
    mask = torch.arange(n)[None] < lengths[:, None]
    return torch.randn(b, n, d, generator=g), mask, g


@pytest.mark.parametrize("groups", [1, 2, 3, 7])
@pytest.mark.parametrize("masked_keys", [False, True])
def test_packed_encoder_equals_torch_transformer_layers(groups, masked_keys):
    d, heads, b, n = 16, 4, 7, 9
    x, mask, g = padded_batch(b, n, d, seed=groups)
    keys = mask & (torch.rand(b, n, generator=g) > 0.4) if masked_keys else mask.clone()
    keys[:, 0] = True  # every sequence keeps one key (as subtitle_keys guarantees)
    torch.manual_seed(0)
    ours = Encoder(d, 2, heads, dropout=0.1).eval()
    torch.manual_seed(0)
    ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, heads, 2 * d, 0.1, batch_first=True, norm_first=True),
                                2, enable_nested_tensor=False).eval()
    # Same seed, same draws in the same order: the same initial weights under the same names.
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in ref.state_dict().items())

    layout = Packed(mask, groups)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = layout.unpack(ours(layout.pack(xa), layout, layout.keys(layout.pack(keys))))
    want = ref(xb, src_key_padding_mask=~keys) * mask[..., None]
    assert torch.allclose(out, want, atol=1e-5)
    weight = torch.randn(b, n, d, generator=g) * mask[..., None]
    (out * weight).sum().backward()
    (want * weight).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-5), name


def test_packed_layout_round_trips_and_orders_rows_by_group():
    x, mask, _ = padded_batch(10, 6, 3, seed=3)
    mask[4, 2] = False  # a hole: masks need not be prefixes
    layout = Packed(mask, 3)
    assert len(layout) == int(mask.sum())
    assert torch.equal(layout.unpack(layout.pack(x)), x * mask[..., None])
    blocks = layout.to_groups(layout.pack(x).reshape(len(layout), -1))
    assert [blk.shape[0] for blk in blocks] == [4, 3, 3]
    assert torch.equal(layout.from_groups(blocks), layout.pack(x).reshape(len(layout), -1))
    assert torch.equal(layout.positions, layout.rows % 6)
    with pytest.raises(ValueError, match="padding mask"):
        Packed(torch.ones(3, dtype=torch.bool))


def test_attention_groups_follow_device_and_length():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert attention_groups(32, 59, cpu) == 4
    assert attention_groups(32, 12, cpu) == 1  # query tokens: one group
    assert attention_groups(32, 59, gpu) == 1


@pytest.mark.parametrize("netvlad", [False, True])
def test_qacln_equals_the_step_before_issue_14(netvlad):
    """Eval mode (no dropout): the same loss terms and gradients as the frozen model."""
    from qacln_before import QACLNBefore

    from test_qacln import tiny_batch, tiny_cfg
    from xmr.method import Method

    cfg = tiny_cfg(vr_hinge=1.0, moment=0.5, video_cl=0.5, frame_cl=0.5, vvcl=0.5)
    cfg.model.netvlad = netvlad
    b = tiny_batch()
    b["clip_mask"][2, 4:] = False
    b["sub_mask"] &= b["clip_mask"]
    b["sub_mask"][3] = False  # a video without any subtitle
    b["ed"] = torch.tensor([2, 4, 3, 3])
    torch.manual_seed(0)
    after = Method(cfg)
    before = Method(cfg)
    before.model = QACLNBefore(cfg)
    before.load_state_dict(after.state_dict())
    results = []
    for m in (before, after):
        m.eval()
        torch.manual_seed(1)  # the same uniform negatives for L_VR
        out = m(b)
        out["loss"].backward()
        results.append(({k: v.detach() for k, v in out.items() if not k.startswith("_")},
                        {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (lb, gb), (la, ga) = results
    assert lb.keys() == la.keys() and gb.keys() == ga.keys() and len(ga) > 50
    for k in la:
        assert torch.allclose(la[k], lb[k], atol=1e-5), k
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5), n


def vvcl_full_square(term, h, clip_mask, st, ed):
    """VVCL as the paper writes it: every clip an anchor of a [B, N, N] critic matrix."""
    inside, outside = moment_masks({"st": st, "ed": ed}, clip_mask)
    pair = term.critic(h, h)
    n = h.shape[1]
    rows = torch.arange(h.shape[0])
    idx = torch.arange(n)[None, :]
    terms = [jsd_loss(pair[rows, a], inside & (idx != a[:, None]), outside) for a in (st, ed)]
    eye = torch.eye(n, dtype=torch.bool)[None]
    every = jsd_loss(pair, inside[:, None, :] & ~eye, outside[:, None, :].expand_as(pair))
    terms.append(masked_mean(every, inside))
    return torch.stack(terms).mean(dim=0)


@pytest.mark.parametrize("seed", range(6))
def test_vvcl_on_moment_anchors_equals_the_full_square(seed):
    g = torch.Generator().manual_seed(seed)
    b, n, d = 6, int(torch.randint(2, 12, (1,), generator=g)), 8
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    clip_mask = torch.arange(n)[None] < lengths[:, None]
    st = (torch.rand(b, generator=g) * lengths).long()
    ed = torch.minimum(st + torch.randint(0, 4, (b,), generator=g), lengths - 1)
    h0 = torch.randn(b, n, d, generator=g)
    term = VVCL(d)
    values, grads = [], []
    for fn in (lambda h: term.per_anchor(SimpleNamespace(h_qcf=h, clip_mask=clip_mask), {"st": st, "ed": ed}, None),
               lambda h: vvcl_full_square(term, h, clip_mask, st, ed)):
        h = h0.clone().requires_grad_()
        term.zero_grad()
        v = fn(h)
        v.sum().backward()
        values.append(v.detach())
        grads.append((h.grad, term.critic.weight.grad.clone(), term.critic.bias.grad.clone()))
    assert torch.allclose(values[0], values[1], atol=1e-5)
    for ours, want in zip(*grads):
        assert torch.allclose(ours, want, atol=1e-5)


def test_cpu_dropout_keep_rate_scale_and_seed():
    drop = Dropout(0.1).train()
    x = torch.ones(1000, 1000)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    # 10^6 draws: the keep rate's standard error is 3e-4; 5 of them is 1.5e-3.
    assert abs(kept.float().mean().item() - (1 - drop.drop)) < 1.5e-3
    assert abs(drop.drop - 0.1) < 2**-16
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - drop.drop)))
    assert abs(y.mean().item() - 1.0) < 2e-3  # inverted dropout keeps the expectation
    # Neighbouring elements are independent (the four 16-bit slices of one word).
    k = kept.reshape(-1, 4).float()
    assert abs((k[:, 0] * k[:, 1]).mean().item() - (1 - drop.drop) ** 2) < 3e-3
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # reproducible under the global seed
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    with pytest.raises(ValueError, match="model.dropout"):
        Dropout(1.0)


def test_fused_adamw_matches_the_per_parameter_loop():
    from xmr.config import Config
    from xmr.train.step import make_optimizer

    torch.manual_seed(0)
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    cfg = Config()
    fused = make_optimizer(cfg, [{"params": params, "lr": cfg.optim.lr}])
    loop = torch.optim.AdamW(twins, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=False, foreach=False)
    assert fused.defaults["fused"]
    for step in range(5):
        grads = [torch.randn_like(p) for p in params]
        for p, t, gr in zip(params, twins, grads):
            p.grad, t.grad = gr.clone(), gr.clone()
        fused.step()
        loop.step()
    for p, t in zip(params, twins):
        assert torch.allclose(p, t, atol=1e-6)


def test_encoder_copies_share_no_parameters():
    enc = Encoder(8, 3, 2, 0.0)
    ptrs = [p.data_ptr() for p in enc.parameters()]
    assert len(ptrs) == len(set(ptrs))
    assert copy.deepcopy(enc).state_dict().keys() == enc.state_dict().keys()
