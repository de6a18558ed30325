"""Modality adversarial loss: the discriminator and the encoders' attempt to fool it.

``grl`` (default): one BCE of the discriminator on gradient-reversed embeddings. The
discriminator descends it; the encoders receive ``-grl_scale`` × its gradient, i.e. they
ascend the discriminator's loss (fool it) in the same backward pass.
``flip``: the discriminator's BCE on detached embeddings, plus a fool BCE with flipped
modality labels computed through a frozen (detached) copy of the discriminator, so the
one backward trains each side on its own objective. The value is the sum of both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from xmr.losses.negatives import local_mean
from xmr.losses.registry import LossTerm, register_term
from xmr.models.discriminator import ModalityDiscriminator, grad_reverse


@register_term("adversarial")
class Adversarial(LossTerm):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.discriminator = ModalityDiscriminator(cfg.model.embed_dim, cfg.model.hidden_dim)

    def forward(self, out, batch):
        emb = torch.cat([out["emb_a"], out["emb_b"]])
        b = out["emb_a"].shape[0]
        is_b = torch.cat([torch.zeros(b), torch.ones(b)]).to(emb)
        if self.cfg.loss.adversarial_mode == "grl":
            logits = self.discriminator(grad_reverse(emb, self.cfg.loss.grl_scale))
            return local_mean(F.binary_cross_entropy_with_logits(logits, is_b, reduction="none"))
        d_loss = F.binary_cross_entropy_with_logits(self.discriminator(emb.detach()), is_b, reduction="none")
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        fool_logits = functional_call(self.discriminator, frozen, (emb,))
        fool = F.binary_cross_entropy_with_logits(fool_logits, 1.0 - is_b, reduction="none")
        return local_mean(d_loss + fool)
