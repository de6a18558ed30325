"""Checkpoints rebuild the method from their own config, never unpickle, and fail clearly."""

import pytest
import torch

from xmr.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from xmr.config import load_config
from xmr.method import Method, load_model

pytestmark = pytest.mark.timeout(60)


def small_cfg():
    cfg = load_config("sccmrl", ["model.embed_dim=8", "model.hidden_dim=16"])
    cfg.model.dims = {"a": [6], "b": [5]}
    cfg.model.num_classes = [3]
    cfg.model.label_kind = "single"
    return cfg


def batch(n=12):
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(n, 6, generator=g), "b": torch.randn(n, 5, generator=g),
            "label": torch.arange(n) % 3, "index": torch.arange(n), "key": [str(i) for i in range(n)]}


def test_round_trip_rebuilds_from_config_alone(tmp_path):
    torch.manual_seed(0)
    cfg = small_cfg()
    method = Method(cfg).eval()
    save_checkpoint(tmp_path / "ck", method, cfg, metrics={"map_mean": 0.5}, step=7)
    cfg2, state, meta = load_checkpoint(tmp_path / "ck")
    assert cfg2 == cfg
    assert meta == {"metrics": {"map_mean": 0.5}, "step": 7}
    again = Method.from_checkpoint(tmp_path / "ck").eval()
    b = batch()
    with torch.no_grad():
        for key, value in method(b).items():
            if not key.startswith("_"):
                assert torch.allclose(value, again(b)[key]), key
    assert state.keys() == method.state_dict().keys()


def test_truncated_weights_give_a_clear_error(tmp_path):
    cfg = small_cfg()
    path = save_checkpoint(tmp_path / "ck", Method(cfg), cfg) / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable or truncated"):
        load_checkpoint(tmp_path / "ck")


def test_missing_files_and_mismatched_weights(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "empty")
    cfg = small_cfg()
    save_checkpoint(tmp_path / "ck", Method(cfg), cfg)
    bigger = small_cfg()
    bigger.model.embed_dim = 16
    (tmp_path / "ck" / "config.yaml").write_text(bigger.to_yaml())
    with pytest.raises(CheckpointError, match="do not fit the model"):
        Method.from_checkpoint(tmp_path / "ck")


def trained_state(cfg, steps=2):
    """A method and its training step after ``steps`` AdamW steps with a cosine schedule."""
    from xmr.train.step import TrainStep

    torch.manual_seed(0)
    method = Method(cfg)
    step = TrainStep(method, cfg, total_steps=10)
    for _ in range(steps):
        step(batch())
    return method, step


