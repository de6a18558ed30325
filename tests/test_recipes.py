"""docs/design.md's recipes, followed: a new loss term is one class (its file) and a new task
family one class plus its registry line; nothing else of the library changes."""

from __future__ import annotations

import pytest
import torch

from xmr.checks import check, resolve
from xmr.config import ConfigError, load_config
from xmr.data.manifest import load_manifest
from xmr.losses import registry
from xmr.losses.registry import LossTerm, register_term
from xmr.method import Method
from xmr.tasks import FAMILIES
from xmr.tasks.category import CategoryFamily
from xmr.tasks.evaluate import evaluate
from xmr.train.step import TrainStep

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def throwaway_term():
    """Recipe "a loss term": the class below is the whole change (it would be its own file)."""

    @register_term("agreement")
    class Agreement(LossTerm):
        """Pulls each pair's two embeddings together: 1 − cos(a_i, b_i)."""

        reads = {"weight": "loss.adversarial.grl_scale"}  # any declared field; the factory passes exactly these
        families = ("category", "pair")

        def __init__(self, weight: float) -> None:
            super().__init__()
            self.weight = weight

        def per_anchor(self, out, batch, ctx):
            cos = (out.emb_a * out.emb_b).sum(dim=1)
            self.report("mean_cos", cos.mean())
            return self.weight * (1 - cos)

    yield Agreement
    registry._TERMS.pop("agreement")


def test_a_new_loss_term_is_one_class(throwaway_term, tiny_category_dataset):
    cfg, _ = resolve(load_config("sccmrl", [f"data.path={tiny_category_dataset}", "model.embed_dim=8",
                                            "model.hidden_dim=16", "loss.lambdas.agreement=0.5",
                                            "loss.grl_scale=2.0", "tracking.grad_share_every=1"]))
    check(cfg)  # its declared field is live, so the inert-setting check accepts it
    torch.manual_seed(0)
    method = Method(cfg)
    assert isinstance(method.objective.terms["agreement"], throwaway_term)
    assert method.objective.terms["agreement"].weight == 2.0
    from xmr.data.reader import loader_for

    step = TrainStep(method, cfg, total_steps=2)
    batch = next(iter(loader_for(cfg, "train", train=True)))
    records = [step(batch) for _ in range(2)]  # gradient shares from the second step on
    assert {"agreement", "agreement_mean_cos", "grad_share_agreement"} <= set(records[-1])
    off = load_config("sccmrl", [f"data.path={tiny_category_dataset}", "loss.grl_scale=2.0"])
    off, _ = resolve(off)
    with pytest.raises(ConfigError, match="agreement"):  # without the term its field is inert, and named
        check(off)


class ToyFamily(CategoryFamily):
    """Recipe "a task family": a family whose relevance is the class, scored by P@10 alone."""

    name = "toy"
    main_metric = "p10_mean"
    extends = ("category",)  # the category models and loss terms fit it

    def score(self, shares, cfg):
        full = super().score(shares, cfg)
        return {"p10_mean": full["p10_mean"], "toy": 1.0}


def test_a_new_task_family_is_one_class_and_its_registry_line(tiny_category_dataset):
    FAMILIES["toy"] = ToyFamily()  # the registry line (xmr/tasks/__init__.py)
    try:
        cfg, manifest = resolve(load_config("sccmrl", [f"data.path={tiny_category_dataset}", "model.embed_dim=8",
                                                       "model.hidden_dim=16"]))
        cfg.task = "toy"  # the config's task literal would name it; set directly here
        method = Method(cfg)
        metrics = evaluate(method, cfg, load_manifest(cfg.data.path), "val")
        assert metrics["toy"] == 1.0 and set(metrics) == {"p10_mean", "toy"}
        from xmr.train.driver import prepare

        cfg2 = load_config("sccmrl", [f"data.path={tiny_category_dataset}"])
        cfg2.task = "toy"
        _, metric, _ = prepare(cfg2, run_name="toy")
        assert metric == "p10_mean"  # checkpoints and sweeps select by the family's metric
    finally:
        FAMILIES.pop("toy")
