"""Center loss (SCCMRL's modality-consistency term; Wen et al. 2016).

One learnable center per (finest) class, shared by both modalities; each embedding is
pulled towards its class center: mean over embeddings of ½‖x − c_y‖².
"""

from __future__ import annotations

import torch
from torch import nn

from xmr.losses._common import finest
from xmr.losses.negatives import local_mean
from xmr.losses.registry import LossTerm, register_term


@register_term("center")
class Center(LossTerm):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if not cfg.model.num_classes:
            raise ValueError("loss.lambdas.center > 0 needs labelled data (model.num_classes is empty)")
        self.centers = nn.Parameter(torch.randn(cfg.model.num_classes[-1], cfg.model.embed_dim) * 0.1)

    def forward(self, out, batch):
        labels = batch["label"]
        if labels.is_floating_point():
            raise ValueError("the center loss needs single or hierarchical labels, not multi-hot labels")
        y = finest(labels)
        emb = torch.cat([out["emb_a"], out["emb_b"]])
        c = self.centers[torch.cat([y, y])]
        return local_mean(0.5 * (emb - c).pow(2).sum(dim=1))
