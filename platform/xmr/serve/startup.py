"""Starting the endpoint on Ray: attach to a cluster or start a local Ray sized for the app
(``connect``), check that its replicas can be placed and that the cluster's ingress fits
what was asked, deploy, and watch the deployment until it serves or its deadline passes
(``deploy``, ``run_watched``; ``start`` runs every step)."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from xmr.ray.serve import HAPROXY_ENV, embedded_serve_env, ingress_kind, quiet_serve
from xmr.runtime import Runtime
from xmr.serve.placement import StartError, not_running, refuse_unplaceable, unplaced

if TYPE_CHECKING:  # annotations only: this module is imported by ``xmr serve --help``
    from xmr.serve.served import Served
    from xmr.serve.settings import ServeSettings

# A backstop deadline per request at the proxy (the gateway's body deadline and the
# retriever's limits come first): nothing a client does holds a proxy slot past it.
REQUEST_TIMEOUT_S = 60.0
DEFAULT_START_TIMEOUT_S = 600.0

__all__ = ["DEFAULT_START_TIMEOUT_S", "IngressError", "StartError", "connect", "deploy", "retriever_replicas",
           "run_watched", "start"]


class IngressError(RuntimeError):
    """The cluster's Serve ingress does not fit what was asked (raised before deploying)."""


def connect(address: str | None = None, direct: bool = False, replicas: int = 1, ingress: str = "proxy",
            runtime: Runtime | None = None) -> str:
    """Attach to the Ray there is, or start an embedded one (also for ``address="local"``: a
    new local Ray, as Ray's own convention says; in throughput-optimised mode with
    ``direct``, with the HAProxy ingress for ``ingress="haproxy"``) with logical CPUs for
    ``replicas`` retriever replicas (every shard's) beside the gateway; idempotent. Returns
    how (``ensure_ray``'s words: "started ..." if this process started it). Ray's own lines
    (its processes' logs streamed to the driver, Serve's INFO lines) only with --verbose."""
    import ray

    from xmr.ray.session import ensure_ray, is_local

    runtime = runtime or Runtime.from_env()
    given = address or runtime.ray_address
    if not ray.is_initialized() and (not given or is_local(given)):
        embedded_serve_env(direct, ingress)
    quiet_serve(runtime.verbose)
    return ensure_ray(address, runtime=runtime, need_cpus=replicas, driver_logs=runtime.verbose)


def retriever_replicas(s: ServeSettings, what: Served) -> int:
    """Retriever replicas the app asks for: ``replicas`` per shard of a sharded index."""
    return s.replicas * (len(what.shards) if what.shards else 1)


def start(args: dict[str, Any], host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          name: str = "xmr", route_prefix: str = "/", direct: bool = False, ingress: str = "proxy",
          start_timeout_s: float = DEFAULT_START_TIMEOUT_S, say=None, runtime: Runtime | None = None):
    """Start (or update) the application of ``args`` (``xmr.serve.settings.ServeSettings``'
    fields): what it serves read once, Ray attached or started (``connect``: ``direct``
    starts an embedded Ray in throughput-optimised mode, ``ingress="haproxy"`` one with
    Serve's HAProxy ingress, ``xmr.ray.serve``), then ``deploy``; returns its base URL once
    it answers. ``xmr serve`` runs these steps itself (Ray started in its main thread)."""
    from xmr.serve.served import served
    from xmr.serve.settings import serve_settings

    s = serve_settings(args)
    what = served(s)
    connect(address, direct, retriever_replicas(s, what), ingress=ingress, runtime=runtime)
    return deploy(s, what, host, port, name, route_prefix, ingress, start_timeout_s, say)


def deploy(s: ServeSettings, what: Served, host: str = "127.0.0.1", port: int = 8000, name: str = "xmr",
           route_prefix: str = "/", ingress: str = "proxy", start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
           say=None) -> str:
    """Deploy (or update) the application of settings ``s`` serving ``what`` on the Ray this
    process is connected to (``connect``); returns its base URL once it answers. Refuses
    (IngressError, nothing deployed) an HAProxy ingress without a key, wherever its setting
    came from, and ``ingress="haproxy"`` on a cluster whose Serve runs its Python proxy;
    refuses (StartError, nothing deployed) an app whose replicas fit on no node of the
    cluster. While deploying, ``say`` (default: print to stderr) gets one line per deployment
    whose replicas cannot be placed, naming what one needs and what the cluster has; past
    ``start_timeout_s`` it raises StartError (the app is left deployed: the caller deletes
    it or stops its Ray)."""
    from ray import serve

    from xmr.serve.app import application, replica_needs

    needs = replica_needs(what)
    refuse_unplaceable(needs, what.shards)
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": REQUEST_TIMEOUT_S})
    _check_ingress(ingress, s.api_key_sha256 is not None)
    run_watched(application(s, what), name, route_prefix, needs, start_timeout_s, say)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def _check_ingress(ingress: str, keyed: bool) -> None:
    """The ingress the cluster's Serve runs against the one asked for (IngressError)."""
    kind = ingress_kind()
    if kind == "haproxy" and not keyed:
        raise IngressError(f"this Ray runs Serve's HAProxy ingress ({next(iter(HAPROXY_ENV))}=1 when it started), "
                           "which binds the gateway replicas' ports and its stats and metrics ports on every "
                           "interface: set XMR_API_KEY or --api-key-file")
    if ingress == "haproxy" and kind == "proxy":
        raise IngressError("--ingress haproxy: this Ray cluster's Serve runs its Python proxy; start the cluster with "
                           f"{' '.join(f'{k}={v!r}' for k, v in HAPROXY_ENV.items())} in `ray start`'s environment "
                           "(cluster.yaml), or serve without --ingress haproxy")
    if ingress == "haproxy" and kind is None:
        print("[xmr] warning: --ingress haproxy: Ray's state API (the dashboard) is not available to confirm that "
              "this cluster's Serve runs HAProxy", file=sys.stderr)


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_watched(app, name: str, route_prefix: str, needs: dict[str, dict[str, float]], timeout_s: float,
                say=None, poll_s: float = 1.0) -> None:
    """``serve.run`` (in a thread of its own: Serve waits for the app, without a deadline),
    watched from this one: one line per deployment whose replicas wait for resources the
    cluster does not have (``unplaced``), and StartError past ``timeout_s``."""
    import threading

    from ray import serve

    say = say or _stderr_line
    done, box = threading.Event(), {}

    def deploy() -> None:
        try:
            serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
        except BaseException as exc:  # noqa: BLE001 - handed to the watching thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=deploy, name="xmr-deploy", daemon=True).start()
    t0 = time.monotonic()
    said: set[str] = set()
    first_seen: dict[str, float] = {}
    while not done.wait(poll_s):
        late = time.monotonic() - t0 > timeout_s
        for dep, line in unplaced(name, needs, first_seen, final=late):
            if dep not in said:
                said.add(dep)
                say(line)
        if late:
            waiting = not_running(name)
            raise StartError(f"not serving after {timeout_s:g} s (--start-timeout-s)"
                             + (f": {', '.join(waiting)} not running" if waiting else "")
                             + ("; see the lines above" if said else "; --verbose shows Ray Serve's own lines"))
    if "error" in box:
        exc = box["error"]
        raise StartError(f"the application failed to deploy: {str(exc).strip()[-800:]}") from None
