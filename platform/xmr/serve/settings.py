"""The endpoint's settings: one typed record, checked by the config machinery (errors name
the field), from the application's args (``xmr serve`` options, ``serving/config.yaml``,
the RayService's ``args``). Environment variables carry only what must come from the
environment (the key, in ``xmr serve``, becomes ``api_key_sha256`` before anything starts).

The application builder turns them into each deployment's own typed settings
(``RetrieverSettings``, ``GatewaySettings``), which travel as Serve's ``user_config`` and are
typed again on the replica by the same machinery (``parsed``). Their fields have no
defaults: the defaults live once, here in ``ServeSettings`` (``xmr serve``'s options default
to None, meaning these), so a replica re-defaults nothing, a missing field is an error that
names it, and a shard knows which one it is from its settings."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from xmr.config import ConfigError, build_section
from xmr.runtime import variables_set

# Where the retriever's data comes from: passed to ``load_for_serving`` as they are.
LOAD_FIELDS = ("checkpoint", "gallery", "split", "index", "approx", "endpoint_url", "cache_dir")


@dataclass
class Autoscaling:
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 16.0
    initial_replicas: int | None = None  # default: min_replicas


@dataclass
class ServeSettings:
    checkpoint: str = ""  # checkpoint dir, run dir (its best checkpoint) or s3://...; required
    gallery: str | None = None  # dataset root; default: the checkpoint's data.path
    split: str = "test"
    index: str | None = None  # a saved ``xmr index build`` folder instead of encoding the gallery
    approx: Literal["auto", "on", "off"] = "auto"
    endpoint_url: str | None = None
    cache_dir: str | None = None  # where replicas cache s3:// checkpoints and indexes; default ~/.cache/xmr
    replicas: int = 1  # retriever replicas (the gateway follows), unless autoscaling
    autoscaling: Autoscaling | None = None
    max_ongoing_requests: int = 64  # per retriever replica; at least batch_size
    api_key_sha256: str | None = None  # hex SHA-256 of the bearer token; None: no key
    drain_s: float = 20.0  # on delete / scale-down / SIGTERM, in-flight requests get this long
    body_timeout_s: float = 10.0  # a client must send its body within this (then 408)
    batch_size: int = 32  # queries a retriever searches together (``@serve.batch``)
    # How long a batch waits to fill when other requests are already in flight; a lone
    # request never waits (its latency is the search itself).
    batch_wait_s: float = 0.01
    inline_lone: bool = True  # a lone request runs on the event loop (a thread hop costs it ~10%)
    retries: int = 8  # a call whose retriever replica died is sent again this many times, backing off,
    retry_budget_s: float = 20.0  # within this budget
    # A sharded index (``xmr index build --shards``): a query is answered with the shards that
    # answered within this; the others are named in ``missing_shards`` (their dead replicas
    # are retried until then).
    shard_deadline_s: float = 5.0
    threads: int = 0  # torch threads per retriever replica; 0: torch's default
    access_log: bool = False  # Serve's per-request access log lines

    def load_args(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in LOAD_FIELDS if getattr(self, k) is not None}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Environment variables that set the endpoint before its settings were typed: set, they fail
# by name (silently ignoring one would serve with a setting its user did not choose).
RETIRED_ENV = {"XMR_SERVE_BATCH": "batch_size", "XMR_SERVE_BATCH_WAIT_S": "batch_wait_s",
               "XMR_SERVE_INLINE_LONE": "inline_lone", "XMR_SERVE_RETRIES": "retries",
               "XMR_SERVE_RETRY_BUDGET_S": "retry_budget_s", "XMR_SERVE_THREADS": "threads",
               "XMR_SERVE_ACCESS_LOG": "access_log"}


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def serve_settings(args: dict[str, Any]) -> ServeSettings:
    """Typed, range-checked settings from application args; local paths made absolute
    (replicas do not run in this process's directory)."""
    if not isinstance(args, dict):
        raise ConfigError(f"application args: expected a mapping, got {type(args).__name__}")
    retired = variables_set(RETIRED_ENV)
    _require(not retired, "; ".join(f"{name} is no longer read: set the application arg {RETIRED_ENV[name]} "
                                    f"(xmr.serve.settings.ServeSettings)" for name in retired))
    s: ServeSettings = build_section(ServeSettings, args)
    _require(bool(s.checkpoint), "checkpoint: required (a checkpoint dir, a run dir, or s3://...)")
    _require(s.replicas >= 1, f"replicas = {s.replicas}: at least 1")
    a = s.autoscaling
    if a is not None:
        _require(1 <= a.min_replicas <= a.max_replicas,
                 f"autoscaling: need 1 <= min_replicas <= max_replicas, got {a.min_replicas}, {a.max_replicas}")
        _require(a.target_ongoing_requests > 0,
                 f"autoscaling.target_ongoing_requests = {a.target_ongoing_requests}: must be > 0")
    _require(s.batch_size >= 1, f"batch_size = {s.batch_size}: at least 1")
    _require(s.max_ongoing_requests >= s.batch_size,
             f"max_ongoing_requests = {s.max_ongoing_requests} must be >= the batch size {s.batch_size}, "
             "or batches can never fill")
    _require(0 <= s.batch_wait_s <= 1, f"batch_wait_s = {s.batch_wait_s}: expected 0..1 seconds")
    _require(0 < s.body_timeout_s <= 300, f"body_timeout_s = {s.body_timeout_s}: expected 0 < seconds <= 300")
    _require(s.drain_s >= 0, f"drain_s = {s.drain_s}: must be >= 0")
    _require(s.retries >= 0 and s.retry_budget_s > 0,
             f"retries = {s.retries}, retry_budget_s = {s.retry_budget_s}: need retries >= 0 and a budget > 0")
    _require(0 < s.shard_deadline_s <= 300, f"shard_deadline_s = {s.shard_deadline_s}: expected 0 < seconds <= 300")
    _require(s.threads >= 0, f"threads = {s.threads}: must be >= 0 (0: torch's default)")
    d = s.api_key_sha256
    _require(d is None or (len(d) == 64 and all(c in "0123456789abcdef" for c in d)),
             "api_key_sha256: expected the key's SHA-256 as 64 lowercase hex digits")
    for key in ("checkpoint", "gallery", "index", "cache_dir"):
        value = getattr(s, key)
        if value is not None and not str(value).startswith("s3://"):
            setattr(s, key, os.path.abspath(str(value)))
    return s


@dataclass
class RetrieverSettings:
    """One retriever deployment's settings (its ``user_config``), parsed on the replica by the
    config machinery: where its gallery comes from, which shard it is, how it batches. Every
    field is required (``retriever_settings`` fills them from ``ServeSettings``, where the
    defaults live): a replica defaults nothing, and a missing one is an error naming it."""

    checkpoint: str
    gallery: str | None
    split: str
    index: str | None  # the index folder it serves: the whole index, or its shard's folder
    approx: Literal["auto", "on", "off"]
    endpoint_url: str | None
    cache_dir: str | None
    # Its position in a sharded index (``xmr index build --shards``); None: the whole gallery.
    # A shard answers k up to its own size (the gateway checked k against the whole gallery).
    shard: int | None
    batch_size: int
    batch_wait_s: float
    inline_lone: bool
    threads: int

    def load_args(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in LOAD_FIELDS if getattr(self, k) is not None}


@dataclass
class GatewaySettings:
    """The gateway's settings (its ``user_config``), parsed on the replica by the config
    machinery; every field required (filled by ``gateway_settings``). ``contract`` is what the
    endpoint serves (``xmr.serve.contract.served_contract``: route, shapes, gallery size),
    against which the gateway checks every query once; ``audio`` the dataset's featuriser
    (``xmr.serve.featurise.audio_spec``) or None."""

    api_key_sha256: str | None
    body_timeout_s: float
    retries: int
    retry_budget_s: float
    shard_deadline_s: float
    batch_size: int  # a sharded index: queries a shard call carries at most (``xmr.serve.fanout``)
    shard_batching: bool  # batch shard calls (fixed replicas); autoscaled retrievers get a call per query
    shard_items: list[int]  # a sharded index: each shard's items, in order; [] for a whole one
    top_videos: int  # VCMR: the videos one index ranks moments within (the served model's ``top_videos``)
    contract: dict[str, Any] | None
    audio: dict[str, Any] | None


def retriever_settings(s: ServeSettings, index: str | None = None, shard: int | None = None) -> dict[str, Any]:
    """A retriever deployment's ``user_config`` from the app's settings (a plain mapping: it
    travels through Serve; the replica types it again with ``parsed``)."""
    load = {k: getattr(s, k) for k in LOAD_FIELDS}
    if index is not None:
        load["index"] = index
    return asdict(RetrieverSettings(**load, shard=shard, batch_size=s.batch_size, batch_wait_s=s.batch_wait_s,
                                    inline_lone=s.inline_lone, threads=s.threads))


def gateway_settings(s: ServeSettings, contract: dict[str, Any], audio: dict[str, Any] | None,
                     shard_items: list[int], top_videos: int) -> dict[str, Any]:
    """The gateway's ``user_config`` from the app's settings and what the app serves."""
    return asdict(GatewaySettings(api_key_sha256=s.api_key_sha256, body_timeout_s=s.body_timeout_s,
                                  retries=s.retries, retry_budget_s=s.retry_budget_s,
                                  shard_deadline_s=s.shard_deadline_s, batch_size=s.batch_size,
                                  shard_batching=s.autoscaling is None,
                                  shard_items=list(shard_items),
                                  top_videos=top_videos, contract=contract, audio=audio))


def parsed(cls: type, user_config: dict[str, Any]) -> Any:
    """A deployment's ``user_config`` typed on its replica (an error names the field)."""
    if not isinstance(user_config, dict):
        raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(user_config).__name__}")
    missing = [f.name for f in fields(cls) if f.name not in user_config]
    try:
        return build_section(cls, user_config)  # an unknown key or a bad value is named first
    except TypeError:  # the dataclass's own complaint about absent fields: said with their names
        if not missing:
            raise
        raise ConfigError(f"{cls.__name__}: missing {', '.join(missing)} (every field is required: the "
                          "application builder sets them from ServeSettings)") from None


def replica_options(s: ServeSettings) -> dict[str, Any]:
    """Serve's options for the retriever's replica count."""
    a = s.autoscaling
    if a is None:
        return {"num_replicas": s.replicas}
    return {"autoscaling_config": {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                   "target_ongoing_requests": a.target_ongoing_requests,
                                   "initial_replicas": a.initial_replicas or a.min_replicas}}
