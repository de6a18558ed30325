"""The Ray Serve application builder (``xmr.serve.app:build_app``, the import path that
``serving/config.yaml``, the RayService and ``xmr serve`` deploy): the endpoint's settings
(``xmr.serve.settings``) turned into the composed deployments (``xmr.serve.deployments``),
each versioned by xmr's code so a new checkpoint reconfigures live replicas."""

from __future__ import annotations

import functools
import json
from typing import Any

from xmr.ray.compat import with_version
from xmr.serve.contract import served_contract
from xmr.serve.deployments import Gateway, Retriever, TextFeaturiser
from xmr.serve.featurise import audio_spec
from xmr.serve.gallery import text_encoder_of
from xmr.serve.served import Served, served
from xmr.serve.settings import (ServeSettings, gateway_settings, replica_options, retriever_settings,
                                serve_settings)
from xmr.serve.shards import replica_memory


def build_app(args: dict[str, Any]):
    """Serve application builder (``serve run xmr.serve.app:build_app checkpoint=... gallery=...``).

    ``args`` are the fields of ``xmr.serve.settings.ServeSettings`` (typed and range-checked
    there; an error names the field): checkpoint (required), gallery, split, index, approx,
    endpoint_url, cache_dir, replicas or autoscaling, max_ongoing_requests, api_key_sha256, drain_s,
    body_timeout_s, batch_size, batch_wait_s, inline_lone, retries, retry_budget_s,
    shard_deadline_s, threads, access_log. An ``index`` that ``xmr index build --shards``
    wrote gets a retriever deployment per shard (``Retriever000``, ...), each with
    ``replicas`` replicas and its shard's id in its settings, and a gateway that merges their
    answers (``xmr.serve.shards``). What is served (``xmr.serve.served``) is read from the
    index, or from the checkpoint's config when there is none.
    """
    s = serve_settings(args)
    return application(s, served(s))


def application(s: ServeSettings, what: Served):
    """The composed deployments for settings ``s`` serving ``what`` (``build_app``'s work, for
    a caller that has both already: ``xmr serve`` reads what it serves once, before Ray starts,
    to size the local Ray and check placement, and hands it here)."""
    # on delete / scale-down / SIGTERM a replica stops taking requests and finishes those in flight
    common = {"graceful_shutdown_timeout_s": s.drain_s, "graceful_shutdown_wait_loop_s": 0.5,
              "logging_config": {"enable_access_log": s.access_log}}
    scaling = replica_options(s)
    retriever = Retriever.options(max_ongoing_requests=s.max_ongoing_requests, **scaling, **common)
    gateways = scaling.get("num_replicas") or scaling["autoscaling_config"]["min_replicas"]
    encoder = text_encoder_of(what.manifest)
    # the encoder's files are cached where the app's settings say (``cache_dir``: xmr serve's XMR_CACHE)
    featuriser = (_same_code(TextFeaturiser.options(**common), encoder).bind(encoder["name"], encoder, s.cache_dir)
                  if encoder else None)
    audio = audio_spec(what.manifest)
    contract = served_contract(what.route, what.dims, what.gallery_size, what.max_query_tokens,
                               audio and audio["role"], encoder is not None, title=what.title)
    if what.shards:  # a retriever deployment per shard (each with its replicas); the gateway merges
        shards = [_same_code(retriever.options(name=f"Retriever{i:03d}", ray_actor_options=_actor_options(part),
                                               user_config=retriever_settings(s, index=part["path"], shard=i))).bind()
                  for i, part in enumerate(what.shards)]
        config = gateway_settings(s, contract, audio, [p["items"] for p in what.shards], what.top_videos)
        gateway = Gateway.options(user_config=config, num_replicas=gateways, **common)
        return _same_code(gateway, encoder and encoder["name"], len(shards)).bind(None, featuriser, shards)
    gateway = Gateway.options(user_config=gateway_settings(s, contract, audio, [], what.top_videos),
                              num_replicas=gateways, **common)
    # a saved index records its loaded size: the replica asks for that memory
    retriever = retriever.options(user_config=retriever_settings(s), ray_actor_options=_actor_options(what.index_meta))
    return _same_code(gateway, encoder and encoder["name"]).bind(_same_code(retriever).bind(), featuriser)


def _actor_options(part: dict[str, Any]) -> dict[str, Any]:
    """A retriever replica's actor options: the deployment's CPUs, and the memory its index
    needs (``xmr.serve.shards.replica_memory``: the size recorded at build time plus the
    replica's process), so Ray places it on a node with that much to spare."""
    options = dict(Retriever.ray_actor_options or {})
    memory = replica_memory(part.get("resident_bytes"))
    if memory:
        options["memory"] = memory
    return options


def replica_needs(what: Served) -> dict[str, dict[str, float]]:
    """What one replica of each deployment of the app serving ``what`` asks Ray for
    ({deployment: {"CPU": .., "memory": bytes}}), the same options ``application`` deploys
    with: what ``xmr serve`` checks against the cluster before deploying and names when a
    replica cannot be placed."""

    def of(options: dict[str, Any]) -> dict[str, float]:
        need = {"CPU": float(options.get("num_cpus", 1))}
        if options.get("num_gpus"):
            need["GPU"] = float(options["num_gpus"])
        if options.get("memory"):
            need["memory"] = float(options["memory"])
        return need

    needs = {"Gateway": of(Gateway.ray_actor_options or {})}
    if what.shards:
        for i, part in enumerate(what.shards):
            needs[f"Retriever{i:03d}"] = of(_actor_options(part))
    else:
        needs["Retriever"] = of(_actor_options(what.index_meta))
    return needs


def _same_code(deployment, *init: Any):
    """The deployment with a version that names xmr's code and the replica's init arguments.

    ``serve.run`` otherwise gives every deployment a new random version, so deploying a new
    checkpoint over a running app replaced every replica: with one replica, Serve stops the
    old one before the new one is up, and the requests that waited in the old gateway longer
    than its drain were lost (500) when it was killed. With the same code the change is only
    the retriever's ``user_config``. Serve then calls ``Retriever.reconfigure`` on the live
    replica, which loads the new checkpoint beside the old one. New code or other init
    arguments still give a new version, and so new replicas: the arguments are not part of
    Serve's own version (``xmr.ray.compat.with_version``)."""
    import hashlib

    extra = json.dumps(init, sort_keys=True, default=repr).encode()
    return with_version(deployment, hashlib.sha256(_code_digest() + extra).hexdigest()[:16])


@functools.lru_cache(maxsize=1)
def _code_digest() -> bytes:
    """SHA-256 of xmr's source files, read once per process (the code cannot change under it)."""
    import hashlib
    from pathlib import Path

    import xmr

    digest = hashlib.sha256()
    for path in sorted(Path(xmr.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.digest()
