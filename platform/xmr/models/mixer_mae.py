"""Cross-modal mixer with masked-autoencoder pre-training ("fuse then separate").

Pre-training: both modalities' tokens are projected to a shared width, tagged with
modality and position embeddings and concatenated into one fused sequence (the mixer);
a random ``mask_ratio`` of the fused tokens is hidden per sample; a transformer encodes
the visible tokens; a light decoder sees encoded tokens plus mask tokens and two heads
reconstruct each modality's original features at its masked positions.

Retrieval: the same encoder sees one modality alone (the other fully masked, i.e.
absent), tokens are attention-pooled and projected to the L2-normalised shared space.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xmr.models.encoders import AttentionPool, token_shape
from xmr.models.registry import register_model
from xmr.outputs import PairOutputs, Reconstruction


def _transformer(width: int, layers: int, heads: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout, batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


@register_model("mixer_mae")
class MixerMAE(nn.Module):
    families = ("pair", "category")
    provides = frozenset({"reconstruction"})

    @classmethod
    def fields_read(cls, cfg, outputs: frozenset[str]) -> set[str]:
        out = {"model.embed_dim", "model.hidden_dim", "model.num_layers", "model.num_heads", "model.dropout"}
        out |= {f"model.tokens_{r}" for r in ("a", "b") if len(cfg.model.dims.get(r, [0])) == 1 or not cfg.model.dims}
        if "reconstruction" in outputs:
            out |= {"model.mask_ratio", "model.decoder_layers"}
        return out

    def __init__(self, cfg, outputs: frozenset[str]) -> None:
        super().__init__()
        m = cfg.model
        self.mask_ratio = m.mask_ratio
        self.reconstruct = "reconstruction" in outputs
        self.shapes = {"a": token_shape(m.dims["a"], m.tokens_a), "b": token_shape(m.dims["b"], m.tokens_b)}
        h = m.hidden_dim
        self.proj = nn.ModuleDict({r: nn.Linear(d, h) for r, (_, d) in self.shapes.items()})
        self.pos = nn.ParameterDict({r: nn.Parameter(torch.randn(1, t, h) / math.sqrt(h))
                                     for r, (t, _) in self.shapes.items()})
        self.modality = nn.Parameter(torch.randn(2, h) / math.sqrt(h))
        self.encoder = _transformer(h, m.num_layers, m.num_heads, m.dropout)
        if self.reconstruct:  # the decoder exists for pre-training only; fine-tuning loads the encoder
            self.mask_token = nn.Parameter(torch.zeros(1, 1, h))
            self.decoder = _transformer(h, m.decoder_layers, m.num_heads, m.dropout)
            self.recon = nn.ModuleDict({r: nn.Linear(h, d) for r, (_, d) in self.shapes.items()})
        self.pool = AttentionPool(h)
        self.head = nn.Linear(h, m.embed_dim)

    def tokens(self, role: str, x: torch.Tensor) -> torch.Tensor:
        t, d = self.shapes[role]
        return x.reshape(x.shape[0], t, d)

    def _embed_tokens(self, role: str, tokens: torch.Tensor) -> torch.Tensor:
        index = 0 if role == "a" else 1
        return self.proj[role](tokens) + self.pos[role] + self.modality[index]

    def encode(self, role: str, x: torch.Tensor) -> torch.Tensor:
        """Retrieval embedding of one modality alone (the other fully masked)."""
        hidden = self.encoder(self._embed_tokens(role, self.tokens(role, x)))
        return F.normalize(self.head(self.pool(hidden)), dim=-1)

    def masked_reconstruction(self, batch) -> Reconstruction:
        """Fuse, mask, encode the visible tokens, decode, reconstruct both modalities."""
        ta, tb = self.tokens("a", batch["a"]), self.tokens("b", batch["b"])
        fused = torch.cat([self._embed_tokens("a", ta), self._embed_tokens("b", tb)], dim=1)
        bsz, n, width = fused.shape
        n_keep = max(1, int(round(n * (1 - self.mask_ratio))))
        order = torch.rand(bsz, n, device=fused.device).argsort(dim=1)
        keep = order[:, :n_keep]
        visible = fused.gather(1, keep.unsqueeze(-1).expand(-1, -1, width))
        encoded = self.encoder(visible)
        full = self.mask_token.expand(bsz, n, width).clone()
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, width), encoded)
        pos = torch.cat([self.pos["a"], self.pos["b"]], dim=1)
        decoded = self.decoder(full + pos)
        masked = torch.ones(bsz, n, dtype=torch.bool, device=fused.device)
        masked = masked.scatter(1, keep, False)
        n_a = ta.shape[1]
        return Reconstruction(recon={"a": self.recon["a"](decoded[:, :n_a]), "b": self.recon["b"](decoded[:, n_a:])},
                              target={"a": ta, "b": tb}, mask={"a": masked[:, :n_a], "b": masked[:, n_a:]})

    def forward(self, batch) -> PairOutputs:
        out = PairOutputs(emb_a=self.encode("a", batch["a"]), emb_b=self.encode("b", batch["b"]))
        if self.reconstruct:  # only when a loss term reads it (pre-training)
            out.reconstruction = self.masked_reconstruction(batch)
        return out
