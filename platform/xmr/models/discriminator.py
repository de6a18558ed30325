"""Modality discriminator and gradient reversal (MNS-GAN, CDAML).

The encoders play the generator: the discriminator learns which modality an embedding
came from, and the encoders learn to make that impossible (closing the modality gap).
"""

from __future__ import annotations

import torch
from torch import nn


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``-scale`` on the way back."""
    return _Reverse.apply(x, scale)


class ModalityDiscriminator(nn.Module):
    """MLP: embedding -> logit of "this came from modality b"."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden // 2),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden // 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)
