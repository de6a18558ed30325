"""What ``xmr serve`` needs of Ray Serve beyond its public API, in one place: the environment
Serve reads when a Ray starts (its ingress modes, its log streaming, a replica process's
allocator), a client of the running Serve for the replicas' own ports, the blocking delete
of an application, and the names Ray gives Serve's actors in its state API. Each is pinned
by the tests of the code that uses it (tests/test_serve*.py); on another Ray version, look
here first."""

from __future__ import annotations

import logging
import time
from typing import Any

from xmr.ray.compat import ray_setting, set_ray_env

# Ray Serve's throughput-optimised mode: each ingress replica also answers HTTP on a port of
# its own (direct ingress, no proxy hop), the proxy talks gRPC to replicas, and user code runs
# on the replica's main event loop. Read when Ray starts, so it is set before the embedded
# Ray is started, or on the cluster's `ray start` (cluster.yaml).
THROUGHPUT_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"

# Ray Serve's HAProxy ingress (``--ingress haproxy``): HAProxy, not Serve's Python proxy,
# takes the clients' connections and forwards each request to a gateway replica's own HTTP
# port. Its retry policy is the reason xmr offers it: a gateway replica killed mid-request
# closes the connection without an answer, and HAProxy replays the request on another
# gateway replica (``empty-response``) instead of answering 500, as Serve's proxy does.
# Every xmr route is a read (a search, /info, /healthz), so a replay is safe. Ray's own
# default is ``conn-failure`` only, because a replayed write could run twice. HAProxy
# replays only a request it still holds whole: one that fits its buffer
# (RAY_SERVE_HAPROXY_TUNE_BUFSIZE, 16 KB by default), which JSON and .npy queries do and a
# long WAV upload does not. Read when Ray starts: an embedded Ray gets them from here,
# a cluster from its ``ray start`` (cluster.yaml) or its pods' environment (k8s).
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
               "RAY_SERVE_HAPROXY_RETRIES": "3"}
# Ray 2.60's HAProxy config binds these on every interface (its template names no host),
# and the gateway replicas' own ports too: --ingress haproxy therefore needs an API key.
HAPROXY_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}

# The gateway reads whole bodies of up to 4 MiB. glibc's malloc raises its mmap threshold to
# the size of the largest block freed, so after the first large body later ones come from
# its heaps, which it keeps: after bursts of 4 MiB bodies the gateway held 15% more memory
# than at start. A fixed threshold (128 KiB, glibc's default before it adapts) maps large
# blocks and gives them back on free (+9.5%; bench/serve_memory.py). Read by glibc when the
# replica's process starts, hence the runtime environment.
GATEWAY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
GATEWAY_ACTOR_OPTIONS = {"num_cpus": 0.25, "runtime_env": {"env_vars": GATEWAY_ENV}}

# How Ray names Serve's actors (their class names in the state API).
REPLICA_CLASS_PREFIX = "ServeReplica:"  # + "<app>:<deployment>"
HAPROXY_CLASS_SUFFIX = "HAProxyManager"
PROXY_CLASS_SUFFIX = "ProxyActor"


def embedded_serve_env(direct: bool, ingress: str) -> None:
    """Serve's modes for a Ray this process is about to start (read when it starts):
    throughput-optimised for ``direct``, the HAProxy ingress for ``ingress="haproxy"``
    (the operator's own HAProxy settings win)."""
    if direct:
        set_ray_env({THROUGHPUT_ENV: "1"}, override=True)
    if ingress == "haproxy":
        set_ray_env(HAPROXY_ENV)


def haproxy_requested() -> bool:
    """Whether this process's environment asks a Ray it starts for the HAProxy ingress."""
    return ray_setting("RAY_SERVE_ENABLE_HA_PROXY") == "1"


def haproxy_ports(port: int) -> dict[str, int]:
    """The ports Serve's HAProxy ingress listens on: the HTTP port, its stats and metrics
    (Ray reads the latter two from the environment)."""
    return {"--port": port, **{name: int(ray_setting(name, str(default))) for name, default in HAPROXY_PORTS.items()}}


