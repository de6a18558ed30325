"""Label loss: a classifier on the shared space, cross-entropy on both modalities.

A cosine classifier with a scale (NormFace, Wang et al. 2017): logits = s · cos(x, w_c).
Why: the embeddings are L2-normalised, so a plain linear head sees logits bounded by
‖w_c‖ and learns almost nothing in a short run (issue 11: cross-entropy 1.93 against chance
2.30 while retrieval mAP was 0.97); with ``loss.label.scale`` s in NormFace's 16–30 range
the softmax can become confident. Default 16.

Hierarchical labels ([B, L], coarse → fine) get one classifier per level, on the model's
per-level embeddings (``levels_a`` / ``levels_b``, CDAML) when present, else all on
``emb_*``. Levels are summed with ``loss.label.level_weights`` (empty: 1 each), so the finest
level keeps weight 1 whatever the depth and a flat model (one classifier, the finest
level) and a hierarchical one give the fine level the same weight. With fewer classifiers
than label levels (the flat variant of hierarchical data) the finest levels are used.
Multi-hot labels use binary cross-entropy on the same scaled cosines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xmr.losses.registry import LossTerm, register_term


class CosineClassifier(nn.Module):
    """s · cos(x, w_c) for every class c."""

    def __init__(self, dim: int, n_classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) / dim ** 0.5)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).T


@register_term("label")
class Label(LossTerm):
    reads = {"num_classes": "model.num_classes", "embed_dim": "model.embed_dim", "scale": "loss.label.scale",
             "level_weights": "loss.label.level_weights"}
    families = ("category",)
    label_kinds = ("single", "hierarchical", "multi")

    def __init__(self, num_classes: list[int], embed_dim: int, scale: float, level_weights: list[float]) -> None:
        super().__init__()
        if not num_classes:
            raise ValueError("loss.lambdas.label > 0 needs labelled data (model.num_classes is empty)")
        if level_weights and len(level_weights) != len(num_classes):
            raise ValueError(f"loss.label.level_weights = {level_weights}: one weight per label level "
                             f"(model.num_classes = {num_classes})")
        self.heads = nn.ModuleList(CosineClassifier(embed_dim, n, scale) for n in num_classes)
        self.level_weights = [float(w) for w in level_weights] or [1.0] * len(num_classes)

    def per_anchor(self, out, batch, ctx):
        labels = batch["label"]
        if labels.is_floating_point():  # multi-hot
            logits = torch.cat([self.heads[-1](out.emb_a), self.heads[-1](out.emb_b)])
            target = torch.cat([labels, labels]).float()
            return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1)
        levels = labels.reshape(labels.shape[0], -1)
        if levels.shape[1] < len(self.heads):
            raise ValueError(f"labels have {levels.shape[1]} levels but model.num_classes has {len(self.heads)}")
        levels = levels[:, -len(self.heads):]  # fewer heads than levels: the finest ones (flat variant)
        total = 0.0
        for i, (head, weight) in enumerate(zip(self.heads, self.level_weights)):
            emb_a = out.levels_a[i] if out.levels_a is not None else out.emb_a
            emb_b = out.levels_b[i] if out.levels_b is not None else out.emb_b
            ce = F.cross_entropy(torch.cat([head(emb_a), head(emb_b)]), torch.cat([levels[:, i], levels[:, i]]),
                                 reduction="none")
            self.report(f"ce_level{i}" if len(self.heads) > 1 else "ce", ce.mean())
            total = total + weight * ce
        return total
