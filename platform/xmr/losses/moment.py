"""L_ML (QACLN λ2, Eq. 19): cross-entropy of the ConvSE start and end logits on the clip
labels (padding masked by the model), start and end averaged.

Reports ``ce_over_chance``: the cross-entropy over log(valid clips), the loss of a uniform
guess. Near 1 the localisation head has not learnt (issue 11: with the paper's λ2 = 0.01
and a short schedule it stays there on some seeds).
"""

from __future__ import annotations

import torch.nn.functional as F

from xmr.losses.registry import LossTerm, register_term


@register_term("moment")
class MomentLocalisation(LossTerm):
    families = ("vcmr",)

    def per_anchor(self, out, batch, ctx):
        start = F.cross_entropy(out.start_logits, batch["st"], reduction="none")
        end = F.cross_entropy(out.end_logits, batch["ed"], reduction="none")
        ce = (start + end) / 2
        chance = out.clip_mask.sum(dim=1).clamp(min=2).float().log()
        self.report("ce_over_chance", (ce.detach() / chance).mean())
        return ce