def quiet_serve(verbose: bool) -> None:
    """Serve's components log to their files and, by default, to stderr too, which an
    embedded Ray streams to this console: ``xmr serve`` prints its own lines only
    (``verbose``: Ray's too)."""
    if verbose:
        return
    set_ray_env({"RAY_SERVE_LOG_TO_STDERR": "0"})
    # Importing ray.serve sets its logger to INFO (configure_default_serve_logger): imported
    # first, so that a later first import cannot undo the level ("Deleting app ..." lines)
    import ray.serve  # noqa: F401

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # this process's "Started Serve ..." lines


def delete_app(name: str) -> None:
    """Delete application ``name`` and wait until its replicas have drained and gone."""
    from ray import serve

    serve.delete(name, _blocking=True)


def direct_urls(name: str, route_prefix: str = "/", timeout_s: float = 60.0) -> list[str]:
    """Base URLs of the application's replicas' own HTTP ports (direct ingress); raises when
    the cluster runs without it."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    deadline = time.monotonic() + timeout_s
    while True:
        details = client.get_serve_details()
        http = details.get("http_options") or {}
        # replicas bind the Serve HTTP host (127.0.0.1 by default); the target lists the node IP
        bound = http.get("host") if http.get("host") not in (None, "0.0.0.0", "::") else None
        urls = [f"http://{bound or t['ip']}:{t['port']}{route_prefix.rstrip('/')}"
                for group in details.get("target_groups", [])
                if group.get("app_name") == name and group.get("protocol") == "HTTP"
                for t in group.get("targets", []) if t["port"] != http.get("port")]
        if urls or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not urls:
        raise RuntimeError(f"application {name!r} has no direct-ingress replica ports: start Ray with "
                           f"{THROUGHPUT_ENV}=1 (an embedded Ray does this with --direct)")
    return urls


def _actors(state: str, **kwargs: Any) -> list[Any]:
    """The cluster's actors in ``state`` (Ray's state API, a dashboard service: raises without it)."""
    import ray
    from ray.util.state import list_actors

    # the cluster this process is connected to (without an address the state API looks for one)
    address = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    return list_actors(address=address, filters=[("state", "=", state)], raise_on_missing_output=False, **kwargs)


def pending_replicas(name: str) -> dict[str, dict[str, float]] | None:
    """{deployment: the resources its waiting replica requires} of app ``name``'s replica
    actors not yet placed on a node (pending creation with no worker process; one being
    started has its pid); None when the state API cannot say."""
    try:
        actors = _actors("PENDING_CREATION", detail=True, limit=10_000, timeout=10)
    except Exception:  # noqa: BLE001 - no dashboard on this cluster
        return None
    prefix = f"{REPLICA_CLASS_PREFIX}{name}:"
    out: dict[str, dict[str, float]] = {}
    for a in actors:
        cls = getattr(a, "class_name", "") or ""
        # pending creation with no worker process yet (pid 0): waiting for a node, not starting up
        if cls.startswith(prefix) and not getattr(a, "pid", None) and not getattr(a, "node_id", None):
            out.setdefault(cls[len(prefix):], dict(getattr(a, "required_resources", None) or {}))
    return out


def ingress_kind(timeout_s: float = 30.0) -> str | None:
    """Which ingress the cluster's Serve runs: "haproxy" (an HAProxy manager actor alive) or
    "proxy" (Serve's proxy actor), waiting up to ``timeout_s`` for Serve to start one; None
    when Ray's state API (a dashboard service) cannot say."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            names = [a.class_name for a in _actors("ALIVE", limit=100_000)]
        except Exception:  # noqa: BLE001 - the state API is a dashboard service; without it, unknown
            return None
        if any(n.endswith(HAPROXY_CLASS_SUFFIX) for n in names):
            return "haproxy"
        if any(n.endswith(PROXY_CLASS_SUFFIX) for n in names):
            return "proxy"
        if time.monotonic() > deadline:
            return None
        time.sleep(0.5)
