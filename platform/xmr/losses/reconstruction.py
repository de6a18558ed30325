"""Masked reconstruction (mixer-MAE pre-training): MSE on the masked tokens only.

Each modality's error is averaged over its masked tokens and features; the two
modalities are averaged, so neither dominates by token count.
"""

from __future__ import annotations

import torch

from xmr.losses.registry import LossTerm, register_term


@register_term("reconstruction")
class Reconstruction(LossTerm):
    def forward(self, out, batch):
        if "recon_a" not in out:
            raise ValueError(f"the reconstruction term needs a model that reconstructs (model.name = "
                             f"{self.cfg.model.name!r} gives {sorted(out)})")
        per_modality = []
        for role in ("a", "b"):
            mask = out[f"recon_mask_{role}"].unsqueeze(-1).to(out[f"recon_{role}"].dtype)
            err = (out[f"recon_{role}"] - out[f"target_{role}"]).pow(2) * mask
            denom = mask.sum() * out[f"recon_{role}"].shape[-1]
            per_modality.append(err.sum() / denom.clamp(min=1))
        return torch.stack(per_modality).mean()
