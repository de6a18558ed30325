"""Two independent modality encoders into one space (SCCMRL, MNS-GAN, triplet baselines)."""

from __future__ import annotations

import torch
from torch import nn

from xmr.models.encoders import ModalityEncoder, sequence_encoder
from xmr.models.registry import register_model
from xmr.outputs import PairOutputs


@register_model("dual_encoder")
class DualEncoder(nn.Module):
    families = ("category", "pair")

    @classmethod
    def fields_read(cls, cfg, outputs: frozenset[str]) -> set[str]:
        out = {"model.embed_dim", "model.hidden_dim", "model.encoder", "model.num_layers", "model.dropout"}
        for role in ("a", "b"):
            shape = cfg.model.dims.get(role)  # unknown before the config is resolved: maybe read
            if shape is None or sequence_encoder(shape, cfg.model.encoder):
                out.add("model.num_heads")
                if shape is None or len(shape) == 1:
                    out.add(f"model.tokens_{role}")
        return out

    def __init__(self, cfg, outputs: frozenset[str]) -> None:  # it computes no optional output
        super().__init__()
        dims = cfg.model.dims
        for role in ("a", "b"):
            if role not in dims:
                raise ValueError(f"model.dims has no {role!r} modality (got {sorted(dims)}): dual_encoder needs a and b")
        self.enc = nn.ModuleDict({"a": ModalityEncoder(dims["a"], cfg, cfg.model.tokens_a),
                                  "b": ModalityEncoder(dims["b"], cfg, cfg.model.tokens_b)})

    def encode(self, role: str, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of one modality (retrieval entry point)."""
        return self.enc[role](x)

    def forward(self, batch) -> PairOutputs:
        return PairOutputs(emb_a=self.encode("a", batch["a"]), emb_b=self.encode("b", batch["b"]))
