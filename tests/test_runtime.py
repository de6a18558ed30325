"""The runtime is read once, from flags over the environment, and passed down: what a command
does follows from its arguments (``xmr.runtime``); one sizing policy for a local Ray
(``xmr.ray.session.local_cpus``)."""

from __future__ import annotations

import os

import pytest

from xmr.progress_line import every_s, progress_every, with_progress
from xmr.ray.session import is_local, local_cpus
from xmr.runtime import DEFAULT_CACHE, Runtime


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


def test_reading_the_runtime_writes_no_environment(monkeypatch):
    """``--verbose`` once became ``os.environ["XMR_VERBOSE"] = "1"``; the CLI now builds a
    Runtime and leaves the environment as it found it."""
    from xmr.cli import build_parser

    monkeypatch.delenv("XMR_VERBOSE", raising=False)
    before = dict(os.environ)
    args = build_parser().parse_args(["train", "--config", "sccmrl", "--verbose"])
    rt = Runtime.from_env(verbose=args.verbose)
    assert rt.verbose and dict(os.environ) == before


def test_the_progress_interval_reaches_loops_through_the_block(capsys):
    assert every_s() == 30.0
    with progress_every(1e-9):
        assert list(with_progress(range(3), "loop", 3, "items")) == [0, 1, 2]
        with progress_every(0):  # off inside
            list(with_progress(range(3), "quiet", 3, "items"))
    assert every_s() == 30.0
    out = capsys.readouterr().out
    assert "[xmr] loop: 3/3 items" in out and "quiet" not in out


def test_one_sizing_policy_for_a_local_ray():
    cores = os.cpu_count() or 1
    assert local_cpus() == max(4, 2 * cores)  # nothing asked: logical CPUs beyond the cores
    assert local_cpus(100) == 102  # what the work reserves at once, plus the headroom
    assert local_cpus(1, compute_bound=True) == cores  # one per core: compute-bound runs never share one
    assert local_cpus(cores + 2.5, compute_bound=True) == cores + 3  # never fewer than the largest run
    assert is_local(" Local ") and not is_local("ray://h:10001") and not is_local(None)
