"""Center loss (SCCMRL's modality-consistency term; Wen et al. 2016).

One learnable center per (finest) class, shared by both modalities; each embedding is
pulled towards its class center: mean over embeddings of ½‖x − c_y‖².
"""

from __future__ import annotations

import torch
from torch import nn

from xmr.losses._pairs import finest
from xmr.losses.registry import LossTerm, register_term


@register_term("center")
class Center(LossTerm):
    reads = {"num_classes": "model.num_classes", "embed_dim": "model.embed_dim"}
    families = ("category",)
    label_kinds = ("single", "hierarchical")

    def __init__(self, num_classes: list[int], embed_dim: int) -> None:
        super().__init__()
        if not num_classes:
            raise ValueError("loss.lambdas.center > 0 needs labelled data (model.num_classes is empty)")
        self.centers = nn.Parameter(torch.randn(num_classes[-1], embed_dim) * 0.1)

    def per_anchor(self, out, batch, ctx):
        labels = batch["label"]
        if labels.is_floating_point():
            raise ValueError("the center loss needs single or hierarchical labels, not multi-hot labels")
        y = finest(labels)
        emb = torch.cat([out.emb_a, out.emb_b])
        return 0.5 * (emb - self.centers[torch.cat([y, y])]).pow(2).sum(dim=1)
