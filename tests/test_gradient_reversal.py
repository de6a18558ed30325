"""The adversarial term: gradient reversal flips the encoders' gradient; flip mode trains
each side on its own objective in one backward."""

import pytest
import torch
import torch.nn.functional as F

from losses_helpers import embeddings, make_cfg, pair, term, unit
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
    adv = term("adversarial", make_cfg(lambdas={"adversarial": 1.0}, adversarial={"grl_scale": 1.0}))
    params = list(adv.discriminator.parameters())
    a, b = unit(a_raw), unit(b_raw)
    grl = torch.autograd.grad(adv(pair(a, b), {}), [a_raw, b_raw, *params])
    ref = torch.autograd.grad(plain_bce(adv, unit(a_raw), unit(b_raw)), [a_raw, b_raw, *params])
    assert torch.allclose(grl[0], -ref[0], atol=1e-6) and torch.allclose(grl[1], -ref[1], atol=1e-6)
    for g, r in zip(grl[2:], ref[2:]):  # the discriminator still descends its own loss
        assert torch.allclose(g, r, atol=1e-6)
    assert grl[0].abs().sum() > 0


def test_flip_mode_discriminator_learns_while_encoders_push_the_other_way():
    torch.manual_seed(0)
    a_raw, b_raw, _ = embeddings(n=8)
    b_raw = (b_raw.detach() + 2.0).requires_grad_()  # a modality gap the discriminator can see
    adv = term("adversarial", make_cfg(lambdas={"adversarial": 1.0}, adversarial={"mode": "flip"}))
    opt = torch.optim.SGD(adv.parameters(), lr=0.5)
    before = plain_bce(adv, unit(a_raw), unit(b_raw)).item()
    for _ in range(30):
        opt.zero_grad()
        adv(pair(unit(a_raw), unit(b_raw)), {}).backward()
        opt.step()
    assert plain_bce(adv, unit(a_raw), unit(b_raw)).item() < before * 0.7  # D got better
    # Encoder gradient of the flip objective points against the discriminator's own loss.
    a_raw.grad = None
    loss = adv(pair(unit(a_raw), unit(b_raw)), {})
    (g_flip,) = torch.autograd.grad(loss, a_raw)
    (g_disc,) = torch.autograd.grad(plain_bce(adv, unit(a_raw), unit(b_raw)), a_raw)
    assert torch.sum(g_flip * g_disc) < 0


def test_discriminator_reports_its_loss_and_accuracy():
    a_raw, b_raw, _ = embeddings(n=8)
    adv = term("adversarial", make_cfg(lambdas={"adversarial": 1.0}))
    a, b = unit(a_raw), unit(b_raw)
    adv(pair(a, b), {})
    logits = adv.discriminator(torch.cat([a, b]))
    target = torch.cat([torch.zeros(8), torch.ones(8)])
    assert adv.diagnostics["disc_loss"].item() == pytest.approx(plain_bce(adv, a, b).item(), abs=1e-6)
    assert adv.diagnostics["disc_acc"].item() == pytest.approx(((logits > 0).float() == target).float().mean().item())


def _game(disc_lr, disc_steps, steps=40):
    """Frozen-gap embeddings (a constant offset between the modalities) through the training
    step: how low the discriminator's BCE gets."""
    from xmr.method import Method
    from xmr.train.step import TrainStep

    cfg = make_cfg(lambdas={"multineg": 1.0, "adversarial": 0.1}, adversarial={"disc_lr": disc_lr, "disc_steps": disc_steps})
    cfg.model.name, cfg.model.dims = "dual_encoder", {"a": [8], "b": [6]}
    torch.manual_seed(0)
    method = Method(cfg)
    step = TrainStep(method, cfg, total_steps=steps)
    g = torch.Generator().manual_seed(1)
    records = []
    for _ in range(steps):
        batch = {"a": torch.randn(32, 8, generator=g) + 3.0, "b": torch.randn(32, 6, generator=g),
                 "label": torch.randint(0, 5, (32,), generator=g), "index": torch.arange(32)}
        records.append(step(batch))
    groups = {grp["name"]: grp for grp in step.optimizer.param_groups}
    return records, groups


def test_the_games_balance_is_configurable():
    """loss.adversarial.disc_lr is the discriminator's own learning rate; loss.adversarial.disc_steps its updates
    per encoder step. A stronger discriminator wins the game (lower BCE, higher accuracy)."""
    weak, groups = _game(None, 1)
    assert groups["discriminator"]["initial_lr"] == groups["model"]["initial_lr"] == 1e-3
    strong, groups = _game(1e-2, 5)
    assert groups["discriminator"]["initial_lr"] == 1e-2
    tail = lambda rs, k: sum(r[k] for r in rs[-10:]) / 10  # noqa: E731
    assert "adversarial_disc_extra_loss" in strong[-1] and "adversarial_disc_extra_loss" not in weak[-1]
    assert tail(strong, "adversarial_disc_loss") < tail(weak, "adversarial_disc_loss") - 0.05
    assert tail(strong, "adversarial_disc_acc") > tail(weak, "adversarial_disc_acc")
