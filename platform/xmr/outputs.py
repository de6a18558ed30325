"""What a model's training forward returns, one typed structure per task family.

Models produce these and loss terms read them, so the fields a term needs are named here
once instead of being string keys spread over both layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Reconstruction:
    """Masked reconstruction of both modalities (mixer-MAE pre-training)."""

    recon: dict[str, torch.Tensor]  # role -> [B, T, D] reconstructed features
    target: dict[str, torch.Tensor]  # role -> [B, T, D] original features
    mask: dict[str, torch.Tensor]  # role -> bool [B, T], True where the token was hidden


@dataclass
class PairOutputs:
    """Category and pair families: both modalities in the shared space.

    ``emb_a`` / ``emb_b`` [B, d] are L2-normalised (what retrieval ranks by); ``levels_*``
    hold one embedding per label level, coarse to fine (CDAML); ``reconstruction`` is set
    only when the reconstruction term is on.
    """

    emb_a: torch.Tensor
    emb_b: torch.Tensor
    levels_a: list[torch.Tensor] | None = None
    levels_b: list[torch.Tensor] | None = None
    reconstruction: Reconstruction | None = None


@dataclass
class CrossScores:
    """Local queries against the gathered videos and local videos against the gathered
    queries ([b, B] each; row i's positive is column ``offset + i``)."""

    video_index: torch.Tensor  # long [b]: the local rows' videos
    all_video_index: torch.Tensor  # long [B]: the gathered columns' videos
    offset: int
    phi_q2v: torch.Tensor | None = None  # VR score φ
    phi_v2q: torch.Tensor | None = None
    nce_q2v: torch.Tensor | None = None  # VideoCL score f(c)ᵀg(q)
    nce_v2q: torch.Tensor | None = None


@dataclass
class VcmrOutputs:
    """VCMR family (QACLN): the query, its video's fused clips, and the span logits."""

    q: torch.Tensor  # [B, d]
    h_qcf: torch.Tensor  # [B, N, d] query-aware fused clips of the query's own video
    clip_mask: torch.Tensor  # bool [B, N]
    start_logits: torch.Tensor  # [B, N] (padding masked)
    end_logits: torch.Tensor  # [B, N]
    cross: CrossScores | None = None
