"""A method = a model + the weighted sum of its loss terms.

The training loop (plain, or inside a Ray Train worker) only calls ``Method(batch)`` and
steps one optimiser over ``Method.parameters()``: term-owned parameters (class centers,
classifier, discriminator, critics) train and checkpoint with the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from xmr.config import Config
from xmr.losses.registry import Objective
from xmr.models.registry import build_model


class Method(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = build_model(cfg)
        self.objective = Objective(cfg)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training forward: returns {"loss": total, <term>: value, ...}."""
        return self.objective(self.model(batch), batch)
