"""Pre-norm transformer layers over packed variable-length sequences, on
``F.scaled_dot_product_attention`` (fused kernels on CPU and GPU), with dropout on each
sub-layer's output only.

Why not ``nn.TransformerEncoderLayer``: in training it takes ``nn.MultiheadAttention``'s
slow path (the packed projection is unflattened, transposed and copied, the attention
matrix is materialised per head), and it draws dropout masks in four places per layer
(attention weights, the feed-forward's hidden units, both residual branches). In the QACLN
step that was half the time (issue 14: ``copy_`` 12 %, ``bernoulli_`` 16 %, ``mul`` 8 %).

Why packed: a batch of videos is padded to its longest one, and on the synthetic VCMR
corpus (as on TVR, 20 to 100 clips a video) about 40 % of the clip slots are padding. Every
per-token operation (projections, feed-forward, layer norms, dropout, residuals) on a pad
is work thrown away, so the layers run on the valid tokens only, as rows [P, d]
(``Packed``). Attention needs sequences again: the sequences are sorted by length and cut
into ``groups`` groups, each padded only to its own longest member, so attention computes
close to Σ n_i² scores rather than B·N_max². Padding never reaches a valid token (pads are
masked as keys), so packing changes no value a valid token gets.

Where dropout goes: the QACLN paper (seed 004) does not say. We follow the Transformer's own
recipe ("Attention Is All You Need", §5.4 "Residual Dropout"): dropout on the output of each
sub-layer before it is added to the residual, none on attention weights or inside the
feed-forward block. In eval mode (no dropout) the layers compute, at every valid token,
exactly what ``nn.TransformerEncoderLayer(norm_first=True)`` computes, and the parameter
names are the same (``self_attn.in_proj_weight``, ``linear1``, ``norm1`` ...), so
checkpoints written with the old layers load unchanged (tests/test_train_step.py checks
both).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

CPU_LENGTH_GROUP = 8  # sequences per attention group on CPU, for sequences of ...
CPU_GROUP_MIN_LENGTH = 32  # ... at least this many slots; shorter ones attend in one group


def attention_groups(n_sequences: int, length: int, device: torch.device) -> int:
    """How many length groups attention runs in. On CPU, for long sequences (video clips),
    a group per ``CPU_LENGTH_GROUP`` sequences; for short ones (query tokens) and on GPU
    one, where a call per group costs more than the padding it saves. Measured on the QACLN
    step (2-core EPYC, one thread, 32 videos of 20-60 clips): the whole step with groups of
    4 / 8 / 16 / 32 videos took 1.11 / 1.00 / 1.03 / 1.12 of the best; the query encoder
    (12 tokens, forward + backward) in one group 0.77 of its time in groups of 8."""
    if device.type != "cpu" or length < CPU_GROUP_MIN_LENGTH:
        return 1
    return max(1, -(-n_sequences // CPU_LENGTH_GROUP))


class Packed:
    """The valid tokens of a padded batch (``mask`` [B, N], True = valid) as rows [P, ...],
    and the length groups attention runs in.

    Rows are ordered group by group (sequences sorted by extent, the last valid position
    + 1), each group's rows one contiguous slice, so going from rows to a group's padded
    [g, n_g, C] block and back is one ``index_copy`` and one ``index_select``. Build it once
    per batch and share it between every layer that runs over the same tokens."""

    def __init__(self, mask: torch.Tensor, groups: int = 1) -> None:
        if mask.dim() != 2:
            raise ValueError(f"a padding mask is [batch, tokens], got shape {tuple(mask.shape)}")
        b, n = mask.shape
        device = mask.device
        self.mask, self.batch, self.length = mask, b, n
        extent = (mask * torch.arange(1, n + 1, device=device)).amax(dim=1)
        order = torch.argsort(extent, stable=True)
        widths = extent[order].tolist()  # one host transfer for every group's width
        self.groups: list[tuple[int, int, int, int, torch.Tensor]] = []  # (start, end, g, n_g, pos)
        self._valid: list[torch.Tensor] = []
        rows, start, lo = [], 0, 0
        for videos in order.tensor_split(max(1, min(groups, b))):
            g = len(videos)
            n_g = max(1, int(widths[lo + g - 1]))
            lo += g
            valid = mask[videos, :n_g]
            pos = valid.reshape(-1).nonzero().squeeze(1)  # valid slots of the group's [g * n_g] grid
            flat = (videos[:, None] * n + torch.arange(n_g, device=device)).reshape(-1)
            rows.append(flat[pos])
            self.groups.append((start, start + len(pos), g, n_g, pos))
            self._valid.append(valid)
            start += len(pos)
        self.sizes = [end - start for start, end, *_ in self.groups]
        self.rows = torch.cat(rows)  # flat index (b * N + i) of every packed row
        self.positions = self.rows % n  # each row's position in its sequence
        self.all_keys = self.keys(None)

    def __len__(self) -> int:
        return len(self.rows)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, ...] -> [P, ...]: the valid tokens, in packed order."""
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.rows)

    def unpack(self, rows: torch.Tensor) -> torch.Tensor:
        """[P, ...] -> [B, N, ...] with zeros at the padding."""
        out = rows.new_zeros(self.batch * self.length, *rows.shape[1:])
        return out.index_copy(0, self.rows, rows).view(self.batch, self.length, *rows.shape[1:])

    def keys(self, allowed: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Per group, the attention mask [g, 1, 1, n_g] (True = may be attended to) of the
        keys that are valid and, when given, ``allowed`` (packed [P] bool); None where a
        group attends to every slot (no mask: the fastest kernel)."""
        out = []
        for (start, end, g, n_g, pos), valid in zip(self.groups, self._valid):
            if allowed is not None:  # pads are never allowed: only the valid slots are written
                valid = torch.zeros_like(valid).view(-1).index_copy(0, pos, allowed[start:end]).view(g, n_g)
            out.append(None if bool(valid.all()) else valid[:, None, None, :])
        return out

    def to_groups(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """[P, C] -> per group a padded [g, n_g, C] (zeros at the padding)."""
        out = []
        # One split, not a slice per group: a slice's backward writes a zero tensor of the
        # whole [P, C] per group; split's is one concatenation.
        for part, (start, end, g, n_g, pos) in zip(rows.split(self.sizes), self.groups):
            if len(pos) < g * n_g:
                part = part.new_zeros(g * n_g, part.shape[1]).index_copy(0, pos, part)
            out.append(part.view(g, n_g, -1))
        return out

    def from_groups(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """Per group a [g, n_g, C] -> [P, C] (the valid slots, in packed order)."""
        parts = []
        for (start, end, g, n_g, pos), block in zip(self.groups, blocks):
            flat = block.reshape(g * n_g, -1)
            parts.append(flat if len(pos) == g * n_g else flat.index_select(0, pos))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class Dropout(nn.Module):
    """Inverted dropout (``nn.Dropout``'s contract) whose CPU mask costs a third of
    ``bernoulli_``'s: each 64-bit random word (uniform over all 64 bits) gives four 16-bit
    uniforms, compared with one threshold.

    Why: in the QACLN step ``bernoulli_`` was 9 % of the time after packing (issue 14).
    The drop probability is rounded to a multiple of 2⁻¹⁶ (0.1 becomes 0.100006) and the
    kept values are scaled by 1 / (1 − that), so the output's expectation is the input
    exactly. Off the CPU (CUDA's Philox is already fast) it is ``F.dropout``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"model.dropout = {p} must be in [0, 1)")
        self.p = p
        self.drop = round(p * 65536) / 65536  # what is dropped on CPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return x * self.keep_mask(x)

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        """0 where dropped, 1 / (1 − p) where kept, shaped as ``x``."""
        n = x.numel()
        words = torch.empty(-(-n // 4), dtype=torch.int64, device=x.device).random_(-(2**63), None)
        keep = words.view(torch.int16)[:n] >= round(self.drop * 65536) - 32768  # P = 1 - drop
        scale = torch.tensor(1.0 / (1.0 - self.drop), dtype=x.dtype, device=x.device)
        return torch.where(keep.view(x.shape), scale, torch.zeros((), dtype=x.dtype, device=x.device))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MultiHeadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters (packed q/k/v
    projection, ``out_proj``), no dropout on the attention weights, over ``Packed`` rows."""

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

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        g, n, d = x.shape
        return x.view(g, n, self.heads, d // self.heads).transpose(1, 2)  # [g, H, n, d_h]

    def forward(self, x: torch.Tensor, layout: Packed, keys: list[torch.Tensor | None],
                kv: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``x`` [P, d] attend, within their own sequence, to the rows of ``kv`` [P, d]
        (themselves when None) that ``keys`` (``layout.keys(...)``) allows."""
        d = x.shape[-1]
        if kv is None:  # self-attention: one packed projection
            qkv = layout.to_groups(F.linear(x, self.in_proj_weight, self.in_proj_bias))
            parts = [block.chunk(3, dim=-1) for block in qkv]
        else:
            q = layout.to_groups(F.linear(x, self.in_proj_weight[:d], self.in_proj_bias[:d]))
            k_v = layout.to_groups(F.linear(kv, self.in_proj_weight[d:], self.in_proj_bias[d:]))
            parts = [(qb, *kvb.chunk(2, dim=-1)) for qb, kvb in zip(q, k_v)]
        out = []
        for (q, k, v), mask in zip(parts, keys):
            o = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v), attn_mask=mask)
            out.append(o.transpose(1, 2).reshape(q.shape))
        return self.out_proj(layout.from_groups(out))


class EncoderLayer(nn.Module):
    """x + drop(attn(norm1(x))), then x + drop(ff(norm2(x))); ff = linear2(relu(linear1))."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d, heads)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, layout: Packed, keys: list[torch.Tensor | None]) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.norm1(x), layout, keys))
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

    def forward(self, x: torch.Tensor, layout: Packed, keys: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Packed rows ``x`` [P, d]; ``keys`` the attendable keys (default: every valid token)."""
        keys = layout.all_keys if keys is None else keys
        for layer in self.layers:
            x = layer(x, layout, keys)
        return x
