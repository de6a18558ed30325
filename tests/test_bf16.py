"""The GPU's default path on CPU: every preset trains a few steps under bf16 autocast
(``optim.precision=bf16``, what ``auto`` picks on a GPU) with finite losses and gradients,
and then evaluates; so mixed-precision dtype errors surface here, without a GPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from xmr.checks import resolve
from xmr.config import load_config
from xmr.data.manifest import load_manifest
from xmr.data.sources.synth_category import SynthCategoryConfig, write_synth_category
from xmr.data.reader import loader_for
from xmr.method import Method
from xmr.tasks.evaluate import evaluate
from xmr.train.step import TrainStep

pytestmark = pytest.mark.timeout(180)

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "platform" / "xmr" / "presets").glob("*.yaml"))
SMALL = {"category": ["model.embed_dim=16", "model.hidden_dim=32", "data.batch_size=16"],
         "pair": ["model.embed_dim=16", "model.hidden_dim=16", "model.num_heads=2", "data.batch_size=16"],
         "vcmr": ["model.embed_dim=16", "model.num_heads=2", "data.batch_size=8"]}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, tiny_category_dataset, tiny_vcmr_dataset):
    root = tmp_path_factory.mktemp("bf16")
    pair = root / "pair"
    write_synth_category(str(pair), SynthCategoryConfig(n_classes=4, splits={"train": 48, "val": 16}, dim_a=8,
                                                        dim_b=8, seed=1), progress=False)
    hier = root / "hier"
    write_synth_category(str(hier), SynthCategoryConfig(n_classes=4, splits={"train": 48, "val": 16}, dim_a=8,
                                                        dim_b=8, hierarchy=2, seed=2), progress=False)
    return {"category": str(tiny_category_dataset), "vcmr": str(tiny_vcmr_dataset), "pair": str(pair),
            "hier": str(hier)}


def test_every_preset_is_covered():
    assert len(PRESETS) >= 9 and {"qacln", "sccmrl", "mnsgan", "cdaml", "mixer_mae", "mixer_mae_pretrain"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_and_evaluates_under_bf16_autocast(preset, datasets):
    task = load_config(preset).task
    data = datasets["hier" if preset == "cdaml" else task]
    cfg, _ = resolve(load_config(preset, [f"data.path={data}", "optim.precision=bf16", "optim.grad_clip=0",
                                          *SMALL[task]]))
    torch.manual_seed(0)
    method = Method(cfg)
    step = TrainStep(method, cfg, total_steps=10)
    batches = [b for _, b in zip(range(3), loader_for(cfg, cfg.data.train_split, train=True))]
    before = [p.detach().clone() for p in method.trainable_parameters()]
    for batch in batches:
        record = step(batch)
        assert all(math.isfinite(v) for v in record.values()), record
        grads = [p.grad for p in method.trainable_parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert all(g.dtype == torch.float32 for g in grads)  # autocast computes in bf16, parameters stay fp32
    assert any(not torch.equal(a, p) for a, p in zip(before, method.trainable_parameters()))
    metrics = evaluate(method, cfg, load_manifest(data), cfg.data.val_split)
    assert metrics and all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
