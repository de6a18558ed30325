"""The adversarial term: gradient reversal flips the encoders' gradient; flip mode trains
each side on its own objective in one backward."""

import pytest
import torch
import torch.nn.functional as F

from losses_helpers import embeddings, make_cfg, unit
from xmr.losses.registry import get_term
from xmr.models.discriminator import grad_reverse

pytestmark = pytest.mark.timeout(60)


def plain_bce(term, a, b):
    emb = torch.cat([a, b])
    target = torch.cat([torch.zeros(len(a)), torch.ones(len(b))])
    return F.binary_cross_entropy_with_logits(term.discriminator(emb), target)


def test_grad_reverse_is_identity_forward_and_negated_backward():
    x = torch.randn(4, 3, requires_grad=True)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    (g,) = torch.autograd.grad((y * torch.arange(3.0)).sum(), x)
    assert torch.equal(g, -0.5 * torch.arange(3.0).expand(4, 3))


def test_grl_flips_the_sign_reaching_the_encoders_only():
    torch.manual_seed(0)
    a_raw, b_raw, _ = embeddings(n=6)
    term = get_term("adversarial")(make_cfg(lambdas={"adversarial": 1.0}, grl_scale=1.0))
    params = list(term.discriminator.parameters())
    a, b = unit(a_raw), unit(b_raw)
    grl = torch.autograd.grad(term({"emb_a": a, "emb_b": b}, {}), [a_raw, b_raw, *params])
    ref = torch.autograd.grad(plain_bce(term, unit(a_raw), unit(b_raw)), [a_raw, b_raw, *params])
    assert torch.allclose(grl[0], -ref[0], atol=1e-6) and torch.allclose(grl[1], -ref[1], atol=1e-6)
    for g, r in zip(grl[2:], ref[2:]):  # the discriminator still descends its own loss
        assert torch.allclose(g, r, atol=1e-6)
    assert grl[0].abs().sum() > 0


def test_flip_mode_discriminator_learns_while_encoders_push_the_other_way():
    torch.manual_seed(0)
    a_raw, b_raw, _ = embeddings(n=8)
    b_raw = (b_raw.detach() + 2.0).requires_grad_()  # a modality gap the discriminator can see
    term = get_term("adversarial")(make_cfg(lambdas={"adversarial": 1.0}, adversarial_mode="flip"))
    opt = torch.optim.SGD(term.parameters(), lr=0.5)
    before = plain_bce(term, unit(a_raw), unit(b_raw)).item()
    for _ in range(30):
        opt.zero_grad()
        term({"emb_a": unit(a_raw), "emb_b": unit(b_raw)}, {}).backward()
        opt.step()
    assert plain_bce(term, unit(a_raw), unit(b_raw)).item() < before * 0.7  # D got better
    # Encoder gradient of the flip objective points against the discriminator's own loss.
    a_raw.grad = None
    loss = term({"emb_a": unit(a_raw), "emb_b": unit(b_raw)}, {})
    (g_flip,) = torch.autograd.grad(loss, a_raw)
    (g_disc,) = torch.autograd.grad(plain_bce(term, unit(a_raw), unit(b_raw)), a_raw)
    assert torch.sum(g_flip * g_disc) < 0