def test_training_state_round_trip_resumes_identically(tmp_path):
    """Save after 2 steps, rebuild everything from the checkpoint, take a 3rd step on both:
    the weights agree exactly (optimiser moments and schedule position were restored)."""
    from xmr.checkpoint import load_train_state, save_train_state
    from xmr.train.step import TrainStep

    cfg = small_cfg()
    method, step = trained_state(cfg)
    save_checkpoint(tmp_path / "ck", method, cfg, epoch=1, step=2)
    save_train_state(tmp_path / "ck", {**step.state_dict(), "rng": torch.get_rng_state()})
    again = Method.from_checkpoint(tmp_path / "ck")
    step2 = TrainStep(again, cfg, total_steps=10)
    step2.load_state_dict(load_train_state(tmp_path / "ck"))
    assert step2.scheduler.get_last_lr() == step.scheduler.get_last_lr() and step2.step == step.step == 2
    for m, st in ((method, step), (again, step2)):
        torch.manual_seed(1)  # same dropout masks and sampled negatives for both
        st(batch())
    for (name, p), q in zip(method.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name


def test_memory_bank_and_momentum_encoder_are_saved_and_resume_identically(tmp_path):
    """The bank, its warm-up counter and the momentum key encoder are in the checkpoint:
    a resumed run continues exactly (issue 11: the key encoder is restored on resume)."""
    from xmr.checkpoint import load_train_state, save_train_state
    from xmr.train.step import TrainStep

    cfg = small_cfg()
    cfg.negatives.memory_bank, cfg.negatives.momentum, cfg.negatives.bank_warmup_steps = 40, 0.9, 1
    method, step = trained_state(cfg, steps=3)
    assert int(method.bank.writes) == 3 and int(method.bank.filled) == 40
    assert any("key_model." in k for k in method.state_dict()) and "bank.emb" in method.state_dict()
    save_checkpoint(tmp_path / "ck", method, cfg, epoch=1, step=3)
    save_train_state(tmp_path / "ck", step.state_dict())
    again = Method.from_checkpoint(tmp_path / "ck")
    step2 = TrainStep(again, cfg, total_steps=10)
    step2.load_state_dict(load_train_state(tmp_path / "ck"))
    for m, st in ((method, step), (again, step2)):
        torch.manual_seed(1)
        st(batch())
    for (name, p), q in zip(method.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name


def test_load_model_builds_the_model_alone():
    """What serving loads: only the model's weights, no loss terms (classifier, centers)."""
    import tempfile

    cfg = small_cfg()
    method = Method(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, method, cfg)
        model, cfg2 = load_model(d)
    assert cfg2 == cfg and set(model.state_dict()) == {k[len("model."):] for k in method.state_dict()
                                                       if k.startswith("model.")}
    assert any(k.startswith("objective.") for k in method.state_dict())
    x = batch()["a"]
    with torch.no_grad():
        assert torch.equal(model.eval().encode("a", x), method.model.encode("a", x))


def test_truncated_training_state_gives_a_clear_error(tmp_path):
    from xmr.checkpoint import load_train_state, save_train_state

    cfg = small_cfg()
    method, step = trained_state(cfg)
    save_checkpoint(tmp_path / "ck", method, cfg)
    with pytest.raises(CheckpointError, match="model-only checkpoint cannot resume"):
        load_train_state(tmp_path / "ck")
    save_train_state(tmp_path / "ck", step.state_dict())
    path = tmp_path / "ck" / "train_state.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="train_state.pt: unreadable or truncated"):
        load_train_state(tmp_path / "ck")


def test_training_state_refuses_pickled_code(tmp_path):
    """weights_only loading: an object that would run code on unpickling is refused."""
    from xmr.checkpoint import load_train_state

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    cfg = small_cfg()
    save_checkpoint(tmp_path / "ck", Method(cfg), cfg)
    torch.save({"optimizer": Evil()}, tmp_path / "ck" / "train_state.pt")
    with pytest.raises(CheckpointError, match="unreadable or truncated training state"):
        load_train_state(tmp_path / "ck")


def test_fetch_checkpoint_follows_a_run_directory_on_s3(tmp_path, s3_bucket):
    import json

    from xmr.checkpoint import fetch_checkpoint
    from xmr.data import storage

    cfg = small_cfg()
    save_checkpoint(tmp_path / "run" / "checkpoint_epoch0002", Method(cfg), cfg, epoch=2)
    (tmp_path / "run" / "best.json").write_text(json.dumps(
        {"checkpoint": f"s3://{s3_bucket}/runs/r/checkpoint_epoch0002", "metric": "map_mean", "value": 0.5}))
    storage.upload_dir(str(tmp_path / "run"), f"s3://{s3_bucket}/runs/r", progress=False)
    local = fetch_checkpoint(f"s3://{s3_bucket}/runs/r", cache_dir=str(tmp_path / "cache"))
    assert Method.from_checkpoint(local).cfg == cfg
    assert fetch_checkpoint(f"s3://{s3_bucket}/runs/r", cache_dir=str(tmp_path / "cache")) == local  # cached
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        fetch_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="nothing there"):
        fetch_checkpoint(f"s3://{s3_bucket}/runs/missing", cache_dir=str(tmp_path / "cache"))


def test_best_checkpoint_ties_go_to_the_later_epoch():
    """Ray Train keeps the later of two equally scored checkpoints; best.json must agree, or
    it would name a deleted checkpoint (seen with small VCMR test sets where R@10 ties)."""
    from xmr.train.fit import is_new_best

    assert is_new_best(0.5, None, "max") and not is_new_best(float("nan"), None, "max")
    assert is_new_best(0.5, {"value": 0.5}, "max") and not is_new_best(0.4, {"value": 0.5}, "max")
    assert is_new_best(0.5, {"value": 0.5}, "min") and not is_new_best(0.6, {"value": 0.5}, "min")
    assert not is_new_best(None, {"value": 0.5}, "max")


def test_newest_complete_checkpoint_in_the_run_folder(tmp_path):
    """A restart resumes from the newest complete checkpoint on storage even when Ray's own
    record lags one report behind (a kill right after the upload); incomplete ones are skipped."""
    from xmr.checkpoint import save_train_state
    from xmr.train.fit import _complete_on_storage
    from xmr.train.runfs import RunDir

    cfg = small_cfg()
    method, step = trained_state(cfg)
    for epoch in (2, 3, 4):
        d = save_checkpoint(tmp_path / "run" / f"checkpoint_epoch{epoch:04d}", method, cfg, epoch=epoch)
        if epoch != 4:  # epoch 4 lacks its training state: an interrupted copy
            save_train_state(d, step.state_dict())
    run = RunDir(str(tmp_path), "run")
    assert _complete_on_storage(run) == [(e, str(tmp_path / "run" / f"checkpoint_epoch000{e}")) for e in (3, 2)]
    assert _complete_on_storage(RunDir(str(tmp_path), "empty")) == []


def test_resume_falls_back_past_a_truncated_checkpoint(tmp_path):
    """Issue 24: the newest checkpoint's weights truncated (an interrupted upload) no longer
    fails every retry: resume takes the one before it and says which it skipped and why."""
    from xmr.checkpoint import save_train_state
    from xmr.train.fit import newest_loadable
    from xmr.train.runfs import RunDir

    cfg = small_cfg()
    method, step = trained_state(cfg)
    for epoch in (1, 2):
        d = save_checkpoint(tmp_path / "run" / f"checkpoint_epoch{epoch:04d}", method, cfg, epoch=epoch, step=epoch)
        save_train_state(d, step.state_dict())
    weights = tmp_path / "run" / "checkpoint_epoch0002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    loaded, skipped = newest_loadable(RunDir(str(tmp_path), "run"), None)
    assert loaded is not None and loaded[1]["epoch"] == 1
    assert len(skipped) == 1 and skipped[0].startswith("checkpoint_epoch0002:") and "truncated" in skipped[0]
    (tmp_path / "run" / "checkpoint_epoch0001" / "train_state.pt").write_bytes(b"PK\x03\x04 junk")
    loaded, skipped = newest_loadable(RunDir(str(tmp_path), "run"), None)
    assert loaded is None and len(skipped) == 2  # nothing loads: the caller stops with both reasons


def test_a_best_pointer_to_a_run_directory_is_an_error_not_a_recursion(tmp_path):
    import json

    from xmr.checkpoint import fetch_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    (run / "best.json").write_text(json.dumps({"checkpoint": str(run)}))
    with pytest.raises(CheckpointError, match="points at .*a run directory"):
        fetch_checkpoint(str(run))
    (run / "best.json").write_text(json.dumps({"checkpoint": 7}))
    with pytest.raises(CheckpointError, match="not a valid best-checkpoint pointer"):
        fetch_checkpoint(str(run))


def cdaml_attention_cfg():
    cfg = load_config("cdaml", ["model.embed_dim=8", "model.hidden_dim=16", "model.hierarchical=false",
                                "model.attention=true", "model.tokens_a=2", "model.tokens_b=2"])
    cfg.model.dims = {"a": [6], "b": [4]}
    cfg.model.num_classes = [3]
    cfg.model.label_kind = "single"
    return cfg


def test_a_tied_parameter_is_stored_once_and_tied_again_on_load(tmp_path):
    """CDAML's attention memory is one parameter under three names (the model's and each
    trunk's); safetensors refuses shared tensors, so before this fix every CDAML run with
    attention failed at its first checkpoint (digits_cdaml_terms, stop 44)."""
    torch.manual_seed(0)
    cfg = cdaml_attention_cfg()
    method = Method(cfg).eval()
    names = [k for k in method.state_dict() if k.endswith("memory")]
    assert len(names) == 3, names
    save_checkpoint(tmp_path / "ck", method, cfg)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        stored = [k for k in f.keys() if k.endswith("memory")]
    assert len(stored) == 1, stored  # once on disk
    _, state, _ = load_checkpoint(tmp_path / "ck")
    assert set(names) <= set(state) and all(torch.equal(state[k], method.state_dict()[k]) for k in names)
    again = Method.from_checkpoint(tmp_path / "ck").eval()
    assert len({id(again.get_parameter(k)) for k in names}) == 1, "still one parameter after loading"
    assert torch.equal(again.get_parameter(names[0]), method.get_parameter(names[0]))
    x = {"a": torch.randn(5, 6), "b": torch.randn(5, 4)}
    with torch.no_grad():
        for role in ("a", "b"):
            assert torch.allclose(method.model.encode(role, x[role]), again.model.encode(role, x[role])), role


def test_bad_alias_metadata_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    cfg = small_cfg()
    save_checkpoint(tmp_path / "ck", Method(cfg), cfg)
    weights = tmp_path / "ck" / "model.safetensors"
    _, state, _ = load_checkpoint(tmp_path / "ck")
    save_file(state, str(weights), metadata={"xmr.aliases": '{"x": "not.a.key"}'})
    with pytest.raises(CheckpointError, match="xmr.aliases"):
        load_checkpoint(tmp_path / "ck")
