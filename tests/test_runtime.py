"""The runtime is read once, from flags over the environment, and passed down: what a command
does follows from its arguments (``xmr.runtime``); one sizing policy for a local Ray
(``xmr.ray.session.local_cpus``)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from xmr.config import TrackingConfig
from xmr.progress_line import every_s, progress_every, with_progress
from xmr.ray.session import is_local, local_cpus
from xmr.runtime import DEFAULT_CACHE, DEFAULT_PROGRESS_EVERY_S, Runtime


def test_the_environment_then_the_flags():
    env = {"XMR_VERBOSE": "1", "XMR_CACHE": "/c", "XMR_PROGRESS_EVERY_S": "5", "RAY_ADDRESS": "ray://h:10001",
           "XMR_STUDY_CACHE": "/s", "UNRELATED": "x"}
    rt = Runtime.from_env(env)
    assert rt == Runtime(verbose=True, cache="/c", progress_every_s=5.0, study_cache="/s", ray_address="ray://h:10001")
    assert Runtime.from_env(env, progress_every_s=0.0, ray_address=None).progress_every_s == 0.0  # a flag wins
    assert Runtime.from_env(env, ray_address=None).ray_address == "ray://h:10001"  # a flag not given leaves it
    assert Runtime.from_env({}, verbose=True).verbose and not Runtime.from_env({"XMR_VERBOSE": "0"}).verbose


def test_defaults_and_the_folders_under_the_cache():
    rt = Runtime.from_env({})
    assert rt == Runtime() and rt.cache == DEFAULT_CACHE and rt.progress_every_s == 30.0
    assert str(rt.studies) == os.path.join(DEFAULT_CACHE, "studies")
    assert str(Runtime(cache="/c").checkpoints) == "/c/checkpoints" and str(Runtime(cache="/c").mlflow) == "/c/mlflow"
    assert str(Runtime(cache="/c", study_cache="/s").studies) == "/s"


def test_bad_values_name_the_variable():
    with pytest.raises(ValueError, match="XMR_PROGRESS_EVERY_S"):
        Runtime.from_env({"XMR_PROGRESS_EVERY_S": "soon"})
    with pytest.raises(ValueError, match="progress_every_s"):
        Runtime(progress_every_s=-1)
    with pytest.raises(TypeError, match="colour"):
        Runtime.from_env({}, colour=True)


def test_a_worker_gets_the_same_runtime_from_its_payload():
    rt = Runtime(verbose=True, cache="/c", progress_every_s=2.5, ray_address="local")
    assert Runtime.from_dict(rt.to_dict()) == rt
    assert Runtime.from_dict(None) == Runtime()


def test_a_command_gets_its_runtime_and_leaves_the_environment_as_it_was(monkeypatch, tmp_path):
    """``--verbose`` once became ``os.environ["XMR_VERBOSE"] = "1"``: ``xmr.cli.main`` now
    builds a Runtime from the flags over the environment and hands it to the command. The
    command here is ``xmr train`` up to the point where it starts Ray (``run_training``,
    replaced by a stand-in that keeps what it was given)."""
    import xmr.train.driver
    from xmr.cli import main

    given = {}

    def run_training(cfg, **kw):
        given.update(kw, method=cfg.method)
        return type("Result", (), {"history": [{"epoch": 1}]})()

    monkeypatch.setattr(xmr.train.driver, "run_training", run_training)
    monkeypatch.delenv("XMR_VERBOSE", raising=False)
    monkeypatch.setenv("XMR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XMR_PROGRESS_EVERY_S", "0")
    before = dict(os.environ)
    assert main(["train", "--config", "sccmrl", "--verbose"]) == 0
    assert dict(os.environ) == before
    assert given["method"] == "sccmrl"
    assert given["runtime"] == Runtime(verbose=True, cache=str(tmp_path / "cache"), progress_every_s=0.0)


def _category_checkpoint(tmp_path):
    import torch
    from conftest import write_tiny_category
    from train_helpers import preset_cfg

    from xmr.checkpoint import save_checkpoint
    from xmr.method import Method

    data = write_tiny_category(tmp_path / "data", splits={"train": 8, "val": 8, "test": 40})
    cfg = preset_cfg("sccmrl", str(data), "model.embed_dim=8", "model.hidden_dim=16")
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "ck", Method(cfg).eval(), cfg), data


def test_xmr_index_build_prints_progress_at_the_runtimes_interval(monkeypatch, tmp_path, capsys):
    """``XMR_PROGRESS_EVERY_S`` reaches the gallery's encoding loop of ``xmr index build`` (a
    line per batch at a tiny interval; none at 0), and the command writes no environment."""
    from xmr.cli import main

    ckpt, data = _category_checkpoint(tmp_path)
    command = ["index", "build", "--checkpoint", str(ckpt), "--gallery", str(data), "--split", "test", "--verbose"]
    for every, speaks in (("1e-9", True), ("0", False)):
        monkeypatch.setenv("XMR_PROGRESS_EVERY_S", every)
        before = dict(os.environ)
        assert main([*command, "--out", str(tmp_path / f"idx-{every}")]) == 0
        assert dict(os.environ) == before
        out = capsys.readouterr().out
        assert ("[xmr] index test: encoding" in out) is speaks, out


def test_shard_workers_and_a_resumed_run_fetch_into_the_runtimes_cache(tmp_path, s3_bucket):
    """``XMR_CACHE`` reaches the processes that fetch an s3:// checkpoint without a CLI of
    their own: an index-build worker (the runtime in its arguments: its model and its shard's
    build) and a training run resuming from S3 (``fit``'s runtime)."""
    from test_checkpoint import small_cfg, trained_state

    from xmr.checkpoint import save_checkpoint, save_train_state
    from xmr.data import storage
    from xmr.serve.index_build import ShardEncoder
    from xmr.train.fit import newest_loadable
    from xmr.train.runfs import RunDir

    ckpt, data = _category_checkpoint(tmp_path)
    storage.upload_dir(str(ckpt), f"s3://{s3_bucket}/ck", progress=False)
    cache = tmp_path / "cache"
    job = {"gallery": str(data), "split": "test", "out": str(tmp_path / "idx"), "shards": 2, "approx": "off",
           "ann_args": None}
    worker = ShardEncoder(f"s3://{s3_bucket}/ck", None, job, runtime=Runtime(cache=str(cache)).to_dict())
    assert [p.name for p in (cache / "checkpoints").iterdir()] != []
    assert len(worker({"shard": [0]})["summary"]) == 1 and (tmp_path / "idx" / "shard-000" / "index.json").is_file()

    cfg = small_cfg()
    method, step = trained_state(cfg)
    local = save_checkpoint(tmp_path / "run" / "checkpoint_epoch0001", method, cfg, epoch=1, step=1)
    save_train_state(local, step.state_dict())
    storage.upload_dir(str(tmp_path / "run"), f"s3://{s3_bucket}/runs/run", progress=False)
    loaded, skipped = newest_loadable(RunDir(f"s3://{s3_bucket}/runs", "run"), None, cache_dir=str(tmp_path / "c2"))
    assert loaded is not None and skipped == [] and len(list((tmp_path / "c2" / "checkpoints").iterdir())) == 1


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None, reason="the [text] extra is not installed")
def test_xmr_data_unpacks_the_text_encoder_into_the_runtimes_cache(monkeypatch, tmp_path, capsys):
    """``xmr data synth vcmr --text-encoder`` unpacks the encoder under ``XMR_CACHE`` and
    prints its progress at ``XMR_PROGRESS_EVERY_S`` (the same loader the endpoint's text
    featuriser uses, ``load_text_encoder(name, cache)``)."""
    from xmr.cli import main
    from xmr.data import text_encoder

    tvr = Path(__file__).resolve().parents[2] / "shared" / "data" / "tvr" / "tvr_val_release.jsonl"
    if not tvr.is_file():
        pytest.skip(f"needs the real TVR annotations at {tvr}")
    monkeypatch.setattr(text_encoder, "_LOADED", {})  # this process may have loaded it from elsewhere
    monkeypatch.setenv("XMR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XMR_PROGRESS_EVERY_S", "1e-9")
    assert main(["data", "synth", "vcmr", "--queries-from", str(tvr), "--text-encoder", "minilm", "--splits",
                 "train=2", "val=1", "--dim-visual", "8", "--dim-subtitle", "8", "--out", str(tmp_path / "d")]) == 0
    assert list((tmp_path / "cache").glob("all_minilm_l6_v2-*/modules.json"))
    assert "[xmr] text vcmr train: " in capsys.readouterr().out


def test_the_progress_interval_reaches_loops_through_the_block(capsys):
    assert every_s() == DEFAULT_PROGRESS_EVERY_S == TrackingConfig().progress_every_s  # one default
    with progress_every(1e-9):
        assert list(with_progress(range(3), "loop", 3, "items")) == [0, 1, 2]
        with progress_every(0):  # off inside
            list(with_progress(range(3), "quiet", 3, "items"))
    assert every_s() == DEFAULT_PROGRESS_EVERY_S
    out = capsys.readouterr().out
    assert "[xmr] loop: 3/3 items" in out and "quiet" not in out


def test_one_sizing_policy_for_a_local_ray():
    cores = os.cpu_count() or 1
    assert local_cpus() == max(4, 2 * cores)  # nothing asked: logical CPUs beyond the cores
    assert local_cpus(100) == 102  # what the work reserves at once, plus the headroom
    assert local_cpus(1, compute_bound=True) == cores  # one per core: compute-bound runs never share one
    assert local_cpus(cores + 2.5, compute_bound=True) == cores + 3  # never fewer than the largest run
    assert is_local(" Local ") and not is_local("ray://h:10001") and not is_local(None)
