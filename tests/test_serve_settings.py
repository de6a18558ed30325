"""The endpoint's settings come through one door: typed application args, checked by the
config machinery (an error names the field), the same for ``xmr serve``, ``serving/config.yaml``
and the RayService; no environment variable sets batching, retries or threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from xmr.config import ConfigError
from xmr.serve.settings import ServeSettings, replica_options, serve_settings

REPO = Path(__file__).resolve().parents[1]


def _shipped_args() -> dict[str, dict]:
    serving = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())["applications"][0]
    k8s = yaml.safe_load(yaml.safe_load((REPO / "k8s" / "rayservice.yaml").read_text())["spec"]["serveConfigV2"])
    return {"serving/config.yaml": serving, "k8s/rayservice.yaml": k8s["applications"][0]}


@pytest.mark.parametrize("where", ["serving/config.yaml", "k8s/rayservice.yaml"])
def test_shipped_configs_are_valid_settings_and_set_no_xmr_environment(where):
    app = _shipped_args()[where]
    s = serve_settings(app["args"])
    assert s.batch_size == 32 and s.batch_wait_s == 0.002 and s.autoscaling.min_replicas == 2
    assert not [k for k in app["runtime_env"]["env_vars"] if k.startswith("XMR_")]


def test_defaults_and_replica_options():
    s = serve_settings({"checkpoint": "runs/x"})
    assert s.checkpoint == os.path.abspath("runs/x")  # replicas run elsewhere: local paths made absolute
    assert (s.batch_size, s.retries, s.body_timeout_s, s.access_log) == (32, 8, 10.0, False)
    assert replica_options(s) == {"num_replicas": 1}
    scaled = serve_settings({"checkpoint": "s3://b/r", "autoscaling": {"min_replicas": 2, "max_replicas": 3}})
    assert scaled.checkpoint == "s3://b/r"
    assert replica_options(scaled)["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 3,
                                                            "target_ongoing_requests": 16.0, "initial_replicas": 2}


@pytest.mark.parametrize("args, names", [
    ({}, "checkpoint: required"),
    ({"checkpoint": "c", "batch_sise": 8}, "unknown key 'batch_sise'"),
    ({"checkpoint": "c", "batch_size": "many"}, "batch_size"),
    ({"checkpoint": "c", "batch_size": 128}, "max_ongoing_requests = 64 must be >= the batch size 128"),
    ({"checkpoint": "c", "approx": "maybe"}, "approx = 'maybe'"),
    ({"checkpoint": "c", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas <= max_replicas"),
    ({"checkpoint": "c", "autoscaling": {"min": 1}}, "unknown key 'autoscaling.min'"),
    ({"checkpoint": "c", "body_timeout_s": 0}, "body_timeout_s = 0"),
    ({"checkpoint": "c", "api_key_sha256": "abc"}, "api_key_sha256"),
    ({"checkpoint": "c", "retries": -1}, "retries = -1"),
])
def test_bad_settings_name_the_field(args, names):
    with pytest.raises(ConfigError, match=names.replace("(", r"\(").replace("[", r"\[")):
        serve_settings(args)


def test_every_setting_is_documented_in_build_app():
    from xmr.serve.app import build_app

    doc = build_app.__doc__
    assert [f for f in ServeSettings.__dataclass_fields__ if f not in doc] == []


def test_a_retired_environment_variable_fails_by_name(monkeypatch):
    monkeypatch.setenv("XMR_SERVE_BATCH", "64")
    with pytest.raises(ConfigError, match="XMR_SERVE_BATCH is no longer read: set the application arg batch_size"):
        serve_settings({"checkpoint": "c"})


@pytest.mark.parametrize("client, key, path, status", [
    (("10.1.2.3", 5000), None, "/search", 403),   # beyond loopback, no key: refused
    (("10.1.2.3", 5000), None, "/healthz", 200),  # probes stay open
    (("127.0.0.1", 5000), None, "/search", 200),  # this machine, no key: served
    (("::1", 5000), None, "/info", 200),
    (("::ffff:127.0.0.1", 5000), None, "/search", 200),  # IPv4 loopback through a dual-stack bind
    (("::ffff:10.1.2.3", 5000), None, "/search", 403),
    (("10.1.2.3", 5000), "k" * 20, "/search", 401),  # a key configured: the token decides
])
def test_an_endpoint_without_a_key_answers_only_its_own_machine(client, key, path, status):
    import asyncio
    import hashlib

    from xmr.serve import middleware

    sent = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message):
        sent.append(message)

    middleware.set_key_digest(hashlib.sha256(key.encode()).hexdigest() if key else None)
    try:
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": [], "client": client}
        asyncio.run(middleware.BearerToken(app)(scope, None, send))
    finally:
        middleware.set_key_digest(None)
    assert sent[0]["status"] == status


def test_a_client_error_crosses_processes_as_a_value():
    """What a retriever returns for a client's error (the one error type, ``RequestError``,
    returned rather than raised: ``errors_returned``) survives Ray's pickling whole."""
    import asyncio

    import ray.cloudpickle as cloudpickle

    from xmr.serve.requests import RequestError, errors_returned

    @errors_returned
    async def refuse():
        raise RequestError(422, "query: expected shape [64], got [7]")

    back = cloudpickle.loads(cloudpickle.dumps(asyncio.run(refuse())))
    assert isinstance(back, RequestError)
    assert (back.status, back.message) == (422, "query: expected shape [64], got [7]")
