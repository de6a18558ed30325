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


def test_each_deployment_gets_typed_settings_of_its_own():
    """The app's settings become each deployment's ``user_config`` (a mapping: it travels
    through Serve), typed again on the replica by the config machinery: a shard's id is
    one of its settings, and a bad value names its field there too."""
    from xmr.serve.settings import (GatewaySettings, RetrieverSettings, gateway_settings, parsed,
                                    retriever_settings)

    s = serve_settings({"checkpoint": "s3://b/r", "batch_size": 16, "retries": 3})
    shard = parsed(RetrieverSettings, retriever_settings(s, index="s3://b/idx/shard-002", shard=2))
    assert (shard.shard, shard.index, shard.batch_size, shard.checkpoint) == (2, "s3://b/idx/shard-002", 16, "s3://b/r")
    whole = parsed(RetrieverSettings, retriever_settings(s))
    assert whole.shard is None and whole.load_args() == {"checkpoint": "s3://b/r", "split": "test", "approx": "auto"}
    gateway = parsed(GatewaySettings, gateway_settings(s, {"route": "search"}, None, [3, 4], 50))
    assert (gateway.retries, gateway.shard_items, gateway.top_videos) == (3, [3, 4], 50)
    with pytest.raises(ConfigError, match="shard = 'two'"):
        parsed(RetrieverSettings, {**retriever_settings(s), "shard": "two"})
    with pytest.raises(ConfigError, match="unknown key 'retry'"):
        parsed(GatewaySettings, {"retry": 1})


def test_a_replica_defaults_nothing():
    """The replicas' settings have no defaults of their own (those live once, in
    ``ServeSettings``): a field the app's user_config lacks is an error naming it, never a
    silent default (an empty checkpoint, a top_videos other than the model's)."""
    import dataclasses

    from xmr.serve.settings import (Autoscaling, GatewaySettings, RetrieverSettings, gateway_settings, parsed,
                                    retriever_settings)

    for cls in (RetrieverSettings, GatewaySettings):
        assert [f.name for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING] == []
    with pytest.raises(ConfigError, match="RetrieverSettings: missing checkpoint, gallery, split"):
        parsed(RetrieverSettings, {})
    s = serve_settings({"checkpoint": "c"})
    partial = {k: v for k, v in retriever_settings(s).items() if k != "batch_size"}
    with pytest.raises(ConfigError, match="RetrieverSettings: missing batch_size "):
        parsed(RetrieverSettings, partial)
    config = gateway_settings(s, {"route": "moments"}, None, [], 7)
    del config["top_videos"]
    with pytest.raises(ConfigError, match="GatewaySettings: missing top_videos "):
        parsed(GatewaySettings, config)
    # what the replicas get is ServeSettings' values, field by field
    whole = parsed(RetrieverSettings, retriever_settings(s))
    assert (whole.split, whole.approx, whole.batch_size, whole.batch_wait_s, whole.inline_lone, whole.threads) == \
        (s.split, s.approx, s.batch_size, s.batch_wait_s, s.inline_lone, s.threads)
    gateway = parsed(GatewaySettings, gateway_settings(s, {"route": "moments"}, None, [], 7))
    assert (gateway.body_timeout_s, gateway.retries, gateway.retry_budget_s, gateway.shard_deadline_s,
            gateway.shard_items, gateway.top_videos) == (s.body_timeout_s, s.retries, s.retry_budget_s,
                                                          s.shard_deadline_s, [], 7)
    # shard calls batched up to the batch size, except for autoscaled retrievers (a call per query)
    assert (gateway.batch_size, gateway.shard_batching) == (s.batch_size, s.autoscaling is None)
    scaled = dataclasses.replace(s, autoscaling=Autoscaling(min_replicas=1, max_replicas=3))
    assert parsed(GatewaySettings, gateway_settings(scaled, {"route": "moments"}, None, [], 7)).shard_batching is False


def test_xmr_serve_options_default_to_the_settings():
    """``xmr serve``'s options that are endpoint settings default to None: an option left
    unset takes ServeSettings' default, written in one place (its help quotes it)."""
    import argparse

    from xmr.serve.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    ns = parser.parse_args(["serve", "--checkpoint", "c"])
    assert (ns.split, ns.approx, ns.replicas, ns.drain_s, ns.shard_deadline_s) == (None,) * 5
    given = parser.parse_args(["serve", "--checkpoint", "c", "--drain-s", "3", "--shard-deadline-s", "1.5"])
    assert (given.drain_s, given.shard_deadline_s) == (3.0, 1.5)


def _search_request(**fields):
    from xmr.serve.requests import SearchRequest

    return SearchRequest.model_validate(fields)


def test_the_gateway_checks_a_query_once_against_what_is_served():
    """``xmr.serve.queries``: the route, the query form, the modality's shape and k are
    checked at the gateway (each error a 4xx naming the field); a retriever gets the parsed
    float32 array."""
    import numpy as np

    from xmr.serve.contract import served_contract
    from xmr.serve.queries import moments_query, search_query, search_role, search_vector, served_route
    from xmr.serve.requests import MomentsRequest, RequestError

    served = served_contract("search", {"a": [4], "b": [2, 3]}, 5, 32, None, False, title="category")
    req = _search_request(query=[[1, 2, 3], [4, 5, 6]], modality="b", k=3)
    role = search_role(req, None, served_route(served, "search"), None)
    q = search_query(req, role, search_vector(req, None, role, served), served)
    assert (q.role, q.other, q.k, q.vector.dtype, q.vector.shape) == ("b", "a", 3, np.float32, (2, 3))
    flat = np.arange(4, dtype=np.float32)  # base64 floats arrive flat: they take the modality's shape
    assert search_vector(_search_request(), flat, "a", served).shape == (4,)

    def refused(call) -> tuple[int, str]:
        with pytest.raises(RequestError) as info:
            call()
        return info.value.status, info.value.message

    assert refused(lambda: served_route(served, "moments"))[0] == 404
    assert "category model (use /search)" in refused(lambda: served_route(served, "moments"))[1]
    assert refused(lambda: search_role(_search_request(k=2), None, served, None))[0] == 422  # no query at all
    assert "audio featuriser" in refused(lambda: search_role(_search_request(audio_wav_base64="UklG"), None, served,
                                                             None))[1]
    assert "expected shape [4], got [3]" in refused(lambda: search_vector(_search_request(query=[1, 2, 3]), None,
                                                                          "a", served))[1]
    big = _search_request(query=[1, 2, 3, 4], k=6)
    assert refused(lambda: search_query(big, "a", search_vector(big, None, "a", served), served)) == \
        (422, "k = 6: the gallery holds 5 items")
    vcmr = served_contract("moments", {"query": [8, 3], "video": [10, 5]}, 4, 8, None, True, title="VCMR")
    m = moments_query(MomentsRequest.model_validate({"query": [[0.5] * 3] * 2, "k": 4}), None, None, vcmr, True)
    assert m.tokens.shape == (2, 3) and m.k == 4 and m.video is None
    text = MomentsRequest.model_validate({"text": "a dog runs"})
    assert refused(lambda: moments_query(text, None, None, vcmr, False))[0] == 503  # its encoder is not up yet
    tokens = np.ones((20, 3), np.float32)  # the featuriser's tokens: the corpus's first max_query_tokens
    assert moments_query(text, None, tokens, vcmr, True).tokens.shape == (8, 3)
