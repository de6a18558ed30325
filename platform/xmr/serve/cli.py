"""``xmr serve``: start the endpoint and serve until SIGTERM / Ctrl-C, one line at each step.

The steps live apart: the key's intake (``xmr.serve.keys``), the HAProxy ports' check
(``xmr.serve.ports``), Ray and the deployment's start-up and its deadline
(``xmr.serve.startup``, ``xmr.serve.placement``), signals and the exits
(``xmr.serve.lifecycle``); Serve's private names are in ``xmr.ray.serve``. This module reads
the options, checks them before anything starts, and runs the steps in order."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from xmr.config import ConfigError
from xmr.ray.serve import HAPROXY_ENV, HAPROXY_PORTS, THROUGHPUT_ENV, direct_urls, haproxy_ports, haproxy_requested
from xmr.serve.index_cli import register as register_index
from xmr.serve.keys import key_digest, read_api_key
from xmr.serve.lifecycle import Signals, shutdown, stop_ray, stopped_starting
from xmr.serve.ports import busy_ports
from xmr.serve.settings import ServeSettings, serve_settings
from xmr.serve.startup import DEFAULT_START_TIMEOUT_S, IngressError, StartError, connect, deploy, retriever_replicas

if TYPE_CHECKING:  # an annotation only: xmr.serve.served imports torch, which --help does not
    from xmr.serve.served import Served

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _error(text: Any) -> int:
    print(f"[xmr] error: {text}", file=sys.stderr)
    return 2


def _embedding(address: str | None) -> bool:
    """Whether ``xmr serve`` starts its own Ray (``local``, or no cluster to attach to)."""
    from xmr.ray.compat import started_cluster_address
    from xmr.ray.session import is_local

    return is_local(address) or not (address or started_cluster_address())


def _refused(ns: argparse.Namespace, digest: str | None, embedding: bool) -> str | None:
    """Why these options cannot serve (one line), checked before anything starts; None if they can."""
    if ns.host not in LOOPBACK and digest is None:
        return (f"--host {ns.host} exposes the endpoint beyond this machine; set XMR_API_KEY or --api-key-file "
                "(clients then send 'Authorization: Bearer <key>'), or bind 127.0.0.1")
    if ns.start_timeout_s <= 0:
        return f"--start-timeout-s {ns.start_timeout_s:g}: must be > 0"
    if ns.ingress == "haproxy" and ns.direct:
        return ("--direct and --ingress haproxy are two ingress paths (clients on the replicas' own ports, or "
                "HAProxy in front of them): choose one")
    if ns.ingress == "haproxy" and digest is None:
        return ("--ingress haproxy binds the gateway replicas' own ports and HAProxy's stats and metrics ports on "
                "every interface (Ray's HAProxy config has no host setting): set XMR_API_KEY or --api-key-file, or "
                "keep the default --ingress proxy, which listens on --host only")
    if ns.ingress == "haproxy" and embedding and (busy := busy_ports(haproxy_ports(ns.port))):
        return (f"--ingress haproxy needs these ports free: {'; '.join(busy)}. Stop what holds them (a leftover "
                "haproxy from a server that was killed: kill its pid), or choose others with --port, "
                f"{' and '.join(HAPROXY_PORTS)}")
    return None


def _serve(ns: argparse.Namespace) -> int:
    runtime = ns.runtime
    ns.host = ns.host or runtime.serve_host
    signals = Signals()
    signals.install()  # before any Ray starts: SIGTERM / Ctrl-C at any moment of start-up exits with one line
    key = read_api_key(ns.api_key_file)
    digest = key_digest(key)
    embedding = _embedding(ns.address or runtime.ray_address)
    if embedding and haproxy_requested() and ns.ingress != "haproxy":
        print(f"[xmr] note: {next(iter(HAPROXY_ENV))}=1 is set: the embedded Ray runs Serve's HAProxy ingress "
              "(as --ingress haproxy)", file=sys.stderr)
        ns.ingress = "haproxy"
    why = _refused(ns, digest, embedding)
    if why:
        return _error(why)
    # the options left unset (None) take ServeSettings' defaults: they are written there only
    args = {"checkpoint": ns.checkpoint, "gallery": ns.gallery, "split": ns.split, "index": ns.index,
            "approx": ns.approx, "replicas": ns.replicas, "api_key_sha256": digest, "drain_s": ns.drain_s,
            "shard_deadline_s": ns.shard_deadline_s, "cache_dir": runtime.cache}
    s = serve_settings({k: v for k, v in args.items() if v is not None})
    try:  # what is served, read once (index.json / shards.json, or the checkpoint's config)
        from xmr.serve.served import served

        what = served(s)
    except ConfigError:
        raise
    except ValueError as exc:
        return _error(exc)
    import ray

    from xmr.ray.compat import divert_ray_console

    if not ray.is_initialized():
        divert_ray_console("serve", runtime.verbose)  # Ray's native ERROR lines: a log file, unless --verbose
    # ray.init in this thread (a signal meanwhile is acted on once it returns: Ray is then
    # stopped cleanly); the rest of start-up in a thread of its own, watched from here, so that
    # a signal is acted on at once whatever Ray call the start-up is in
    embedded = connect(ns.address, ns.direct, retriever_replicas(s, what), ingress=ns.ingress,
                       runtime=runtime).startswith("started")
    signals.install()
    if signals.received:
        return stopped_starting(signals.received[0], embedded, deployed=False)
    box = _starting(ns, s, what, key, signals)
    signals.wait_started()
    if signals.received:
        return stopped_starting(signals.received[0], embedded, deployed=True)
    exc = box.get("error")
    if isinstance(exc, (IngressError, StartError)):  # an application already on the cluster is left alone
        print(f"[xmr] error: {exc}", file=sys.stderr, flush=True)
        stop_ray(embedded, delete="xmr" if isinstance(exc, StartError) else None, serve_started=True)
        return 2 if isinstance(exc, IngressError) else 1
    if exc is not None:
        stop_ray(embedded, serve_started=True)
        raise exc
    return _serving(ns, box, s, embedded, signals)


def _starting(ns: argparse.Namespace, s: ServeSettings, what: Served, key: str | None,
              signals: Signals) -> dict[str, Any]:
    """Deploy ``what`` (read once, by ``_serve``) on the Ray ``_serve`` connected to and wait
    for the endpoint's first /info, in a thread of its own; its outcome
    (``url`` and ``info``, or ``error``) lands in the returned box, and ``signals.wake`` is set."""
    import threading
    import urllib.request

    box: dict[str, Any] = {}

    def run() -> None:
        try:
            url = deploy(s, what, host=ns.host, port=ns.port, ingress=ns.ingress, start_timeout_s=ns.start_timeout_s)
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            box["info"] = json.loads(urllib.request.urlopen(urllib.request.Request(f"{url}/info", headers=headers),
                                                            timeout=60).read())
            box["url"] = url
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            box["error"] = exc
        finally:
            signals.wake.set()

    threading.Thread(target=run, name="xmr-start", daemon=True).start()
    return box


def _serving(ns: argparse.Namespace, box: dict[str, Any], s: ServeSettings, embedded: bool,
             signals: Signals) -> int:
    """Say what is served and where; then serve until a signal (or return, ``--detach``)."""
    url, info = box["url"], box["info"]
    where = ns.index or ns.gallery or info["gallery"]  # this machine's paths: the operator's own
    print(f"[xmr] serving {info['method']} ({info['task']}) from {ns.checkpoint}: gallery {where} "
          f"split {info['split']}, {info['gallery_size']} items, {info['search']} search, "
          f"{s.replicas} replica(s){', bearer token required' if s.api_key_sha256 else ''}; {url}/docs", flush=True)
    if ns.ingress == "haproxy":
        stats = ", ".join(f"{port}" for name, port in haproxy_ports(ns.port).items() if name != "--port")
        print(f"[xmr] HAProxy ingress on {ns.host}:{ns.port}: a request whose gateway replica dies is replayed on "
              f"another{'' if s.replicas > 1 else ' once Serve has replaced it (--replicas 2: at once)'}, or its "
              "keep-alive connection is closed unanswered for the client to resend; its stats and metrics ports "
              f"({stats}) and the gateway replicas' ports listen on every interface", flush=True)
    if ns.direct:
        try:
            urls = direct_urls("xmr")
        except RuntimeError as e:
            print(f"[xmr] error: {e}", file=sys.stderr)
            return 2
        print(f"[xmr] replicas answering directly (no proxy hop): {', '.join(urls)}")
    if ns.detach:
        return 0
    signals.wait_signal()
    return shutdown(embedded, signals.received[0])


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="serve a checkpoint as a retrieval endpoint (Ray Serve)")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, run dir (its best checkpoint), or s3://...")
    p.add_argument("--gallery", default=None, help="dataset root whose split is searched (default: the run's data)")
    p.add_argument("--split", default=None, help=f"gallery split to search (default: {ServeSettings.split})")
    p.add_argument("--index", default=None, help="a saved index from `xmr index build` instead of encoding")
    p.add_argument("--approx", default=None, choices=["auto", "on", "off"],
                   help=f"FAISS index for large galleries (default: {ServeSettings.approx})")
    p.add_argument("--replicas", type=int, default=None,
                   help=f"replicas of the retriever deployment, each shard's (default: {ServeSettings.replicas})")
    p.add_argument("--host", default=None,
                   help="bind address (default XMR_SERVE_HOST, else 127.0.0.1; 0.0.0.0 exposes the endpoint)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of Serve's proxy")
    p.add_argument("--address", default=None, help="Ray cluster to attach to, or 'local' for a new local Ray here "
                                                   "(default: RAY_ADDRESS, a `ray start` cluster on this machine, "
                                                   "or an embedded Ray)")
    p.add_argument("--direct", action="store_true",
                   help=f"throughput-optimised Serve ({THROUGHPUT_ENV}=1): replicas also answer HTTP on ports "
                        "of their own, bypassing the proxy (lowest latency); the proxy port keeps working")
    p.add_argument("--ingress", default="proxy", choices=["proxy", "haproxy"],
                   help="what takes the clients' connections: Serve's Python proxy (default; listens on --host "
                        "only), or Serve's HAProxy ingress, which replays a request on another gateway replica "
                        "when the one holding it dies (needs an API key: its other ports listen on every interface)")
    p.add_argument("--detach", action="store_true", help="return once the endpoint answers")
    p.add_argument("--api-key-file", default=None,
                   help="file holding the bearer token clients must send (default: XMR_API_KEY; required "
                        "when --host is not loopback)")
    p.add_argument("--shard-deadline-s", type=float, default=None,
                   help="a sharded --index: answer with the shards that answered within this, naming the others "
                        f"in missing_shards (default: {ServeSettings.shard_deadline_s:g})")
    p.add_argument("--start-timeout-s", type=float, default=DEFAULT_START_TIMEOUT_S,
                   help="give up (exit 1) when the endpoint is not serving after this long, saying which deployments "
                        f"are not running and why (default {DEFAULT_START_TIMEOUT_S:g})")
    p.add_argument("--drain-s", type=float, default=None,
                   help="on SIGTERM / SIGINT, how long in-flight requests may take to finish "
                        f"(default: {ServeSettings.drain_s:g})")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray Serve's own log lines (controller, proxy, replicas) beside xmr's; without it "
                        "they go to Ray's log files only")
    p.set_defaults(func=_serve)
    register_index(subparsers)
