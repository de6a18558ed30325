"""CDAML: cross-modal deep adversarial metric learning (thesis; METHODS.md §4).

(a) Hierarchical labels: one metric sub-network (projection) per label level on a shared
per-modality trunk; ``levels_a`` / ``levels_b`` hold the per-level L2-normalised
embeddings, coarse → fine, for the per-level ``label`` term, and ``emb_*`` is the finest
level's (what retrieval ranks by). ``hierarchical: false`` is the flat-label variant.

(b) ``attention: true``: tokens pass a self-attention layer (intra-modal), then a
cross-attention layer (inter-modal). At retrieval time an item cannot see its partner, so
the inter-modal attention attends to a learned memory of shared tokens that both
modalities read and train: the modalities meet in that common memory instead of in each
other's features. The adversarial term closes the remaining modality gap.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xmr.models.encoders import AttentionPool, mlp, token_shape
from xmr.models.registry import register_model
from xmr.outputs import PairOutputs


class AttentionTrunk(nn.Module):
    """Tokens -> self-attention (intra) -> cross-attention to a shared memory (inter) -> pool."""

    def __init__(self, n_tokens: int, token_dim: int, width: int, heads: int, dropout: float,
                 memory: nn.Parameter) -> None:
        super().__init__()
        self.n_tokens, self.token_dim = n_tokens, token_dim
        self.proj = nn.Linear(token_dim, width)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, width) / math.sqrt(width))
        self.self_attn = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout, batch_first=True,
                                                    norm_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.memory = memory
        self.pool = AttentionPool(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.self_attn(self.proj(x.reshape(x.shape[0], self.n_tokens, self.token_dim)) + self.pos)
        mem = self.memory.expand(x.shape[0], -1, -1)
        mixed, _ = self.cross_attn(self.norm(tokens), mem, mem)
        return self.pool(tokens + mixed)


@register_model("cdaml")
class CDAML(nn.Module):
    families = ("category",)

    @classmethod
    def fields_read(cls, cfg, outputs: frozenset[str]) -> set[str]:
        out = {"model.embed_dim", "model.hidden_dim", "model.hierarchical", "model.attention", "model.dropout"}
        if cfg.model.attention:
            out |= {"model.num_heads"} | {f"model.tokens_{r}" for r in ("a", "b") if len(cfg.model.dims.get(r, [0])) == 1 or not cfg.model.dims}
        else:
            out.add("model.num_layers")
        return out

    def __init__(self, cfg, outputs: frozenset[str]) -> None:  # it computes no optional output
        super().__init__()
        m = cfg.model
        n_levels = len(m.num_classes) if m.hierarchical else 1
        if m.hierarchical and n_levels < 2:
            raise ValueError(f"model.hierarchical needs labels with >= 2 levels, got num_classes = {m.num_classes}")
        h = m.hidden_dim
        if m.attention:
            self.memory = nn.Parameter(torch.randn(1, 8, h) / math.sqrt(h))
            self.trunk = nn.ModuleDict({r: AttentionTrunk(*token_shape(m.dims[r], getattr(m, f"tokens_{r}")),
                                                          h, m.num_heads, m.dropout, self.memory)
                                        for r in ("a", "b")})
        else:
            self.trunk = nn.ModuleDict({r: nn.Sequential(nn.Flatten(), mlp(int(torch.tensor(m.dims[r]).prod()), h, h,
                                                                           m.num_layers, m.dropout), nn.GELU())
                                        for r in ("a", "b")})
        # One metric sub-network per level, shared by both modalities (a common space per level).
        self.levels = nn.ModuleList(nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, m.embed_dim))
                                    for _ in range(n_levels))

    def _levels(self, role: str, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.trunk[role](x)
        return [F.normalize(level(feats), dim=-1) for level in self.levels]

    def encode(self, role: str, x: torch.Tensor) -> torch.Tensor:
        return self._levels(role, x)[-1]

    def forward(self, batch) -> PairOutputs:
        levels_a, levels_b = self._levels("a", batch["a"]), self._levels("b", batch["b"])
        out = PairOutputs(emb_a=levels_a[-1], emb_b=levels_b[-1])
        if len(self.levels) > 1:
            out.levels_a, out.levels_b = levels_a, levels_b
        return out
