"""Two independent modality encoders into one space (SCCMRL, MNS-GAN, triplet baselines)."""

from __future__ import annotations

import torch
from torch import nn

from xmr.models.encoders import ModalityEncoder
from xmr.models.registry import register_model


@register_model("dual_encoder")
class DualEncoder(nn.Module):
    def __init__(self, cfg) -> None:
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

    def forward(self, batch) -> dict[str, torch.Tensor]:
        return {"emb_a": self.encode("a", batch["a"]), "emb_b": self.encode("b", batch["b"])}
