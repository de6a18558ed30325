"""L_ML (QACLN λ2): cross-entropy of the ConvSE start and end logits on the clip labels
(padding masked by the model), start and end averaged."""

from __future__ import annotations

import torch.nn.functional as F

from xmr.losses.negatives import local_mean
from xmr.losses.registry import LossTerm, register_term


@register_term("moment")
class MomentLocalisation(LossTerm):
    def forward(self, out, batch):
        start = F.cross_entropy(out["start_logits"], batch["st"], reduction="none")
        end = F.cross_entropy(out["end_logits"], batch["ed"], reduction="none")
        return local_mean((start + end) / 2)
