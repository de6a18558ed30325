"""Label loss: a linear classifier on the shared space, cross-entropy on both modalities.

Hierarchical labels ([B, L], coarse → fine) get one classifier per level: on the model's
per-level embeddings (``levels_a`` / ``levels_b``, CDAML) when present, else all on
``emb_*``. The levels' losses are averaged, so λ keeps its meaning whatever the depth.
With fewer classifiers than label levels (the flat variant of hierarchical data) the
finest levels are used. Multi-hot labels use binary cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xmr.losses.negatives import local_mean
from xmr.losses.registry import LossTerm, register_term


@register_term("label")
class Label(LossTerm):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if not cfg.model.num_classes:
            raise ValueError("loss.lambdas.label > 0 needs labelled data (model.num_classes is empty)")
        d = cfg.model.embed_dim
        self.heads = nn.ModuleList(nn.Linear(d, n) for n in cfg.model.num_classes)

    def forward(self, out, batch):
        labels = batch["label"]
        if labels.is_floating_point():  # multi-hot
            logits = torch.cat([self.heads[-1](out["emb_a"]), self.heads[-1](out["emb_b"])])
            target = torch.cat([labels, labels]).float()
            return local_mean(F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1))
        levels = labels.reshape(labels.shape[0], -1)
        if levels.shape[1] < len(self.heads):
            raise ValueError(f"labels have {levels.shape[1]} levels but model.num_classes has {len(self.heads)}")
        levels = levels[:, -len(self.heads):]  # fewer heads than levels: the finest ones (flat variant)
        per_level = []
        for i, head in enumerate(self.heads):
            emb_a = out["levels_a"][i] if "levels_a" in out else out["emb_a"]
            emb_b = out["levels_b"][i] if "levels_b" in out else out["emb_b"]
            logits = torch.cat([head(emb_a), head(emb_b)])
            y = torch.cat([levels[:, i], levels[:, i]])
            per_level.append(F.cross_entropy(logits, y, reduction="none"))
        return local_mean(torch.stack(per_level).mean(dim=0))
