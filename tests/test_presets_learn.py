"""Each category / pair preset's loss falls and its retrieval metric rises on a small
synthetic problem with planted structure (a few hundred CPU steps)."""

import pytest
import torch

from train_helpers import batches, mean, preset_cfg, train
from xmr.data.sources.synth_category import SynthCategoryConfig, write_synth_category
from xmr.evaluation import MAIN_METRIC
from xmr.evaluation.category import evaluate_category
from xmr.method import Method

pytestmark = pytest.mark.timeout(300)

SMALL = ["model.embed_dim=32", "model.hidden_dim=64", "data.batch_size=64"]


@pytest.fixture(scope="module")
def category_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("cat")
    cfg = SynthCategoryConfig(n_classes=8, splits={"train": 640, "val": 160, "test": 160}, seed=3)
    write_synth_category(str(out), cfg, progress=False)
    return str(out)


@pytest.mark.parametrize("preset, steps", [("sccmrl", 150), ("mnsgan", 150), ("triplet_category", 150)])
def test_category_preset_learns(category_data, preset, steps):
    torch.manual_seed(0)
    cfg = preset_cfg(preset, category_data, *SMALL)
    method = Method(cfg)
    metric = MAIN_METRIC[cfg.task]
    before = evaluate_category(method.model, batches(cfg, "val", shuffle=False), cfg.task)[metric]
    losses = train(method, cfg, steps)
    after = evaluate_category(method.model, batches(cfg, "val", shuffle=False), cfg.task)[metric]
    print(f"{preset}: loss {mean(losses[:30]):.3f} -> {mean(losses[-30:]):.3f}, {metric} {before:.3f} -> {after:.3f}")
    assert mean(losses[-30:]) < 0.8 * mean(losses[:30])
    assert after > before + 0.15


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("pair")
    cfg = SynthCategoryConfig(n_classes=8, splits={"train": 640, "val": 160, "test": 160}, seq_len_a=6,
                              seq_len_b=6, instance_scale=1.2, seed=4)
    write_synth_category(str(out), cfg, progress=False)
    return str(out)


PAIR_SMALL = ["model.embed_dim=32", "model.hidden_dim=32", "model.num_layers=1", "data.batch_size=64"]


def test_triplet_pair_learns(pair_data):
    torch.manual_seed(0)
    cfg = preset_cfg("triplet_pair", pair_data, *PAIR_SMALL)
    method = Method(cfg)
    before = evaluate_category(method.model, batches(cfg, "val", shuffle=False), "pair")["r1_mean"]
    losses = train(method, cfg, 150)
    after = evaluate_category(method.model, batches(cfg, "val", shuffle=False), "pair")["r1_mean"]
    print(f"triplet_pair: loss {mean(losses[:30]):.3f} -> {mean(losses[-30:]):.3f}, r1 {before:.3f} -> {after:.3f}")
    assert mean(losses[-30:]) < 0.8 * mean(losses[:30])
    assert after > before + 0.1


def test_mixer_mae_pretrains_then_fine_tunes(pair_data, tmp_path):
    from xmr.checkpoint import save_checkpoint
    from xmr.models.registry import load_pretrained

    torch.manual_seed(0)
    pre_cfg = preset_cfg("mixer_mae_pretrain", pair_data, *PAIR_SMALL)
    pre = Method(pre_cfg)
    pre_losses = train(pre, pre_cfg, 120)
    print(f"mixer_mae_pretrain: reconstruction {mean(pre_losses[:20]):.3f} -> {mean(pre_losses[-20:]):.3f}")
    assert mean(pre_losses[-20:]) < 0.8 * mean(pre_losses[:20])
    save_checkpoint(tmp_path / "pre", pre, pre_cfg)

    cfg = preset_cfg("mixer_mae", pair_data, *PAIR_SMALL, f"model.pretrained={tmp_path / 'pre'}")
    method = Method(cfg)
    load_pretrained(method.model, cfg.model.pretrained)
    assert torch.equal(method.model.encoder.layers[0].linear1.weight, pre.model.encoder.layers[0].linear1.weight)
    before = evaluate_category(method.model, batches(cfg, "val", shuffle=False), "pair")["r1_mean"]
    losses = train(method, cfg, 150)
    after = evaluate_category(method.model, batches(cfg, "val", shuffle=False), "pair")["r1_mean"]
    print(f"mixer_mae: loss {mean(losses[:30]):.3f} -> {mean(losses[-30:]):.3f}, r1 {before:.3f} -> {after:.3f}")
    assert mean(losses[-30:]) < 0.8 * mean(losses[:30])
    assert after > before + 0.1


def test_pretrained_mismatch_is_a_clear_error(pair_data, tmp_path):
    from xmr.checkpoint import save_checkpoint
    from xmr.models.registry import load_pretrained

    small = preset_cfg("mixer_mae_pretrain", pair_data, *PAIR_SMALL)
    save_checkpoint(tmp_path / "pre", Method(small), small)
    wide = preset_cfg("mixer_mae", pair_data, "model.hidden_dim=64", "model.num_layers=1")
    with pytest.raises(ValueError, match="does not fit this model"):
        load_pretrained(Method(wide).model, str(tmp_path / "pre"))


@pytest.fixture(scope="module")
def hier_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("hier")
    cfg = SynthCategoryConfig(n_classes=12, hierarchy=4, splits={"train": 640, "val": 160, "test": 160}, seed=5)
    write_synth_category(str(out), cfg, progress=False)
    return str(out)


@pytest.mark.parametrize("extra", [[], ["model.attention=true", "model.tokens_a=4", "model.tokens_b=4"],
                                   ["model.hierarchical=false"]], ids=["hierarchical", "attention", "flat"])
def test_cdaml_learns(hier_data, extra):
    torch.manual_seed(0)
    cfg = preset_cfg("cdaml", hier_data, *SMALL, *extra)
    if not cfg.model.hierarchical:  # the flat-label variant trains on the finest labels only
        cfg.model.num_classes = cfg.model.num_classes[-1:]
    method = Method(cfg)
    before = evaluate_category(method.model, batches(cfg, "val", shuffle=False), "category")["map_mean"]
    losses = train(method, cfg, 150)
    after = evaluate_category(method.model, batches(cfg, "val", shuffle=False), "category")["map_mean"]
    print(f"cdaml {extra}: loss {mean(losses[:30]):.3f} -> {mean(losses[-30:]):.3f}, map {before:.3f} -> {after:.3f}")
    assert mean(losses[-30:]) < mean(losses[:30]) - 0.2
    assert after > before + 0.15
