"""Pre-norm transformer layers on ``F.scaled_dot_product_attention`` (fused kernels on CPU
and GPU), with dropout on each sub-layer's output only.

Why not ``nn.TransformerEncoderLayer``: in training it takes ``nn.MultiheadAttention``'s
slow path (the packed projection is unflattened, transposed and copied, the attention
matrix is materialised per head), and it draws dropout masks in four places per layer
(attention weights, the feed-forward's hidden units, both residual branches). In the QACLN
step that was half the time (issue 14: ``copy_`` 12 %, ``bernoulli_`` 16 %, ``mul`` 8 %).

Where dropout goes: the QACLN paper (seed 004) does not say. We follow the Transformer's own
recipe ("Attention Is All You Need", §5.4 "Residual Dropout"): dropout on the output of each
sub-layer before it is added to the residual, none on attention weights or inside the
feed-forward block. In eval mode (no dropout) the layers compute exactly what
``nn.TransformerEncoderLayer(norm_first=True)`` computes, and the parameter names are the
same (``self_attn.in_proj_weight``, ``linear1``, ``norm1`` ...), so checkpoints written with
the old layers load unchanged (tests/test_train_step.py checks both).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters (packed q/k/v
    projection, ``out_proj``), batch first, no dropout on the attention weights."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"model.embed_dim = {d} is not divisible by model.num_heads = {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.out_proj = nn.Linear(d, d)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's initialisation
        nn.init.zeros_(self.out_proj.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # [B, H, N, d_h]

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, N, d] attends to ``kv`` [B, M, d] (itself when None); ``key_padding_mask``
        [B, M] is True where a key must be ignored (``nn.MultiheadAttention``'s convention)."""
        d = x.shape[-1]
        if kv is None:  # self-attention: one packed projection
            q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q = F.linear(x, self.in_proj_weight[:d], self.in_proj_bias[:d])
            k, v = F.linear(kv, self.in_proj_weight[d:], self.in_proj_bias[d:]).chunk(2, dim=-1)
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v), attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(x.shape))


class EncoderLayer(nn.Module):
    """x + drop(attn(norm1(x))), then x + drop(ff(norm2(x))); ff = linear2(relu(linear1))."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d, heads)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.norm1(x), key_padding_mask=key_padding_mask))
        return x + self.dropout(self.linear2(F.relu(self.linear1(self.norm2(x)))))


class Encoder(nn.Module):
    """A stack of ``EncoderLayer`` (``layers.0``, ``layers.1`` ... as ``nn.TransformerEncoder``).

    Like ``nn.TransformerEncoder``, the layers start as copies of one initialised layer, and
    the random draws happen in the same order as there: the same seed gives the same initial
    weights as the ``nn.TransformerEncoderLayer`` stack this replaces (so a change of
    implementation is not also a change of initialisation)."""

    def __init__(self, d: int, layers: int, heads: int, dropout: float, ff: int | None = None) -> None:
        super().__init__()
        first = EncoderLayer(d, heads, ff or 2 * d, dropout)
        self.layers = nn.ModuleList(copy.deepcopy(first) for _ in range(layers))

    def forward(self, x: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, src_key_padding_mask)
        return x
