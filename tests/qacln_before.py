# FROZEN COPY, for tests/test_train_step.py and bench/train_step.py only: the QACLN model
# (nn.TransformerEncoderLayer, nn.MultiheadAttention) as it was before issue 14 (commit
# ce80db5), kept so the optimised model is checked (and timed) against it side by side.
# Self-contained (torch only; the attention pool and the output types copied below), one
# process (the gathers across ranks left out). Not imported by the library; do not edit.
"""QACLN: query-aware dual contrastive learning for video corpus moment retrieval (§5).

Encoders (§2.2): the query's tokens are projected, encoded by ``model.query_layers``
transformer layers (the paper: two) and attention-pooled into q. A video's visual (V) and
subtitle (S) clip streams are projected and encoded each (``model.num_layers``), meet in one
co-attention layer (each stream attends to the other), and pass a final layer each:
H_v, H_s [N, d]. Clips without a subtitle are masked as keys wherever subtitles are
attended to (both subtitle encoder layers, and visual-from-subtitle co-attention), so no
clip's encoding depends on the (empty) subtitle features of a clip that has none.

Query-aware fusion (QCF): μ_v, μ_s = softmax(W_v·q, W_s·q); H_qcf = μ_v·H_v + μ_s·H_s.
``model.query_fusion: false`` uses μ = ½ (the "without QCF" ablation). ``model.netvlad``
adds NetVLAD descriptors of H_v / H_s to the fusion logits (a bilinear term between q and
each stream's descriptor), so the weights depend on the video as well as on the query.

Because H_qcf is linear in (H_v, H_s), every (query, video) score is computed exactly
without materialising H_qcf per pair: cos(μ_v·h_v + μ_s·h_s, q) needs only q·h_v, q·h_s
and the three clip-level Gram terms. Training scores the local queries against the
gathered videos (and the local videos against the gathered queries); inference scores a
query against a pre-encoded corpus with the same function.
"""

from __future__ import annotations

