"""The Ray Serve application builder (``xmr.serve.app:build_app``, the import path that
``serving/config.yaml``, the RayService and ``xmr serve`` deploy): the endpoint's settings
(``xmr.serve.settings``) turned into the composed deployments (``xmr.serve.deployments``),
each versioned by xmr's code so a new checkpoint reconfigures live replicas."""

from __future__ import annotations

import functools
import json
from typing import Any

from xmr.data.manifest import Manifest
from xmr.ray.compat import with_version
from xmr.serve.deployments import Gateway, Retriever, TextFeaturiser
from xmr.serve.gallery import served_manifest, text_encoder_of
from xmr.serve.settings import replica_options, serve_settings
from xmr.serve.shards import is_sharded, read_shards, replica_memory


def build_app(args: dict[str, Any]):
    """Serve application builder (``serve run xmr.serve.app:build_app checkpoint=... gallery=...``).

    ``args`` are the fields of ``xmr.serve.settings.ServeSettings`` (typed and range-checked
    there; an error names the field): checkpoint (required), gallery, split, index, approx,
    endpoint_url, replicas or autoscaling, max_ongoing_requests, api_key_sha256, drain_s,
    body_timeout_s, batch_size, batch_wait_s, inline_lone, retries, retry_budget_s,
    shard_deadline_s, threads, access_log. An ``index`` that ``xmr index build --shards``
    wrote gets a retriever deployment per shard (``Retriever000``, ...), each with
    ``replicas`` replicas, and a gateway that merges their answers (``xmr.serve.shards``).
    """
    s = serve_settings(args)
    load = s.load_args()
    # on delete / scale-down / SIGTERM a replica stops taking requests and finishes those in flight
    common = {"graceful_shutdown_timeout_s": s.drain_s, "graceful_shutdown_wait_loop_s": 0.5,
              "logging_config": {"enable_access_log": s.access_log}}
    scaling = replica_options(s)
    retriever_config = {**load, "batch_size": s.batch_size, "batch_wait_s": s.batch_wait_s,
                        "inline_lone": s.inline_lone, "threads": s.threads}
    retriever = Retriever.options(user_config=retriever_config, max_ongoing_requests=s.max_ongoing_requests,
                                  **scaling, **common)
    gateways = scaling.get("num_replicas") or scaling["autoscaling_config"]["min_replicas"]
    sharded = read_shards(s.index, s.endpoint_url) if is_sharded(s.index, s.endpoint_url) else None
    encoder = text_encoder_of(Manifest.from_dict(sharded["manifest"]) if sharded else served_manifest(**load))
    featuriser = (_same_code(TextFeaturiser.options(**common), encoder).bind(encoder["name"], encoder)
                  if encoder else None)
    manifest = Manifest.from_dict(sharded["manifest"]) if sharded else served_manifest(**load)
    gateway_config = {"api_key_sha256": s.api_key_sha256, "body_timeout_s": s.body_timeout_s, "retries": s.retries,
                      "retry_budget_s": s.retry_budget_s, "shard_deadline_s": s.shard_deadline_s,
                      "contract": _contract(s, manifest, encoder, sharded)}
    if sharded:  # a retriever deployment per shard (each with its replicas); the gateway merges
        shards = [_same_code(retriever.options(name=f"Retriever{i:03d}", ray_actor_options=_actor_options(part),
                                               user_config={**retriever_config, "index": part["path"]})).bind()
                  for i, part in enumerate(sharded["shards"])]
        gateway_config.update(shard_items=[p["items"] for p in sharded["shards"]], top_videos=_top_videos(load))
        gateway = Gateway.options(user_config=gateway_config, num_replicas=gateways, **common)
        return _same_code(gateway, encoder and encoder["name"], len(shards)).bind(None, featuriser, shards)
    gateway = Gateway.options(user_config=gateway_config, num_replicas=gateways, **common)
    if s.index:  # a saved index records its loaded size: the replica asks for that memory
        retriever = retriever.options(ray_actor_options=_actor_options(_index_meta(s.index, s.endpoint_url)))
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


def _index_meta(index: str, endpoint_url: str | None) -> dict[str, Any]:
    """An unsharded index's index.json ({} where it cannot be read: loading will say why)."""
    from xmr.data import storage

    try:
        return json.loads(storage.read_bytes(storage.join(index, "index.json"), endpoint_url=endpoint_url))
    except (OSError, ValueError):
        return {}


def replica_needs(args: dict[str, Any]) -> dict[str, dict[str, float]]:
    """What one replica of each deployment of the app asks Ray for ({deployment: {"CPU": ..,
    "memory": bytes}}), the same options ``build_app`` deploys with: what ``xmr serve`` checks
    against the cluster before deploying and names when a replica cannot be placed."""
    s = serve_settings(args)

    def of(options: dict[str, Any]) -> dict[str, float]:
        need = {"CPU": float(options.get("num_cpus", 1))}
        if options.get("num_gpus"):
            need["GPU"] = float(options["num_gpus"])
        if options.get("memory"):
            need["memory"] = float(options["memory"])
        return need

    needs = {"Gateway": of(Gateway.ray_actor_options or {})}
    if is_sharded(s.index, s.endpoint_url):
        for i, part in enumerate(read_shards(s.index, s.endpoint_url)["shards"]):
            needs[f"Retriever{i:03d}"] = of(_actor_options(part))
    else:
        needs["Retriever"] = of(_actor_options(_index_meta(s.index, s.endpoint_url) if s.index else {}))
    return needs


def _contract(s, manifest: Manifest, encoder: dict[str, Any] | None, sharded: dict[str, Any] | None) -> dict[str, Any]:
    """What the OpenAPI document says of this checkpoint (``xmr.serve.contract``): its task's
    route, input shapes, gallery size and raw query forms, read without loading the model."""
    import yaml

    from xmr.checkpoint import CONFIG, fetch_checkpoint
    from xmr.config import from_dict
    from xmr.data import storage
    from xmr.serve.contract import served_contract
    from xmr.serve.featurise import audio_featuriser
    from xmr.tasks import family_of

    local = fetch_checkpoint(s.checkpoint, endpoint_url=s.endpoint_url)
    cfg = from_dict(yaml.safe_load((local / CONFIG).read_text()) or {})
    if sharded:
        size = sum(p["items"] for p in sharded["shards"])
    elif s.index:
        try:
            size = json.loads(storage.read_bytes(storage.join(s.index, "index.json"),
                                                 endpoint_url=s.endpoint_url))["gallery_size"]
        except (OSError, ValueError, KeyError):  # the retriever's load says what is wrong with it
            size = None
    else:
        size = manifest.splits[s.split].num_samples if s.split in manifest.splits else None
    audio = audio_featuriser(manifest)
    return served_contract(family_of(cfg).route, cfg.model.dims, size, cfg.data.max_query_tokens,
                           audio[0] if audio else None, encoder is not None)


def _top_videos(load: dict[str, Any]) -> int:
    """The checkpoint's ``model.top_videos`` (VCMR: the videos one index ranks moments within)."""
    import yaml

    from xmr.checkpoint import CONFIG, fetch_checkpoint

    local = fetch_checkpoint(load["checkpoint"], endpoint_url=load.get("endpoint_url"))
    cfg = yaml.safe_load((local / CONFIG).read_text()) or {}
    return int((cfg.get("model") or {}).get("top_videos") or 100)


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
