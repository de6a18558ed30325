"""No inert configuration (issue 11): every config field, set away from its default, changes
what is built or run (the model, a loss value, the loader, the training step, the Ray
trainer, the run's set-up), or ``xmr.checks.check`` rejects it where it does not apply.

``LIVE`` maps every leaf field to (base config, new value, what must change); a field
added to the config without an entry here fails ``test_every_field_has_a_probe``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_category
from xmr.checks import check, leaf_fields
from xmr.config import ConfigError, load_config, with_values
from xmr.checks import resolve
from xmr.data.sources.synth_category import SynthCategoryConfig, write_synth_category

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_category_dataset, tiny_vcmr_dataset):
    root = tmp_path_factory.mktemp("live")
    vec = root / "vec"
    write_synth_category(str(vec), SynthCategoryConfig(n_classes=4, splits={"train": 48, "val": 16}, dim_a=8,
                                                       dim_b=8, seed=1), progress=False)
    hier = write_tiny_category(root / "hier", kind="hierarchical")
    return {"cat": str(tiny_category_dataset), "vcmr": str(tiny_vcmr_dataset), "vec": str(vec), "hier": str(hier),
            "root": root}


SMALL = ["model.embed_dim=8", "model.hidden_dim=16", "data.batch_size=16"]
BASES = {  # name: (preset, dataset, overrides)
    "sccmrl": ("sccmrl", "cat", [*SMALL, "negatives.k=64"]),
    "bank": ("sccmrl", "cat", [*SMALL, "negatives.k=64", "negatives.memory_bank=64"]),
    "bank0": ("sccmrl", "cat", [*SMALL, "negatives.k=64", "negatives.memory_bank=64", "negatives.bank_warmup_steps=0"]),
    "k2": ("sccmrl", "cat", [*SMALL, "negatives.k=2"]),
    "mnsgan": ("mnsgan", "cat", SMALL),
    "triplet": ("triplet_category", "cat", SMALL),
    "pair": ("triplet_pair", "vec", ["model.embed_dim=8", "model.hidden_dim=8", "model.num_heads=2", "data.batch_size=16"]),
    "pair_vec": ("mixer_mae", "vec", ["model.embed_dim=8", "model.hidden_dim=8", "model.num_heads=2", "data.batch_size=16"]),
    "pretrain": ("mixer_mae_pretrain", "vec", ["model.embed_dim=8", "model.hidden_dim=8", "model.num_heads=2",
                                               "data.batch_size=16"]),
    "cdaml": ("cdaml", "hier", SMALL),
    "cdaml_vec": ("cdaml", "vec", [*SMALL, "model.hierarchical=false", "model.attention=true"]),
    "qacln": ("qacln", "vcmr", ["model.embed_dim=8", "model.num_heads=2", "data.batch_size=8"]),
    "netvlad": ("qacln", "vcmr", ["model.embed_dim=8", "model.num_heads=2", "data.batch_size=8", "model.netvlad=true"]),
    "gpu": ("sccmrl", "cat", [*SMALL, "resources.use_gpu=true"]),
}


def base(data, name):
    preset, dataset, overrides = BASES[name]
    cfg = load_config(preset, [f"data.path={data[dataset]}", f"storage.root={data['root'] / 'runs'}", *overrides])
    cfg, _ = resolve(cfg)
    return check(cfg)


# --------------------------------------------------------------------------- what changes


def _fixed_batches(cfg, n=3, split=None):
    from xmr.data.reader import loader_for

    loader = loader_for(cfg, split or cfg.data.train_split, train=True)
    return [b for _, b in zip(range(n), loader)]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj.detach().float().flatten()]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in _tensors(obj[k])]
    return []


def observe_forward(cfg):
    from xmr.method import Method

    torch.manual_seed(0)
    method = Method(cfg).train()
    torch.manual_seed(1)
    out = method(_fixed_batches(cfg, 1)[0])
    return {k: float(v.detach()) for k, v in out.items() if not k.startswith("_")}, \
        {k: (tuple(v.shape), v.dtype) for k, v in method.state_dict().items()}


def observe_steps(cfg):
    from xmr.method import Method
    from xmr.train.step import TrainStep

    torch.manual_seed(0)
    method = Method(cfg)
    step = TrainStep(method, cfg, total_steps=6)
    torch.manual_seed(1)
    records = [step(b) for b in _fixed_batches(cfg, 3)]
    return torch.cat([p.detach().float().flatten() for p in method.parameters()]), sorted(records[-1])


def observe_loader(cfg):
    from xmr.data.reader import loader_for

    loader = loader_for(cfg, cfg.data.train_split, train=True)
    attrs = (loader.num_workers, loader.on_bad_sample, loader.endpoint_url, loader.kw)
    return attrs, torch.cat(_tensors(next(iter(loader))))


def observe_eval(cfg):
    from xmr.data.manifest import load_manifest
    from xmr.method import Method
    from xmr.data.reader import loader_for
    from xmr.tasks.evaluate import evaluate

    manifest = load_manifest(cfg.data.path)
    torch.manual_seed(0)
    method = Method(cfg)
    sizes = [len(b["index"]) for b in loader_for(cfg, cfg.data.val_split, manifest=manifest)]
    return evaluate(method, cfg, manifest, cfg.data.val_split), sizes


def observe_schedule(cfg):
    from xmr.train.step import schedule

    return schedule(cfg, 10)


def observe_trainer(cfg):
    from xmr.train.driver import build_trainer

    trainer = build_trainer(cfg, cfg.storage.checkpoint_metric or "map_mean", cfg.storage.checkpoint_mode)
    run = trainer.run_config
    return (repr(trainer.scaling_config), run.name, run.storage_path, repr(run.failure_config),
            repr(run.checkpoint_config))


def observe_prepare(cfg):
    from xmr.train.driver import prepare

    cfg = copy.deepcopy(cfg)
    cfg.storage.run_name = cfg.storage.run_name or ""
    prepared, metric, mode = prepare(cfg)
    return prepared.storage.run_name.split("-")[0], prepared.storage.root, metric


def observe_address(cfg):
    from xmr.train.driver import cluster_address

    return cluster_address(cfg)


def observe_progress(cfg):
    from xmr.train.progress import EpochProgress

    p = EpochProgress.for_run(cfg, steps=10, epoch=0, enabled=True)
    return p.every_s, p.enabled


def observe_spec(cfg):
    import yaml

    from xmr.compare.spec import load_spec

    path = Path(cfg.storage.root) / "spec.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"name": "s", "dataset": {"path": cfg.data.path}, "metric": "map_mean",
                                    "common": [f"data.test_split={cfg.data.test_split}", *SMALL],
                                    "variants": {"v": {"preset": "sccmrl"}}}))
    return load_spec(str(path)).split


def observe_built(cfg):
    from xmr.method import Method

    method = Method(cfg)
    return sorted((n, getattr(t, "gather", None)) for n, t in method.objective.terms.items()), \
        getattr(method.model, "gather", None)


def observe_patience(cfg):
    from xmr.train.step import patience_exhausted

    plateau = [{"epoch": e, "map_mean": v} for e, v in enumerate([0.1, 0.5, 0.5, 0.4, 0.3, 0.2])]
    return patience_exhausted(plateau, "map_mean", "max", cfg.optim.patience)


def observe_pretrained(cfg):
    from xmr.train.fit import fit_in_process

    run = fit_in_process(cfg, epochs=1, max_steps_per_epoch=1)
    return run.history[0]


def observe_saved(cfg):
    """Bytes the objective keeps for backward (what ``loss.chunk_mb`` bounds)."""
    from xmr.method import Method

    torch.manual_seed(0)
    method = Method(cfg).train()
    batch = _fixed_batches(cfg, 1)[0]
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    out = method.model(batch)
    from xmr.losses.registry import TermContext

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        method.objective(out, batch, TermContext(targets=method.family.targets(batch)))
    return sum(saved)


def observe_tracking(cfg):
    """Whether and where a run tracks, and under which parent."""
    import uuid

    from xmr.train.runfs import RunDir
    from xmr.train.tracking import Tracker, tracking_uri

    run = RunDir(str(Path(cfg.storage.root) / "tracked"), uuid.uuid4().hex[:8])
    tracker = Tracker.for_run(cfg, run, say=lambda *_: None)
    parent = None
    if tracker.active:
        parent = tracker._client().get_run(tracker.run_id).data.tags.get("mlflow.parentRunId")
    return tracker.active, tracking_uri(cfg, cfg.tracking.folder or run.uri()), parent


OBSERVERS = {"forward": observe_forward, "steps": observe_steps, "loader": observe_loader, "eval": observe_eval,
             "schedule": observe_schedule, "trainer": observe_trainer, "prepare": observe_prepare,
             "address": observe_address, "progress": observe_progress, "spec": observe_spec, "built": observe_built,
             "pretrained": observe_pretrained, "patience": observe_patience, "saved": observe_saved,
             "tracking": observe_tracking}

PRETRAINED = "<pretrained>"
LIVE = {
    "method": ("sccmrl", "mymethod", "prepare"),
    "task": ("pair", "category", "forward"),
    "seed": ("sccmrl", 1, "forward"),
    "data.path": ("sccmrl", "<hier>", "loader"),
    "data.train_split": ("sccmrl", "val", "loader"),
    "data.val_split": ("sccmrl", "train", "eval"),
    "data.test_split": ("sccmrl", "val", "spec"),
    "data.batch_size": ("sccmrl", 8, "loader"),
    "data.eval_batch_size": ("sccmrl", 5, "eval"),
    "data.num_workers": ("sccmrl", 1, "loader"),
    "data.split_mode": ("sccmrl", "sample", "loader"),
    "data.on_bad_sample": ("sccmrl", "skip", "loader"),
    "data.max_clips": ("qacln", 3, "loader"),
    "data.max_query_tokens": ("qacln", 2, "loader"),
    "data.label_noise": ("sccmrl", 0.5, "loader"),
    "data.endpoint_url": ("sccmrl", "http://127.0.0.1:9", "loader"),
    "model.name": ("sccmrl", "mixer_mae", "forward"),
    "model.embed_dim": ("sccmrl", 12, "forward"),
    "model.hidden_dim": ("sccmrl", 24, "forward"),
    "model.encoder": ("sccmrl", "transformer", "forward"),
    "model.num_layers": ("sccmrl", 3, "forward"),
    "model.num_heads": ("sccmrl", 2, "forward"),
    "model.dropout": ("sccmrl", 0.5, "forward"),
    "model.mask_ratio": ("pretrain", 0.25, "forward"),
    "model.decoder_layers": ("pretrain", 2, "forward"),
    "model.tokens_a": ("pair", 2, "forward"),
    "model.tokens_b": ("pair", 2, "forward"),
    "model.pretrained": ("pair_vec", PRETRAINED, "pretrained"),
    "model.hierarchical": ("cdaml", False, "forward"),
    "model.attention": ("cdaml", True, "forward"),
    "model.query_layers": ("qacln", 1, "forward"),
    "model.query_fusion": ("qacln", False, "forward"),
    "model.netvlad": ("qacln", True, "forward"),
    "model.netvlad_clusters": ("netvlad", 3, "forward"),
    "model.conv_kernel": ("qacln", 3, "forward"),
    "model.max_moment_clips": ("qacln", 1, "eval"),
    "model.top_videos": ("qacln", 1, "eval"),
    "model.dims": ("sccmrl", {"a": [8], "b": [4, 2]}, "forward"),
    "model.num_classes": ("sccmrl", [6], "forward"),
    "model.label_kind": ("bank", "hierarchical", "forward"),  # the bank stores label paths
    "loss.lambdas": ("sccmrl", {"supcon": 1.0, "center": 0.5, "label": 2.0}, "forward"),
    "loss.temperature": ("sccmrl", 0.5, "forward"),
    "loss.margin": ("triplet", 0.5, "forward"),
    "loss.vr_hinge.margin": ("qacln", 0.5, "forward"),
    "loss.polynomial.pos": ("cdaml", [1.0, -0.5], "forward"),
    "loss.polynomial.neg": ("cdaml", [1.0, 0.5], "forward"),
    "loss.adversarial.mode": ("mnsgan", "flip", "forward"),
    "loss.adversarial.grl_scale": ("mnsgan", 3.0, "steps"),
    "loss.adversarial.disc_lr": ("mnsgan", 0.05, "steps"),
    "loss.adversarial.disc_steps": ("mnsgan", 3, "steps"),
    "loss.label.scale": ("sccmrl", 30.0, "forward"),
    "loss.label.level_weights": ("cdaml", [0.5, 2.0], "forward"),
    "loss.vr_hinge.query_negatives": ("qacln", True, "forward"),
    "loss.video_cl.k": ("qacln", 1, "forward"),
    "negatives.k": ("k2", 1, "forward"),
    "negatives.strategy": ("k2", "hardest", "forward"),
    "negatives.gather": ("qacln", False, "built"),  # its effect needs 2 ranks: tests/test_losses_distributed.py
    "negatives.memory_bank": ("sccmrl", 32, "forward"),
    "negatives.bank_warmup_steps": ("bank", 0, "steps"),
    "negatives.momentum": ("bank0", 0.5, "steps"),
    "optim.optimizer": ("sccmrl", "sgd", "steps"),
    "optim.lr": ("sccmrl", 0.01, "steps"),
    "optim.weight_decay": ("sccmrl", 0.5, "steps"),
    "optim.epochs": ("sccmrl", 3, "schedule"),
    "optim.warmup_steps": ("sccmrl", 4, "steps"),
    "optim.scheduler": ("sccmrl", "constant", "steps"),
    "optim.grad_clip": ("sccmrl", 1e-3, "steps"),
    "optim.precision": ("sccmrl", "bf16", "steps"),
    "optim.max_steps_per_epoch": ("sccmrl", 2, "schedule"),
    "optim.patience": ("sccmrl", 1, "patience"),
    "resources.num_workers": ("sccmrl", 2, "trainer"),
    "resources.use_gpu": ("sccmrl", True, "trainer"),
    "resources.cpus_per_worker": ("sccmrl", 0.5, "trainer"),
    "resources.gpus_per_worker": ("gpu", 0.5, "trainer"),
    "resources.placement_strategy": ("sccmrl", "SPREAD", "trainer"),
    "resources.address": ("sccmrl", "127.0.0.1:6379", "address"),
    "storage.root": ("sccmrl", "<other-root>", "prepare"),
    "storage.run_name": ("sccmrl", "named", "prepare"),
    "storage.keep_checkpoints": ("sccmrl", 5, "trainer"),
    "storage.checkpoint_metric": ("sccmrl", "map100_mean", "prepare"),
    "storage.checkpoint_mode": ("sccmrl", "min", "trainer"),
    "storage.max_failures": ("sccmrl", 7, "trainer"),
    "tracking.grad_share_every": ("sccmrl", 1, "steps"),
    "tracking.progress_every_s": ("sccmrl", 5.0, "progress"),
    "tracking.enabled": ("sccmrl", False, "tracking"),
    "tracking.uri": ("sccmrl", "<other-db>", "tracking"),
    "tracking.folder": ("sccmrl", "<other-root>", "tracking"),
    "tracking.parent_run_id": ("sccmrl", "0123456789abcdef", "tracking"),
    "loss.chunk_mb": ("sccmrl", 1e-4, "saved"),
}

# Where a field does not apply, the check says so (field, base, value).
REJECTED = [
    ("data.max_clips", "sccmrl", 3), ("data.max_query_tokens", "sccmrl", 2), ("data.label_noise", "qacln", 0.3),
    ("model.mask_ratio", "sccmrl", 0.5), ("model.decoder_layers", "pair_vec", 2),
    ("model.tokens_b", "sccmrl", 2), ("model.hierarchical", "sccmrl", True), ("model.attention", "sccmrl", True),
    ("model.query_layers", "sccmrl", 1), ("model.query_fusion", "sccmrl", False), ("model.netvlad", "sccmrl", True),
    ("model.netvlad_clusters", "qacln", 3), ("model.conv_kernel", "sccmrl", 3), ("model.top_videos", "sccmrl", 5),
    ("model.max_moment_clips", "sccmrl", 5), ("model.encoder", "qacln", "transformer"),
    ("model.hidden_dim", "qacln", 64), ("model.num_layers", "cdaml_vec", 3),
    ("loss.temperature", "triplet", 0.5), ("loss.margin", "sccmrl", 0.5), ("loss.vr_hinge.margin", "sccmrl", 0.5),
    ("loss.polynomial.pos", "sccmrl", [1.0]), ("loss.polynomial.neg", "sccmrl", [1.0]), ("loss.adversarial.mode", "sccmrl", "flip"),
    ("loss.adversarial.grl_scale", "sccmrl", 2.0), ("loss.adversarial.disc_lr", "sccmrl", 0.1), ("loss.adversarial.disc_steps", "sccmrl", 2),
    ("loss.label.scale", "triplet", 20.0), ("loss.label.level_weights", "triplet", [1.0]),
    ("loss.vr_hinge.query_negatives", "sccmrl", True), ("loss.video_cl.k", "sccmrl", 4), ("loss.chunk_mb", "qacln", 1.0),
    ("negatives.k", "pretrain", 4), ("negatives.strategy", "pretrain", "hardest"), ("negatives.gather", "pretrain", False),
    ("negatives.memory_bank", "qacln", 64), ("negatives.bank_warmup_steps", "sccmrl", 5),
    ("negatives.momentum", "sccmrl", 0.9), ("negatives.strategy", "sccmrl", "semi_hard"),
    ("resources.gpus_per_worker", "sccmrl", 0.5), ("loss.lambdas", "qacln", {"vr_hinge": 1.0, "center": 1.0}),
]


def _set(cfg, field, value, data):
    if value == PRETRAINED:
        from xmr.checkpoint import save_checkpoint
        from xmr.method import Method

        pre = base(data, "pretrain")
        torch.manual_seed(5)
        value = str(save_checkpoint(data["root"] / "pretrained", Method(pre), pre))
    elif value == "<hier>":
        value = data["hier"]
    elif value == "<other-root>":
        value = str(data["root"] / "elsewhere")
    elif value == "<other-db>":
        value = f"sqlite:///{data['root'] / 'other-mlflow.db'}"
    return with_values(cfg, {field: value})


def _differs(x, y) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                    and torch.allclose(x, y, atol=1e-7))
    if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
        return len(x) != len(y) or any(_differs(a, b) for a, b in zip(x, y))
    if isinstance(x, dict) and isinstance(y, dict):
        return set(x) != set(y) or any(_differs(x[k], y[k]) for k in x)
    if isinstance(x, float) and isinstance(y, float):
        return abs(x - y) > 1e-7
    return x != y


def test_every_field_has_a_probe():
    assert set(LIVE) == set(leaf_fields()), sorted(set(leaf_fields()) ^ set(LIVE))


@pytest.mark.parametrize("field", sorted(LIVE))
def test_setting_a_field_changes_what_is_built_or_run(data, field):
    base_name, value, kind = LIVE[field]
    before = base(data, base_name)
    after = check(_set(before, field, value, data))
    if field == "data.path":  # a new dataset: dims and classes follow it
        after.model.dims, after.model.num_classes, after.model.label_kind = {}, [], ""
        after, _ = resolve(after)
    observe = OBSERVERS[kind]
    assert _differs(observe(before), observe(after)), f"{field} = {value!r} changed nothing ({kind})"


@pytest.mark.parametrize("field, base_name, value", REJECTED, ids=[f"{f}@{b}" for f, b, _ in REJECTED])
def test_a_field_that_does_not_apply_is_rejected(data, field, base_name, value):
    cfg = base(data, base_name)
    with pytest.raises(ConfigError) as err:
        check(_set(cfg, field, value, data))
    assert field.split(".")[-1] in str(err.value) or field in str(err.value)