import math
from typing import Any

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class AttentionPool(nn.Module):
    """Softmax-weighted mean over tokens (padding masked)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.score(x).squeeze(-1)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return (logits.softmax(dim=-1).unsqueeze(-1) * x).sum(dim=1)


@dataclass
class CrossScores:
    video_index: torch.Tensor
    all_video_index: torch.Tensor
    offset: int
    phi_q2v: torch.Tensor | None = None
    phi_v2q: torch.Tensor | None = None
    nce_q2v: torch.Tensor | None = None
    nce_v2q: torch.Tensor | None = None


@dataclass
class VcmrOutputs:
    q: torch.Tensor
    h_qcf: torch.Tensor
    clip_mask: torch.Tensor
    start_logits: torch.Tensor
    end_logits: torch.Tensor
    cross: CrossScores | None = None

NEG = -1e4  # finite "minus infinity" for masked logits (cross-entropy stays finite)
VR_SHARPNESS = 10.0  # inference video score exp(10·(φ − 1)) ∈ (0, 1], XML-style


def sinusoid(n: int, d: int, device) -> torch.Tensor:
    """Fixed position codes, so any number of clips works."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))
    out = torch.zeros(n, d, device=device)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq[: d // 2])
    return out


def encoder(d: int, layers: int, heads: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout, batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def subtitle_keys(sub_mask: torch.Tensor, clip_mask: torch.Tensor) -> torch.Tensor:
    """Clips whose subtitle may be attended to: those that have one; a video without any
    subtitle falls back to its valid clips (attention needs at least one key per row)."""
    keys = sub_mask & clip_mask
    return torch.where(keys.any(dim=1, keepdim=True), keys, clip_mask)


class CoAttention(nn.Module):
    """One joint layer: visual attends to subtitle and subtitle to visual (residual)."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.v_from_s = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.s_from_v = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm_v, self.norm_s = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, hv, hs, clip_mask, sub_mask):
        # A clip without subtitle offers nothing to attend to.
        v2, _ = self.v_from_s(self.norm_v(hv), hs, hs, key_padding_mask=~subtitle_keys(sub_mask, clip_mask))
        s2, _ = self.s_from_v(self.norm_s(hs), hv, hv, key_padding_mask=~clip_mask)
        return hv + v2, hs + s2


class NetVLAD(nn.Module):
    """Soft-assignment VLAD pooling of clip features into one normalised descriptor."""

    def __init__(self, d: int, clusters: int) -> None:
        super().__init__()
        self.assign = nn.Linear(d, clusters)
        self.centers = nn.Parameter(torch.randn(clusters, d) / math.sqrt(d))
        self.out = nn.Linear(clusters * d, d)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.assign(h).softmax(dim=-1) * mask[..., None]  # [V, N, K]
        vlad = torch.einsum("vnk,vnd->vkd", a, h) - a.sum(dim=1)[..., None] * self.centers
        vlad = F.normalize(F.normalize(vlad, dim=-1).flatten(1), dim=-1)
        return self.out(vlad)


class QACLNBefore(nn.Module):
    families = ("vcmr",)

    @classmethod
    def fields_read(cls, cfg) -> set[str]:
        out = {"model.embed_dim", "model.num_layers", "model.query_layers", "model.num_heads", "model.dropout",
               "model.query_fusion", "model.netvlad", "model.conv_kernel", "model.max_moment_clips",
               "model.top_videos", "negatives.gather"}
        if cfg.model.netvlad:
            out.add("model.netvlad_clusters")
        return out

    def __init__(self, cfg) -> None:
        super().__init__()
        m = cfg.model
        for role in ("visual", "subtitle", "query"):
            if role not in m.dims:
                raise ValueError(f"model.dims has no {role!r} features (got {sorted(m.dims)}): qacln needs a vcmr dataset")
        d, heads, drop = m.embed_dim, m.num_heads, m.dropout
        self.query_fusion, self.use_netvlad = m.query_fusion, m.netvlad
        self.q_proj = nn.Linear(m.dims["query"][-1], d)
        self.q_enc = encoder(d, m.query_layers, heads, drop)
        self.q_pool = AttentionPool(d)
        self.v_proj, self.s_proj = nn.Linear(m.dims["visual"][-1], d), nn.Linear(m.dims["subtitle"][-1], d)
        self.v_enc, self.s_enc = encoder(d, m.num_layers, heads, drop), encoder(d, m.num_layers, heads, drop)
        self.co = CoAttention(d, heads, drop)
        self.v_out, self.s_out = encoder(d, 1, heads, drop), encoder(d, 1, heads, drop)
        self.fuse = nn.Linear(d, 2)  # W_v·q, W_s·q
        if self.use_netvlad:
            self.vlad_v, self.vlad_s = NetVLAD(d, m.netvlad_clusters), NetVLAD(d, m.netvlad_clusters)
            self.vlad_q = nn.Linear(d, 2 * d, bias=False)
        k = m.conv_kernel
        self.conv_start = nn.Conv1d(1, 1, k, padding=k // 2)
        self.conv_end = nn.Conv1d(1, 1, k, padding=k // 2)
        self.attn_video = nn.Linear(d, 1)  # W_α for VideoCL's video vector
        self.video_head, self.query_head = nn.Linear(d, d), nn.Linear(d, d)  # f(c), g(q)
        lam = cfg.loss.lambdas
        self.need_vr = lam.get("vr_hinge", 0) > 0
        self.need_video_cl = lam.get("video_cl", 0) > 0

    # ------------------------------------------------------------------ encoders
    def encode_queries(self, q_tokens: torch.Tensor, q_mask: torch.Tensor) -> torch.Tensor:
        x = self.q_proj(q_tokens) + sinusoid(q_tokens.shape[1], self.q_proj.out_features, q_tokens.device)
        x = self.q_enc(x, src_key_padding_mask=~q_mask)
        return self.q_pool(x, q_mask)

    def encode_videos(self, visual, subtitle, sub_mask, clip_mask) -> dict[str, torch.Tensor]:
        """Per-clip encodings of a set of videos (computed once per corpus at inference)."""
        pos = sinusoid(visual.shape[1], self.v_proj.out_features, visual.device)
        hv = self.v_enc(self.v_proj(visual) + pos, src_key_padding_mask=~clip_mask)
        sub_keys = subtitle_keys(sub_mask, clip_mask)
        hs = self.s_enc(self.s_proj(subtitle) + pos, src_key_padding_mask=~sub_keys)
        hv, hs = self.co(hv, hs, clip_mask, sub_mask)
        hv = self.v_out(hv, src_key_padding_mask=~clip_mask) * clip_mask[..., None]
        hs = self.s_out(hs, src_key_padding_mask=~sub_keys) * clip_mask[..., None]
        gram = torch.stack([hv.pow(2).sum(-1), hs.pow(2).sum(-1), (hv * hs).sum(-1)], dim=-1)
        enc = {"h_v": hv, "h_s": hs, "clip_mask": clip_mask, "gram": gram}
        if self.use_netvlad:
            enc["vlad_v"], enc["vlad_s"] = self.vlad_v(hv, clip_mask), self.vlad_s(hs, clip_mask)
        return enc

    # ------------------------------------------------------------------ fusion and scores
    def fusion(self, q: torch.Tensor, enc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ_v, μ_s), each [Q, V]: the query-aware stream weights for every (query, video)."""
        n_videos = enc["h_v"].shape[0]
        if not self.query_fusion:
            half = q.new_full((q.shape[0], n_videos), 0.5)
            return half, half
        logits = self.fuse(q)[:, None, :].expand(-1, n_videos, -1)  # [Q, V, 2]
        if self.use_netvlad:
            pv, ps = self.vlad_q(q).chunk(2, dim=-1)
            logits = logits + torch.stack([pv @ enc["vlad_v"].T, ps @ enc["vlad_s"].T], dim=-1)
        mu = logits.softmax(dim=-1)
        return mu[..., 0], mu[..., 1]

    def clip_dots(self, q: torch.Tensor, enc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """q·h_v and q·h_s for every query, video and clip: two [Q, V, N] tensors."""
        return torch.einsum("qd,vnd->qvn", q, enc["h_v"]), torch.einsum("qd,vnd->qvn", q, enc["h_s"])

    def fused_dots(self, q, enc, mu_v, mu_s, dots=None) -> torch.Tensor:
        """S_vq = h_qcf·q̂ for every query, video and clip: [Q, V, N] (ConvSE's input)."""
        qv, qs = dots if dots is not None else self.clip_dots(q, enc)
        return (mu_v[..., None] * qv + mu_s[..., None] * qs) / q.norm(dim=-1).clamp(min=1e-6)[:, None, None]

    def clip_cosines(self, q, enc, mu_v, mu_s, s_vq=None) -> torch.Tensor:
        """cos(h_qcf, q) = S_vq / |h_qcf| for every query, video and clip: [Q, V, N]
        (invalid clips -inf); pass ``s_vq`` when it is already computed."""
        s = s_vq if s_vq is not None else self.fused_dots(q, enc, mu_v, mu_s)
        return (s / self.fused_norms(mu_v, mu_s, enc["gram"])).masked_fill(~enc["clip_mask"][None], float("-inf"))

    @staticmethod
    def fused_norms(mu_v: torch.Tensor, mu_s: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        """|h_qcf| for every query, video and clip: [Q, V, N]. h_qcf = μ_v·h_v + μ_s·h_s is
        never formed: its norm follows from the clip Gram terms |h_v|², |h_s|², h_v·h_s
        (cached at encoding), as its dot with q follows from q·h_v and q·h_s."""
        nv, ns, cvs = gram.unbind(-1)
        mv, ms = mu_v[..., None], mu_s[..., None]
        return (mv.pow(2) * nv + 2 * mv * ms * cvs + ms.pow(2) * ns).clamp(min=1e-12).sqrt()

    def phi(self, q: torch.Tensor, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """VR score φ(q, video) = max over clips of cos(h_qcf_i, q): [Q, V]."""
        mu_v, mu_s = self.fusion(q, enc)
        return self.clip_cosines(q, enc, mu_v, mu_s).amax(dim=-1)

    def video_cl_scores(self, q: torch.Tensor, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """VideoCL score f(c)ᵀg(q) with c = Σ α_i h_qcf_i, α = softmax(W_α·H_qcf): [Q, V]."""
        mu_v, mu_s = self.fusion(q, enc)
        mv, ms = mu_v[..., None], mu_s[..., None]
        wa = self.attn_video.weight[0]
        logits = mv * (enc["h_v"] @ wa)[None] + ms * (enc["h_s"] @ wa)[None]  # W_α·H_qcf (bias cancels)
        alpha = logits.masked_fill(~enc["clip_mask"][None], float("-inf")).softmax(dim=-1)
        c = mv * torch.einsum("qvn,vnd->qvd", alpha, enc["h_v"]) + ms * torch.einsum("qvn,vnd->qvd", alpha, enc["h_s"])
        return torch.einsum("qvd,qd->qv", self.video_head(c), self.query_head(q))

    def own_fused(self, q: torch.Tensor, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """H_qcf of each query with its own video (row i with video i): [B, N, d]."""
        mu_v, mu_s = self._pair_fusion(q, enc)
        return mu_v[:, None, None] * enc["h_v"] + mu_s[:, None, None] * enc["h_s"]

    def convse(self, fused_scores: torch.Tensor, clip_mask: torch.Tensor):
        """ConvSE: two 1-D convolutions over S_vq [..., N] -> start, end logits (padding masked)."""
        shape = fused_scores.shape
        flat = fused_scores.reshape(-1, 1, shape[-1])
        start = self.conv_start(flat).reshape(shape).masked_fill(~clip_mask, NEG)
        end = self.conv_end(flat).reshape(shape).masked_fill(~clip_mask, NEG)
        return start, end

    def span_logits_from_fused(self, q: torch.Tensor, h_qcf: torch.Tensor, clip_mask: torch.Tensor):
        """Start/end logits from H_qcf [..., N, d] and its query: S_vq = H_qcf·q̂."""
        return self.convse(torch.einsum("...nd,...d->...n", h_qcf, F.normalize(q, dim=-1)), clip_mask)

    def span_logits(self, q: torch.Tensor, enc: dict[str, torch.Tensor], video_idx: torch.Tensor):
        """Start/end logits [Q, K, N] of each query on its K given videos ([Q, K] indices)."""
        sub = {k: v[video_idx.reshape(-1)] for k, v in enc.items()}
        qq = q[:, None, :].expand(-1, video_idx.shape[1], -1).reshape(-1, q.shape[-1])
        qv = torch.einsum("bd,bnd->bn", qq, sub["h_v"])
        qs = torch.einsum("bd,bnd->bn", qq, sub["h_s"])
        mu_v, mu_s = self._pair_fusion(qq, sub)
        fused = (mu_v[:, None] * qv + mu_s[:, None] * qs) / qq.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        start, end = self.convse(fused, sub["clip_mask"])
        return start.reshape(*video_idx.shape, -1), end.reshape(*video_idx.shape, -1)

    def _pair_fusion(self, q: torch.Tensor, enc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """μ for row i of q with video i of enc: two [B] tensors."""
        if not self.query_fusion:
            half = q.new_full((q.shape[0],), 0.5)
            return half, half
        logits = self.fuse(q)
        if self.use_netvlad:
            pv, ps = self.vlad_q(q).chunk(2, dim=-1)
            logits = logits + torch.stack([(pv * enc["vlad_v"]).sum(-1), (ps * enc["vlad_s"]).sum(-1)], dim=-1)
        mu = logits.softmax(dim=-1)
        return mu[:, 0], mu[:, 1]

    @torch.no_grad()
    def search(self, q: torch.Tensor, enc: dict[str, torch.Tensor], top_videos: int, chunk: int = 256,
               buckets: list | None = None):
        """Corpus inference in one pass over the clip encodings.

        Returns (video scores [Q, V] in (0, 1], top video indices [Q, K], start and end
        logits [Q, K, N]). Video scores are exp(10·(φ − 1)): monotone in φ and >= 0, as the
        span product needs (XML-style). ConvSE's per-clip S_vq are the same q·h products φ
        uses, so the top videos' spans cost no second pass over the clips. The corpus is
        scanned in groups of videos of similar length (``bucket_corpus``; pass them in to
        reuse them across calls), each padded only to its own longest video.
        """
        buckets = buckets if buckets is not None else bucket_corpus(enc, chunk)
        n_videos, n_clips = enc["clip_mask"].shape
        phi = q.new_empty(q.shape[0], n_videos)
        s_vq = []  # per bucket: S_vq [Q, bucket videos, bucket clips]
        for idx, sub in buckets:
            mu_v, mu_s = self.fusion(q, sub)
            s = self.fused_dots(q, sub, mu_v, mu_s)
            phi[:, idx] = self.clip_cosines(q, sub, mu_v, mu_s, s_vq=s).amax(dim=-1)
            s_vq.append(s)
        scores = torch.exp(VR_SHARPNESS * (phi - 1.0))
        top = scores.topk(min(top_videos, scores.shape[1]), dim=1).indices
        start, end = self.convse(_pick_top(s_vq, buckets, top, n_clips), enc["clip_mask"][top])
        return scores, top, start, end

    # ------------------------------------------------------------------ training forward
    def forward(self, batch: dict[str, Any]) -> VcmrOutputs:
        q = self.encode_queries(batch["q_tokens"], batch["q_mask"])
        enc = self.encode_videos(batch["visual"], batch["subtitle"], batch["sub_mask"], batch["clip_mask"])
        h_qcf = self.own_fused(q, enc)
        start, end = self.span_logits_from_fused(q, h_qcf, enc["clip_mask"])
        cross = self._cross_scores(q, enc, batch["video_index"]) if self.need_vr or self.need_video_cl else None
        return VcmrOutputs(q=q, h_qcf=h_qcf, clip_mask=enc["clip_mask"], start_logits=start, end_logits=end,
                           cross=cross)

    def _cross_scores(self, q, enc, video_index) -> CrossScores:
        """Local queries x videos and local videos x queries (one process: the batch is all)."""
        all_q, offset, all_enc, all_videos = q, 0, enc, video_index
        local_enc = pad_encoding(enc, all_enc["h_v"].shape[1])
        out = CrossScores(video_index=video_index, all_video_index=all_videos, offset=offset)
        if self.need_vr:
            out.phi_q2v = self.phi(q, all_enc)  # [b, B]
            out.phi_v2q = self.phi(all_q, local_enc).T  # [b, B]: local video i vs query j
        if self.need_video_cl:
            out.nce_q2v = self.video_cl_scores(q, all_enc)
            out.nce_v2q = self.video_cl_scores(all_q, local_enc).T
        return out


CLIP_KEYS = ("h_v", "h_s", "clip_mask", "gram")  # encoding entries with a clip axis (dim 1)


def bucket_corpus(enc: dict[str, torch.Tensor], chunk: int = 256) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The corpus as groups of ``chunk`` videos of similar clip count, each a contiguous
    encoding padded only to its group's longest video: (video indices, sub-encoding).
    Real corpora mix short and long videos (TVR: 20 to 100 clips), so padding everything to
    the longest doubles the work of a scan."""
    lengths = enc["clip_mask"].sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    out = []
    for lo in range(0, len(order), chunk):
        idx = order[lo:lo + chunk]
        n = max(1, int(lengths[idx].max()))
        out.append((idx, {k: (v[idx, :n] if k in CLIP_KEYS else v[idx]).contiguous() for k, v in enc.items()}))
    return out


def _pick_top(s_vq: list[torch.Tensor], buckets: list, top: torch.Tensor, n_clips: int) -> torch.Tensor:
    """S_vq of each query's top videos [Q, K, n_clips] (zero past a video's bucket width),
    gathered from the per-bucket scores, so no [Q, V, n_clips] tensor is ever filled."""
    n_videos = sum(len(idx) for idx, _ in buckets)
    bucket_of = torch.empty(n_videos, dtype=torch.long, device=top.device)
    slot_of = torch.empty(n_videos, dtype=torch.long, device=top.device)
    for b, (idx, _) in enumerate(buckets):
        bucket_of[idx] = b
        slot_of[idx] = torch.arange(len(idx), device=top.device)
    out = s_vq[0].new_zeros(*top.shape, n_clips)
    tb, ts = bucket_of[top], slot_of[top]
    for b, s in enumerate(s_vq):
        qi, ki = (tb == b).nonzero(as_tuple=True)
        if len(qi):
            out[qi, ki, : s.shape[2]] = s[qi, ts[qi, ki]]
    return out


def pad_clips(x: torch.Tensor, n: int) -> torch.Tensor:
    """Pad dim 1 (clips) to ``n`` with zeros / False."""
    if x.shape[1] == n:
        return x
    pad = x.new_zeros((x.shape[0], n - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


def pad_encoding(enc: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """A video encoding with every clip-axis entry padded to ``n`` clips."""
    return {k: pad_clips(v, n) if k in CLIP_KEYS else v for k, v in enc.items()}
