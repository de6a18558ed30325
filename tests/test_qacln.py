"""QACLN: the exact pairwise scores, each term against a direct formula, and the preset
learning VR / VCMR on a synthetic corpus with planted v / t / vt queries."""

import pytest
import torch
import torch.nn.functional as F

from train_helpers import batches, mean, preset_cfg, train
from xmr.config import load_config
from xmr.data.manifest import load_manifest
from xmr.data.sources.synth_vcmr import SynthVcmrConfig, write_synth_vcmr
from xmr.tasks.vcmr import evaluate_vcmr
from xmr.losses._jsd import jsd_loss, moment_masks
from xmr.losses.registry import build_term
from xmr.method import Method

pytestmark = pytest.mark.timeout(400)


def tiny_cfg(**lambdas):
    cfg = load_config("qacln", ["model.embed_dim=16", "model.num_heads=2"])
    cfg.model.dims = {"visual": [6], "subtitle": [5], "query": [4]}
    if lambdas:
        cfg.loss.lambdas = lambdas
    return cfg


def tiny_batch(b=4, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    clip_mask = torch.ones(b, n, dtype=torch.bool)
    clip_mask[1, 5:] = False
    sub_mask = torch.rand(b, n, generator=g) > 0.3
    return {"q_tokens": torch.randn(b, 3, 4, generator=g), "q_mask": torch.ones(b, 3, dtype=torch.bool),
            "visual": torch.randn(b, n, 6, generator=g), "subtitle": torch.randn(b, n, 5, generator=g),
            "sub_mask": sub_mask & clip_mask, "clip_mask": clip_mask,
            "st": torch.tensor([0, 1, 2, 3]), "ed": torch.tensor([2, 4, 6, 3]),
            "video_index": torch.tensor([10, 11, 10, 12])}


@pytest.mark.parametrize("netvlad, fusion", [(False, True), (True, True), (False, False)])
def test_pairwise_phi_equals_explicit_fused_cosines(netvlad, fusion):
    cfg = tiny_cfg()
    cfg.model.netvlad, cfg.model.query_fusion = netvlad, fusion
    model = Method(cfg).model.eval()
    b = tiny_batch()
    q = model.encode_queries(b["q_tokens"], b["q_mask"])
    enc = model.encode_videos(b["visual"], b["subtitle"], b["sub_mask"], b["clip_mask"])
    mu_v, mu_s = model.fusion(q, enc)
    expected = torch.empty(4, 4)
    for i in range(4):
        for j in range(4):
            h = mu_v[i, j] * enc["h_v"][j] + mu_s[i, j] * enc["h_s"][j]
            cos = F.cosine_similarity(h, q[i][None], dim=-1)[b["clip_mask"][j]]
            expected[i, j] = cos.max()
    assert torch.allclose(model.phi(q, enc), expected, atol=1e-5)
    if not fusion:
        assert torch.all(mu_v == 0.5)
    # span logits for a chosen video equal the training path's own-video logits
    start, end = model.span_logits(q, enc, torch.arange(4)[:, None])
    own_s, own_e = model.span_logits_from_fused(q, model.own_fused(q, enc), enc["clip_mask"])
    assert torch.allclose(start[:, 0], own_s, atol=1e-5) and torch.allclose(end[:, 0], own_e, atol=1e-5)


@pytest.mark.parametrize("query_negatives", [False, True])
def test_vr_hinge_sums_over_the_negative_videos_as_the_paper_writes_it(query_negatives):
    """QACLN Eq. 14: Σ over the K negative videos of max(0, Δ + φ' − φ), mean over queries;
    ``loss.vr_hinge.query_negatives`` adds the negative-query direction."""
    cfg = tiny_cfg(vr_hinge=1.0)
    cfg.negatives.k, cfg.negatives.strategy = 10, "hardest"
    cfg.loss.vr_hinge.query_negatives = query_negatives
    model = Method(cfg).model
    b = tiny_batch()
    with torch.no_grad():
        out = model(b)
    got = build_term("vr_hinge", cfg)(out, b)
    vid = b["video_index"].tolist()
    total = 0.0
    for i in range(4):
        for s in (out.cross.phi_q2v, out.cross.phi_v2q) if query_negatives else (out.cross.phi_q2v,):
            total += sum(max(0.0, 0.1 + float(s[i, j] - s[i, i])) for j in range(4) if vid[j] != vid[i])  # noqa
    assert got.item() == pytest.approx(total / 4, abs=1e-6)


def test_video_cl_contrasts_against_the_whole_batch_not_the_hinges_k():
    cfg = tiny_cfg(video_cl=1.0, vr_hinge=1.0)
    cfg.negatives.k = 1  # the VR hinge's K no longer limits VideoCL
    b = tiny_batch()
    out = Method(cfg).model(b)
    got = build_term("video_cl", cfg)(out, b)
    vid = b["video_index"].tolist()
    per = []
    for i in range(4):
        parts = []
        for s in (out.cross.nce_q2v, out.cross.nce_v2q):
            negs = [float(s[i, j].detach()) for j in range(4) if vid[j] != vid[i]]
            pos = float(s[i, i].detach())
            parts.append(-pos + torch.logsumexp(torch.tensor([pos] + negs), 0).item())
        per.append(sum(parts) / 2)
    assert got.item() == pytest.approx(sum(per) / 4, abs=1e-5)
    cfg.loss.video_cl.k = 1  # a sample of one negative per anchor: a different value
    assert build_term("video_cl", cfg)(out, b).item() != pytest.approx(got.item(), abs=1e-4)


def test_query_encoder_has_the_papers_two_layers():
    cfg = tiny_cfg()
    model = Method(cfg).model
    assert len(model.q_enc.layers) == 2 and cfg.model.query_layers == 2
    assert len(model.v_enc.layers) == cfg.model.num_layers


def test_clips_without_subtitle_are_not_attended_to():
    """Changing the subtitle features of clips that have no subtitle changes nothing the
    model computes for the other clips (keys masked in every subtitle attention)."""
    model = Method(tiny_cfg()).model.eval()
    b = tiny_batch()
    enc = model.encode_videos(b["visual"], b["subtitle"], b["sub_mask"], b["clip_mask"])
    noisy = b["subtitle"].clone()
    no_sub = ~b["sub_mask"] & b["clip_mask"]
    assert no_sub.any()
    noisy[no_sub] += 5 * torch.randn(int(no_sub.sum()), noisy.shape[-1])
    enc2 = model.encode_videos(b["visual"], noisy, b["sub_mask"], b["clip_mask"])
    keep = b["sub_mask"] & b["clip_mask"]
    assert torch.allclose(enc["h_v"], enc2["h_v"], atol=1e-5)
    assert torch.allclose(enc["h_s"][keep], enc2["h_s"][keep], atol=1e-5)


def test_jsd_and_moment_masks_against_formulas():
    scores = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    pos = torch.tensor([[True, False, True, False]])
    neg = torch.tensor([[False, True, False, True]])
    sp = torch.nn.functional.softplus
    expected = (sp(-scores[0, 0]) + sp(-scores[0, 2])) / 2 + (sp(scores[0, 1]) + sp(scores[0, 3])) / 2
    assert torch.allclose(jsd_loss(scores, pos, neg), expected[None])
    b = tiny_batch()
    inside, outside = moment_masks(b, b["clip_mask"])
    # Inclusive labels (QACLN §2.1): st=0, ed=2: clips 0..2; st=1, ed=4: 1..4;
    # st=2, ed=6: 2..6; st=ed=3: the one clip.
    assert inside.tolist()[0] == [True, True, True, False, False, False, False]
    assert inside.tolist()[1] == [False, True, True, True, True, False, False]
    assert inside.tolist()[2] == [False, False, True, True, True, True, True]
    assert inside.tolist()[3] == [False, False, False, True, False, False, False]
    assert not (inside & outside).any() and torch.equal(inside | outside, b["clip_mask"])


def test_every_term_runs_and_backpropagates():
    cfg = tiny_cfg(vr_hinge=1.0, moment=0.5, video_cl=0.5, frame_cl=0.5, vvcl=0.5)
    method = Method(cfg)
    out = method(tiny_batch())
    assert {"loss", "vr_hinge", "moment", "video_cl", "frame_cl", "vvcl", "moment_ce_over_chance"} <= set(out)
    assert set(out["_weighted"]) == {"vr_hinge", "moment", "video_cl", "frame_cl", "vvcl"}
    out["loss"].backward()
    grads = [p.grad for p in method.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.fixture(scope="module")
def vcmr_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("vcmr")
    cfg = SynthVcmrConfig(splits={"train": 240, "val": 40, "test": 40}, max_duration=45.0, seed=2)
    write_synth_vcmr(str(out), cfg, progress=False)
    return str(out)


def run_preset(name, data, steps, *extra):
    torch.manual_seed(0)
    # Small model; lr 1e-3 instead of the paper's 1e-4 so a few hundred CPU steps suffice.
    cfg = preset_cfg(name, data, "model.embed_dim=32", "data.batch_size=32", "optim.lr=1e-3", *extra)
    clip_len = load_manifest(data).clip_len
    method = Method(cfg)

    def evaluate():
        return evaluate_vcmr(method.model, batches(cfg, "val", shuffle=False, unit="video"),
                             batches(cfg, "val", shuffle=False, unit="query"), clip_len,
                             top_videos=10, max_len=cfg.model.max_moment_clips)

    before = evaluate()
    losses = train(method, cfg, steps, unit="query")
    after = evaluate()
    return before, after, losses


def test_qacln_preset_learns(vcmr_data):
    before, after, losses = run_preset("qacln", vcmr_data, 300)
    print(f"qacln: loss {mean(losses[:30]):.3f} -> {mean(losses[-30:]):.3f}; "
          f"VR R@1 {before['vr_r1']:.3f} -> {after['vr_r1']:.3f}, R@10 {before['vr_r10']:.3f} -> {after['vr_r10']:.3f}; "
          f"VCMR 0.5 R@10 {before['vcmr_0.5_r10']:.3f} -> {after['vcmr_0.5_r10']:.3f}; "
          f"SVMR 0.5 R@1 {before['svmr_0.5_r1']:.3f} -> {after['svmr_0.5_r1']:.3f}")
    assert mean(losses[-30:]) < 0.8 * mean(losses[:30])
    assert after["vr_r10"] > before["vr_r10"] + 0.2
    # R@1 over the 93 validation queries moves in steps of 0.011; with the paper's L_VR (negative
    # videos only, issue 11) it gains less in 300 steps than the old two-direction hinge did.
    assert after["vr_r1"] > before["vr_r1"] + 0.03
    # VCMR R@10 at IoU 0.5 from 0.00-0.03 at the start: the gain over torch seeds 0, 1, 2 was
    # 0.15, 0.06, 0.06 before issue 14's packed layers and 0.07 (seed 0) after; in eval mode
    # the two compute the same (tests/test_train_step.py), only the dropout draws differ.
    assert after["vcmr_0.5_r10"] > before["vcmr_0.5_r10"] + 0.04


def test_search_matches_phi_and_span_logits():
    cfg = tiny_cfg()
    model = Method(cfg).model.eval()
    b = tiny_batch()
    q = model.encode_queries(b["q_tokens"], b["q_mask"])
    enc = model.encode_videos(b["visual"], b["subtitle"], b["sub_mask"], b["clip_mask"])
    scores, top, start, end = model.search(q, enc, top_videos=3, chunk=2)  # chunking over videos too
    assert torch.allclose(scores, torch.exp(10 * (model.phi(q, enc) - 1)), atol=1e-6)
    assert torch.equal(top, scores.topk(3, dim=1).indices)
    ref_s, ref_e = model.span_logits(q, enc, top)
    assert torch.allclose(start, ref_s, atol=1e-5) and torch.allclose(end, ref_e, atol=1e-5)
