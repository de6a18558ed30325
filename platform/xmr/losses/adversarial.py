"""Modality adversarial loss: the discriminator and the encoders' attempt to fool it.

``grl`` (default): one BCE of the discriminator on gradient-reversed embeddings. The
discriminator descends it; the encoders receive ``-grl_scale`` × its gradient, i.e. they
ascend the discriminator's loss (fool it) in the same backward pass.
``flip``: the discriminator's BCE on detached embeddings, plus a fool BCE with flipped
modality labels computed through a frozen (detached) copy of the discriminator, so the
one backward trains each side on its own objective. The value is the sum of both.

Whether the game does anything is visible: every step reports the discriminator's BCE
(``disc_loss``; ln 2 ≈ 0.693 is chance) and accuracy (``disc_acc``), and its balance is
set by ``loss.adversarial.disc_lr`` (its learning rate: the discriminator's own optimiser group,
``param_groups``) and ``loss.adversarial.disc_steps`` (its updates per encoder step: ``after_step``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from xmr.distributed import gather_rows
from xmr.losses.registry import LossTerm, register_term
from xmr.models.discriminator import ModalityDiscriminator, grad_reverse


@register_term("adversarial")
class Adversarial(LossTerm):
    reads = {"embed_dim": "model.embed_dim", "hidden_dim": "model.hidden_dim", "mode": "loss.adversarial.mode",
             "grl_scale": "loss.adversarial.grl_scale", "disc_lr": "loss.adversarial.disc_lr",
             "disc_steps": "loss.adversarial.disc_steps"}

    def __init__(self, embed_dim: int, hidden_dim: int, mode: str, grl_scale: float, disc_lr: float | None,
                 disc_steps: int) -> None:
        super().__init__()
        self.discriminator = ModalityDiscriminator(embed_dim, hidden_dim)
        self.mode, self.grl_scale = mode, grl_scale
        self.disc_lr, self.disc_steps = disc_lr, disc_steps  # the game's balance
        self.last_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None  # for the extra updates

    @staticmethod
    def _modality_labels(emb_a: torch.Tensor, emb_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.cat([emb_a, emb_b])
        is_b = torch.cat([torch.zeros(emb_a.shape[0]), torch.ones(emb_b.shape[0])]).to(emb)
        return emb, is_b

    def discriminator_loss(self, emb_a: torch.Tensor, emb_b: torch.Tensor) -> torch.Tensor:
        """The discriminator's BCE alone on (detached) embeddings: its extra updates."""
        emb, is_b = self._modality_labels(emb_a.detach(), emb_b.detach())
        return F.binary_cross_entropy_with_logits(self.discriminator(emb), is_b)

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": list(self.discriminator.parameters()), "name": "discriminator",
                 "lr": self.disc_lr if self.disc_lr is not None else lr}]

    def after_step(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """``disc_steps - 1`` more updates of the discriminator alone on this step's (gathered,
        detached) embeddings; identical inputs on every rank keep the ranks in step."""
        if self.disc_steps <= 1 or self.last_embeddings is None:
            return {}
        disc = list(self.discriminator.parameters())
        emb_a, emb_b = self.last_embeddings
        value = float("nan")
        for _ in range(self.disc_steps - 1):
            loss = self.discriminator_loss(emb_a, emb_b)
            grads = torch.autograd.grad(loss, disc)
            optimizer.zero_grad(set_to_none=True)
            for p, g in zip(disc, grads):
                p.grad = g
            optimizer.step()  # only the discriminator has gradients
            value = float(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        return {"disc_extra_loss": value}

    def per_anchor(self, out, batch, ctx):
        if self.training and self.disc_steps > 1:  # the whole batch, so every rank takes the same extra steps
            self.last_embeddings = (gather_rows(out.emb_a.detach().float()), gather_rows(out.emb_b.detach().float()))
        emb, is_b = self._modality_labels(out.emb_a, out.emb_b)
        if self.mode == "grl":
            logits = self.discriminator(grad_reverse(emb, self.grl_scale))
            d_loss = F.binary_cross_entropy_with_logits(logits, is_b, reduction="none")
            value = d_loss
        else:
            logits = self.discriminator(emb.detach())
            d_loss = F.binary_cross_entropy_with_logits(logits, is_b, reduction="none")
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            fool_logits = functional_call(self.discriminator, frozen, (emb,))
            value = d_loss + F.binary_cross_entropy_with_logits(fool_logits, 1.0 - is_b, reduction="none")
        self.report("disc_loss", d_loss.mean())
        self.report("disc_acc", ((logits.detach() > 0).float() == is_b).float().mean())
        return value
