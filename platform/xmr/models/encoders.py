"""Per-modality feature encoders: MLP for vectors, transformer for token sequences.

Inputs are pre-extracted features: a vector ``[D]`` or a sequence ``[T, D]`` per item
(``model.dims``). ``tokens_a`` / ``tokens_b`` > 0 reshapes a vector into that many tokens
so a vector modality can feed a transformer. Every encoder ends in a projection head and
L2 normalisation, so retrieval is cosine similarity.
"""

from __future__ import annotations

import math

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


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int, dropout: float) -> nn.Sequential:
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(max(layers - 1, 0)):
        mods += [nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout)]
        dim = hidden
    mods.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*mods)


def token_shape(shape: list[int], tokens: int) -> tuple[int, int]:
    """(T, D) of a modality as the transformer sees it."""
    if len(shape) == 2:
        return shape[0], shape[1]
    (dim,) = shape
    if tokens <= 0:
        return 1, dim
    if dim % tokens:
        raise ValueError(f"a vector of {dim} features cannot be cut into {tokens} tokens (model.tokens_*)")
    return tokens, dim // tokens


class SequenceEncoder(nn.Module):
    """Tokens -> linear -> + position -> transformer -> attention pool -> [B, hidden]."""

    def __init__(self, n_tokens: int, token_dim: int, hidden: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.n_tokens, self.token_dim = n_tokens, token_dim
        self.proj = nn.Linear(token_dim, hidden)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, hidden) / math.sqrt(hidden))
        layer = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pool = AttentionPool(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.n_tokens, self.token_dim)
        return self.pool(self.encoder(self.proj(x) + self.pos))


def sequence_encoder(shape: list[int], encoder: str) -> bool:
    """Whether a modality of this shape gets the transformer (sequences always do)."""
    return encoder == "transformer" or len(shape) == 2


class ModalityEncoder(nn.Module):
    """One modality's features -> L2-normalised ``embed_dim`` vector."""

    def __init__(self, shape: list[int], cfg, tokens: int = 0) -> None:
        super().__init__()
        m = cfg.model
        if sequence_encoder(shape, m.encoder):
            n_tokens, token_dim = token_shape(shape, tokens)
            self.body = SequenceEncoder(n_tokens, token_dim, m.hidden_dim, m.num_layers, m.num_heads, m.dropout)
            self.head = nn.Linear(m.hidden_dim, m.embed_dim)
        else:
            in_dim = int(torch.tensor(shape).prod())
            self.body = nn.Flatten()
            self.head = mlp(in_dim, m.hidden_dim, m.embed_dim, m.num_layers + 1, m.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.body(x)), dim=-1)
