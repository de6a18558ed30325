"""``xmr serve`` (start the endpoint) and ``xmr index build`` (save an encoded gallery)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any


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


REQUEST_TIMEOUT_S = 60.0


class IngressError(RuntimeError):
    """The cluster's Serve ingress does not fit what was asked (raised before deploying)."""


class StartError(RuntimeError):
    """The application did not start: it cannot be placed (before deploying) or was not
    serving by the start-up deadline; the message says why and what to change."""


class Signals:
    """xmr serve's SIGTERM / SIGINT handling, installed before any Ray starts and again once
    ``ray.init`` has returned (its core worker installs handlers of its own). A signal is
    only recorded (``received``); the main thread polls for it (``wait_started``,
    ``wait_signal``) and acts on it. The handler never raises, as an exception raised inside
    a Ray call (``ray.get`` in Cython) leaves Ray's state half-unwound and prints a chained
    SystemError, and it takes no lock: Python runs it in the main thread between two
    bytecodes, and setting an ``Event`` there deadlocks whenever the main thread is inside
    that Event's ``wait`` holding its lock (a SIGTERM then hung ``xmr serve`` forever)."""

    def __init__(self) -> None:
        import threading

        self.received: list[str] = []
        self.wake = threading.Event()

    def install(self) -> None:
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:  # replaces Ray's handler, which dumps a C++ stack
        import signal

        self.received.append(signal.Signals(signum).name)  # a list append: no lock taken

    def wait_started(self) -> None:
        """Until the start-up thread has finished (it sets ``wake``) or a signal arrived. In
        slices: a signal the kernel hands to another thread (Ray's) runs its Python handler only
        when the main thread next runs Python."""
        while not self.received and not self.wake.wait(0.25):
            pass

    def wait_signal(self) -> None:
        """Until SIGTERM or SIGINT (polled every 0.25 s, for the same reason)."""
        while not self.received:
            time.sleep(0.25)


DEFAULT_START_TIMEOUT_S = 600.0


def start(args: dict[str, Any], host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          name: str = "xmr", route_prefix: str = "/", direct: bool = False, ingress: str = "proxy",
          start_timeout_s: float = DEFAULT_START_TIMEOUT_S, say=None):
    """Start (or update) the application on Serve; returns its base URL once it answers.
    ``direct`` starts an embedded Ray in throughput-optimised mode (see THROUGHPUT_ENV),
    ``ingress="haproxy"`` one with Serve's HAProxy ingress (see HAPROXY_ENV). Refuses
    (IngressError, nothing deployed) an HAProxy ingress without a key, wherever its setting
    came from, and ``ingress="haproxy"`` on a cluster whose Serve runs its Python proxy;
    refuses (StartError, nothing deployed) an app whose replicas fit on no node of the
    cluster. While deploying, ``say`` (default: print to stderr) gets one line per
    deployment whose replicas cannot be placed, naming what one needs and what the cluster
    has; past ``start_timeout_s`` it raises StartError (the app is left deployed: the caller
    deletes it or stops its Ray)."""
    from ray import serve

    from xmr.serve.app import build_app, replica_needs

    connect(address, direct, ingress=ingress)
    needs = replica_needs(args)
    refuse_unplaceable(needs, args)
    # A backstop deadline per request at the proxy (the gateway's body deadline and the
    # retriever's limits come first): nothing a client does holds a proxy slot past it.
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": REQUEST_TIMEOUT_S})
    kind = ingress_kind()
    if kind == "haproxy" and not args.get("api_key_sha256"):
        raise IngressError("this Ray runs Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1 when it started), "
                           "which binds the gateway replicas' ports and its stats and metrics ports on every "
                           "interface: set XMR_API_KEY or --api-key-file")
    if ingress == "haproxy" and kind == "proxy":
        raise IngressError("--ingress haproxy: this Ray cluster's Serve runs its Python proxy; start the cluster with "
                           f"{' '.join(f'{k}={v!r}' for k, v in HAPROXY_ENV.items())} in `ray start`'s environment "
                           "(cluster.yaml), or serve without --ingress haproxy")
    if ingress == "haproxy" and kind is None:
        print("[xmr] warning: --ingress haproxy: Ray's state API (the dashboard) is not available to confirm that "
              "this cluster's Serve runs HAProxy", file=sys.stderr)
    run_watched(build_app(args), name, route_prefix, needs, start_timeout_s, say)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_watched(app, name: str, route_prefix: str, needs: dict[str, dict[str, float]], timeout_s: float,
                say=None, poll_s: float = 1.0) -> None:
    """``serve.run`` (in a thread of its own: Serve waits for the app, without a deadline),
    watched from this one: one line per deployment whose replicas wait for resources the
    cluster does not have (``unplaced``), and StartError past ``timeout_s``. A signal
    handler that raises (``Signals``) interrupts the wait here, in the main thread."""
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
            waiting = _not_running(name)
            raise StartError(f"not serving after {timeout_s:g} s (--start-timeout-s)"
                             + (f": {', '.join(waiting)} not running" if waiting else "")
                             + ("; see the lines above" if said else "; --verbose shows Ray Serve's own lines"))
    if "error" in box:
        exc = box["error"]
        raise StartError(f"the application failed to deploy: {str(exc).strip()[-800:]}") from None


def _app_status(name: str):
    from ray import serve

    try:
        return serve.status().applications.get(name)
    except Exception:  # noqa: BLE001 - Serve's controller is starting: nothing to say yet
        return None


def _not_running(name: str) -> list[str]:
    app = _app_status(name)
    return sorted(d for d, st in (app.deployments if app else {}).items() if str(st.status).split(".")[-1] != "HEALTHY")


def _pending_by_state_api(name: str) -> dict[str, dict[str, float]] | None:
    """{deployment: the resources its waiting replica requires} of the app's replica actors
    not yet placed on a node (Ray's state API: an actor pending creation with no worker
    process; one being started has its pid); None when the state API (a dashboard service)
    cannot say."""
    import ray
    from ray.util.state import list_actors

    try:
        actors = list_actors(address=ray.get_runtime_context().gcs_address,
                             filters=[("state", "=", "PENDING_CREATION")], detail=True, limit=10_000,
                             raise_on_missing_output=False, timeout=10)
    except Exception:  # noqa: BLE001 - no dashboard on this cluster
        return None
    prefix = f"ServeReplica:{name}:"
    out: dict[str, dict[str, float]] = {}
    for a in actors:
        cls = getattr(a, "class_name", "") or ""
        # pending creation with no worker process yet (pid 0): waiting for a node, not starting up
        if cls.startswith(prefix) and not getattr(a, "pid", None) and not getattr(a, "node_id", None):
            out.setdefault(cls[len(prefix):], dict(getattr(a, "required_resources", None) or {}))
    return out


def unplaced(name: str, needs: dict[str, dict[str, float]], first_seen: dict[str, float],
             final: bool = False, grace_s: float = 5.0) -> list[tuple[str, str]]:
    """(deployment, line) for each deployment of app ``name`` whose replicas wait for
    resources no node has free. Which: those Ray's state API shows unplaced for ``grace_s``;
    where the state API is missing, those Serve's status says are waiting to be scheduled;
    and at the deadline (``final``) any deployment not yet running whose replica does not fit
    in what the cluster has free. Only those a replica of which cannot fit now are named (a
    replica that waits for a node starting up fits once it is up)."""
    import ray

    app = _app_status(name)
    deployments = app.deployments if app else {}
    not_running = {d for d, st in deployments.items() if str(st.status).split(".")[-1] != "HEALTHY"}
    pending = _pending_by_state_api(name)
    now = time.monotonic()
    candidates: dict[str, dict[str, float]] = {}
    if pending is not None:
        for dep, req in pending.items():
            first_seen.setdefault(dep, now)
            if now - first_seen[dep] >= grace_s or final:
                candidates[dep] = {**needs.get(dep, {}), **_as_need(req)}
    else:
        for dep, st in deployments.items():
            if "to be scheduled" in (st.message or ""):
                candidates[dep] = needs.get(dep, {})
    if final:
        for dep in not_running:
            candidates.setdefault(dep, needs.get(dep, {}))
    if not candidates:
        return []
    free, total = ray.available_resources(), ray.cluster_resources()
    out = []
    for dep in sorted(candidates):
        need = candidates[dep]
        short = [r for r, v in need.items() if v > free.get(r, 0.0) + 1e-9]
        if need and short:
            out.append((dep, f"[xmr] {dep} {placement_words(need, free, total)}"))
    return out


def _as_need(req: dict[str, Any]) -> dict[str, float]:
    """The state API's required resources (``CPU``, ``memory``, ...) as xmr's need dict."""
    return {k: float(v) for k, v in req.items() if k in ("CPU", "GPU", "memory")}


def _amount(resource: str, value: float) -> str:
    if resource == "memory":
        return f"{value / 2**30:.1f} GiB of memory"
    unit = resource if value == 1 else f"{resource}s"
    return f"{value:g} {unit}"


def placement_words(need: dict[str, float], free: dict[str, float], total: dict[str, float]) -> str:
    """"needs 1 CPU; the cluster has 0 of 2 free: ..." for one replica's ``need``."""
    wants = " and ".join(_amount(r, v) for r, v in need.items())
    has = "; ".join(
        (f"{free.get(r, 0.0) / 2**30:.1f} of {total.get(r, 0.0) / 2**30:.1f} GiB of memory free" if r == "memory"
         else f"{free.get(r, 0.0):g} of {total.get(r, 0.0):g} {r}s free")
        for r in need)
    return (f"needs {wants}; the cluster has {has}: lower --replicas or shards, or add nodes "
            "(a replica waits until it fits)")


def refuse_unplaceable(needs: dict[str, dict[str, float]], args: dict[str, Any]) -> None:
    """StartError (before anything is deployed) when a replica of a deployment fits on no
    node of the cluster at all (more memory, CPUs or GPUs than its largest node has): it
    would wait forever. The error names the deployment, its shard and the sizes."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    problems = unfit(needs, nodes)
    if not problems:
        return
    shards = {}
    index = args.get("index")
    if index:
        from xmr.serve.shards import is_sharded, read_shards

        if is_sharded(index, args.get("endpoint_url")):
            parts = read_shards(index, args.get("endpoint_url"))["shards"]
            shards = {f"Retriever{i:03d}": p for i, p in enumerate(parts)}
    lines = []
    for dep, resource, need, largest in problems:
        part = shards.get(dep)
        what = (f"{dep} (shard {dep[-3:]}, {part['items']:,} items, {part['resident_bytes'] / 2**30:.2f} GiB loaded)"
                if part and part.get("resident_bytes") else dep)
        lines.append(f"{what} needs {_amount(resource, need)} per replica; the largest node of this cluster has "
                     f"{_amount(resource, largest)}")
    raise StartError("this index fits on no node of the cluster: " + "; ".join(lines)
                     + ". Cut it into more shards (xmr index build --shards), or add larger nodes")


def unfit(needs: dict[str, dict[str, float]], nodes: list[dict[str, float]]) -> list[tuple[str, str, float, float]]:
    """(deployment, resource, needed, the largest node's total) for each resource a replica
    needs more of than any one node has (``nodes``: each alive node's total resources)."""
    out = []
    for dep, need in needs.items():
        for resource, amount in need.items():
            largest = max((float(n.get(resource, 0.0)) for n in nodes), default=0.0)
            if amount > largest + 1e-9:
                out.append((dep, resource, amount, largest))
    return out


def connect(address: str | None = None, direct: bool = False, replicas: int = 1, ingress: str = "proxy") -> str:
    """Attach to the Ray there is, or start an embedded one (also for ``address="local"``: a
    new local Ray, as Ray's own convention says; in throughput-optimised mode with
    ``direct``, with the HAProxy ingress for ``ingress="haproxy"``) with logical CPUs for
    ``replicas`` retriever replicas (every shard's) beside the gateway; idempotent. Returns
    how (``ensure_ray``'s words: "started ..." if this process started it). Ray's own lines
    (its processes' logs streamed to the driver, Serve's INFO lines) only with --verbose."""
    import ray

    from xmr.train.driver import default_cpus, ensure_ray, is_local

    given = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized() and (not given or is_local(given)):
        if direct:
            os.environ[THROUGHPUT_ENV] = "1"
        if ingress == "haproxy":
            for name, value in HAPROXY_ENV.items():
                os.environ.setdefault(name, value)  # the operator's own settings win
    if os.environ.get("XMR_VERBOSE") != "1":
        # Serve's components log to their files and, by default, to stderr too, which an embedded
        # Ray streams to this console: xmr serve prints its own lines only (--verbose: Ray's too)
        os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
        import logging

        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # this process's "Started Serve ..." lines
    return ensure_ray(address, num_cpus=max(default_cpus(), replicas + 2),
                      driver_logs=os.environ.get("XMR_VERBOSE") == "1")


def served_replicas(index: str | None, replicas: int) -> int:
    """Retriever replicas an app asks for: ``replicas`` per shard of a sharded index."""
    from xmr.serve.shards import is_sharded, read_shards

    return replicas * (len(read_shards(index)["shards"]) if index and is_sharded(index) else 1)


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


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def busy_ports(ports: dict[str, int]) -> list[str]:
    """The ``ports`` (named by what sets them) that something on this machine already listens
    on, each with the listening process where the OS tells: HAProxy exits at start when one
    of its ports is taken (a leftover haproxy of a server that was SIGKILLed, say), which
    Serve reports only as an unhealthy proxy, retried forever."""
    import socket

    busy = []
    for what, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("0.0.0.0", port))
                continue
            except OSError:
                pass
        holders = _listeners(port)
        holder = ("; held by " + ", ".join(f"pid {pid} ({name})" for pid, name in holders)) if holders else ""
        busy.append(f"{what} {port}{holder}")
    return busy


def _listeners(port: int) -> list[tuple[int, str]]:
    """(pid, command name) of the processes listening on TCP ``port``, from Linux's /proc
    (empty elsewhere, or where another user's processes cannot be read)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table, encoding="ascii").read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    found = []
    for proc in os.listdir("/proc") if inodes else []:
        if not proc.isdigit():
            continue
        try:
            if any(os.readlink(f"/proc/{proc}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{proc}/fd")):
                found.append((int(proc), open(f"/proc/{proc}/comm", encoding="utf-8").read().strip()))
        except OSError:
            continue
    return found


def haproxy_ports(port: int) -> dict[str, int]:
    """The ports Serve's HAProxy ingress listens on: the HTTP port, its stats and metrics."""
    return {"--port": port, **{name: int(os.environ.get(name, default)) for name, default in HAPROXY_PORTS.items()}}


def ingress_kind(timeout_s: float = 30.0) -> str | None:
    """Which ingress the cluster's Serve runs: "haproxy" (an HAProxyManager actor alive) or
    "proxy" (Serve's ProxyActor), waiting up to ``timeout_s`` for Serve to start one; None
    when Ray's state API (a dashboard service) cannot say."""
    import ray
    from ray.util.state import list_actors

    # the cluster this process is connected to (without an address the state API looks for one)
    address = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            names = [a.class_name for a in list_actors(address=address, filters=[("state", "=", "ALIVE")],
                                                       limit=100_000, raise_on_missing_output=False)]
        except Exception:  # noqa: BLE001 - the state API is a dashboard service; without it, unknown
            return None
        if any(n.endswith("HAProxyManager") for n in names):
            return "haproxy"
        if any(n.endswith("ProxyActor") for n in names):
            return "proxy"
        if time.monotonic() > deadline:
            return None
        time.sleep(0.5)


def read_api_key(key_file: str | None) -> str | None:
    """The bearer token from ``--api-key-file`` or XMR_API_KEY, or None. XMR_API_KEY is
    removed from this process's environment once read, so no process started from here (an
    embedded Ray's raylet, its workers, the replicas) inherits it: only its digest travels."""
    key = None
    if key_file:
        try:
            key = open(key_file, encoding="utf-8").read().strip()
        except OSError as exc:
            raise SystemExit(f"xmr serve: --api-key-file {key_file}: {exc.strerror}") from None
        if not key:
            raise SystemExit(f"xmr serve: --api-key-file {key_file} is empty")
    env_key = os.environ.pop("XMR_API_KEY", "").strip()
    key = key or env_key or None
    if key is not None and len(key) < 16:
        raise SystemExit("xmr serve: the API key must be at least 16 characters")
    return key


def key_digest(key: str | None) -> str | None:
    """SHA-256 (hex) of the key: what the gateway compares a request's token against."""
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest() if key else None


def _serve(ns: argparse.Namespace) -> int:
    import threading
    import urllib.request

    if ns.verbose:
        os.environ["XMR_VERBOSE"] = "1"
    # before any Ray starts: SIGTERM / Ctrl-C at any moment of start-up exits with one line
    signals = Signals()
    signals.install()
    key = read_api_key(ns.api_key_file)
    digest = key_digest(key)
    if ns.host not in LOOPBACK and digest is None:
        print(f"[xmr] error: --host {ns.host} exposes the endpoint beyond this machine; set XMR_API_KEY or "
              f"--api-key-file (clients then send 'Authorization: Bearer <key>'), or bind 127.0.0.1",
              file=sys.stderr)
        return 2
    if ns.start_timeout_s <= 0:
        print(f"[xmr] error: --start-timeout-s {ns.start_timeout_s:g}: must be > 0", file=sys.stderr)
        return 2
    from xmr.ray.compat import started_cluster_address
    from xmr.train.driver import is_local

    given = ns.address or os.environ.get("RAY_ADDRESS")
    embedding = is_local(given) or not (given or started_cluster_address())
    env_haproxy = embedding and os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
    if env_haproxy and ns.ingress != "haproxy":
        print("[xmr] note: RAY_SERVE_ENABLE_HA_PROXY=1 is set: the embedded Ray runs Serve's HAProxy ingress "
              "(as --ingress haproxy)", file=sys.stderr)
        ns.ingress = "haproxy"
    if ns.ingress == "haproxy" and ns.direct:
        print("[xmr] error: --direct and --ingress haproxy are two ingress paths (clients on the replicas' own "
              "ports, or HAProxy in front of them): choose one", file=sys.stderr)
        return 2
    if ns.ingress == "haproxy" and digest is None:
        print("[xmr] error: --ingress haproxy binds the gateway replicas' own ports and HAProxy's stats and metrics "
              "ports on every interface (Ray's HAProxy config has no host setting): set XMR_API_KEY or "
              "--api-key-file, or keep the default --ingress proxy, which listens on --host only", file=sys.stderr)
        return 2
    if ns.ingress == "haproxy" and embedding and (busy := busy_ports(haproxy_ports(ns.port))):
        print(f"[xmr] error: --ingress haproxy needs these ports free: {'; '.join(busy)}. Stop what holds them "
              "(a leftover haproxy from a server that was killed: kill its pid), or choose others with --port, "
              f"{' and '.join(HAPROXY_PORTS)}", file=sys.stderr)
        return 2
    args = {"checkpoint": ns.checkpoint, "gallery": ns.gallery, "split": ns.split, "index": ns.index,
            "approx": ns.approx, "replicas": ns.replicas, "api_key_sha256": digest, "drain_s": ns.drain_s,
            "shard_deadline_s": ns.shard_deadline_s}
    try:
        replicas = served_replicas(ns.index, ns.replicas)
    except ValueError as exc:
        print(f"[xmr] error: {exc}", file=sys.stderr)
        return 2
    import ray

    from xmr.ray.compat import divert_ray_console

    if not ray.is_initialized():
        divert_ray_console("serve", os.environ.get("XMR_VERBOSE") == "1")  # Ray's native ERROR lines: a log file, unless --verbose
    # ray.init in this thread (a signal meanwhile is acted on once it returns: Ray is then
    # stopped cleanly); the rest of start-up in a thread of its own, watched from here, so that
    # a signal is acted on at once whatever Ray call the start-up is in
    embedded = connect(ns.address, ns.direct, replicas, ingress=ns.ingress).startswith("started")
    signals.install()
    if signals.received:
        return stopped_starting(signals.received[0], embedded, deployed=False)
    box: dict[str, Any] = {}

    def starting() -> None:
        try:
            url = start({k: v for k, v in args.items() if v is not None}, host=ns.host, port=ns.port,
                        address=ns.address, direct=ns.direct, ingress=ns.ingress, start_timeout_s=ns.start_timeout_s)
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            box["info"] = json.loads(urllib.request.urlopen(urllib.request.Request(f"{url}/info", headers=headers),
                                                            timeout=60).read())
            box["url"] = url
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            box["error"] = exc
        finally:
            signals.wake.set()

    threading.Thread(target=starting, name="xmr-start", daemon=True).start()
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
    url, info = box["url"], box["info"]
    where = ns.index or ns.gallery or info["gallery"]  # this machine's paths: the operator's own
    print(f"[xmr] serving {info['method']} ({info['task']}) from {ns.checkpoint}: gallery {where} "
          f"split {info['split']}, {info['gallery_size']} items, {info['search']} search, "
          f"{ns.replicas} replica(s){', bearer token required' if digest else ''}; {url}/docs", flush=True)
    if ns.ingress == "haproxy":
        stats = ", ".join(f"{port}" for name, port in haproxy_ports(ns.port).items() if name != "--port")
        print(f"[xmr] HAProxy ingress on {ns.host}:{ns.port}: a request whose gateway replica dies is replayed on "
              f"another{'' if ns.replicas > 1 else ' once Serve has replaced it (--replicas 2: at once)'}, or its "
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


def stop_ray(embedded: bool, delete: str | None = None, serve_started: bool = False) -> None:
    """After a failed or interrupted start: delete the application ``delete`` (on a cluster
    that keeps running: nothing of it is left behind), or stop the embedded Ray (Serve first
    where it was started, so that an HAProxy it started goes with it)."""
    import ray

    if not ray.is_initialized():
        return
    try:
        from ray import serve

        if embedded:
            if serve_started:
                serve.shutdown()
            ray.shutdown()
        elif delete:
            serve.delete(delete, _blocking=True)
    except Exception as exc:  # noqa: BLE001 - report and still exit: the process is going away
        print(f"[xmr] warning: clean-up incomplete ({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr)


def stopped_starting(why: str, embedded: bool, deployed: bool, name: str = "xmr") -> int:
    """SIGTERM / Ctrl-C during start-up: whatever was deployed removed (or the embedded Ray
    stopped), one line, exit 0."""
    stop_ray(embedded, delete=name if deployed else None, serve_started=deployed)
    where = ("embedded Ray stopped" if embedded
             else "the application removed; the cluster keeps running" if deployed else "the cluster keeps running")
    print(f"[xmr] {why} during start-up: stopped before serving; {where}", flush=True)
    return 0


def shutdown(embedded: bool, why: str, name: str = "xmr") -> int:
    """Stop taking requests, let the ones in flight finish (Serve's graceful shutdown, at most
    the deployments' ``graceful_shutdown_timeout_s``: ``--drain-s``), delete the application,
    stop the embedded Ray; one line, exit 0."""
    import ray
    from ray import serve

    t0 = time.perf_counter()
    try:
        serve.delete(name, _blocking=True)
        if embedded:
            serve.shutdown()
            ray.shutdown()
    except Exception as exc:  # noqa: BLE001 - report and still exit: the process is going away
        print(f"[xmr] warning: shutdown incomplete ({type(exc).__name__}: {exc})", file=sys.stderr)
    where = "embedded Ray stopped" if embedded else "the cluster keeps running"
    print(f"[xmr] {why}: stopped serving after draining in-flight requests ({time.perf_counter() - t0:.1f} s); "
          f"{where}", flush=True)
    return 0


def _index_build(ns: argparse.Namespace) -> int:
    from xmr.serve.gallery import load_for_serving, save_index
    from xmr.serve.shards import resident_bytes

    if ns.verbose:
        os.environ["XMR_VERBOSE"] = "1"
    from xmr.tasks.ann import AnnConfig

    try:
        ann = AnnConfig(kind=ns.ann_kind, recall_target=ns.recall_target, hnsw_m=ns.hnsw_m,
                        hnsw_ef_construction=ns.ef_construction, ivf_nlist=ns.nlist, pq_m=ns.pq_m)
    except ValueError as exc:
        print(f"xmr index build: {exc}", file=sys.stderr)
        return 2
    if ns.shards != 1:
        return _sharded_build(ns, ann)
    t0 = time.perf_counter()
    loaded = load_for_serving(ns.checkpoint, ns.gallery, ns.split, approx=ns.approx, ann=ann)
    recalls = getattr(loaded.gallery, "recalls", {})  # the family's approximate-index check, if it built one
    loaded.info["resident_bytes"] = resident_bytes(loaded)  # what a replica asks Ray for (memory)
    out = save_index(ns.out, loaded, recalls)
    print(f"[xmr] index of {loaded.gallery.size} items ({loaded.info['embed_dim']}-d) -> {out} "
          f"({time.perf_counter() - t0:.1f} s with encoding)")
    for role, a in sorted(getattr(loaded.gallery, "approx", {}).items()):
        knobs = {k: v for k, v in a.build.items() if k in {"hnsw": ("hnsw_m", "hnsw_ef_construction"),
                                                            "ivfpq": ("nlist", "pq_m"), "ivf": ("nlist",)}[a.kind]}
        print(f"[xmr] approximate index over modality {role}: {a.kind} {knobs}, search {a.search_params}; "
              f"built in {a.build_s:.1f} s; recall@10 vs exact search = {a.recall_at_10:.4f} (held-out probes); "
              f"{a.bytes_per_item:.0f} bytes per item")
        if not a.met_target:
            print(f"[xmr] warning: modality {role}'s index stays below recall@10 {ann.recall_target} at its most "
                  "thorough setting; raise --ef-construction / --hnsw-m (hnsw) or --nlist (ivf*)", file=sys.stderr)
    if not recalls:
        print("[xmr] exact search (gallery below the approximate-index threshold, or --approx off)")
    return 0


def _sharded_build(ns: argparse.Namespace, ann) -> int:
    from dataclasses import asdict

    from xmr.serve.index_build import build_sharded

    if ns.workers < 0:
        print(f"xmr index build: --workers {ns.workers}: 0 (as many as the cluster allows) or a count", file=sys.stderr)
        return 2
    import ray

    from xmr.ray.compat import divert_ray_console

    if not ray.is_initialized():
        divert_ray_console("index-build", os.environ.get("XMR_VERBOSE") == "1")  # Ray's native ERROR lines: a log file, unless --verbose
    t0 = time.perf_counter()
    try:
        meta = build_sharded(ns.checkpoint, ns.gallery, ns.split, ns.out, ns.shards, approx=ns.approx,
                             ann_args=asdict(ann), address=ns.address, workers=ns.workers, gpu=ns.gpu)
    except ValueError as exc:
        print(f"xmr index build: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a worker's failure arrives wrapped by Ray Data
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        print(f"xmr index build: a shard failed ({type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[-1][:300]}); "
              f"the shards already built are kept: run the same command again to build the rest", file=sys.stderr)
        return 1
    recalls = [r for s in meta["shards"] for r in s["approx_recall_at_10"].values()]
    print(f"[xmr] sharded index of {meta['items']} items in {len(meta['shards'])} shards "
          f"({', '.join(str(s['items']) for s in meta['shards'])}) -> {ns.out} ({time.perf_counter() - t0:.1f} s); "
          f"search: {', '.join(meta['search'])}"
          + (f"; per-shard recall@10 vs exact {min(recalls):.4f}..{max(recalls):.4f}" if recalls else ""), flush=True)
    print(f"[xmr] serve it: xmr serve --checkpoint {ns.checkpoint} --index {ns.out}  (a retriever deployment per "
          "shard; the gateway merges their top-k)")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="serve a checkpoint as a retrieval endpoint (Ray Serve)")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, run dir (its best checkpoint), or s3://...")
    p.add_argument("--gallery", default=None, help="dataset root whose split is searched (default: the run's data)")
    p.add_argument("--split", default="test", help="gallery split to search")
    p.add_argument("--index", default=None, help="a saved index from `xmr index build` instead of encoding")
    p.add_argument("--approx", default="auto", choices=["auto", "on", "off"], help="FAISS index for large galleries")
    p.add_argument("--replicas", type=int, default=1, help="replicas of the retriever deployment")
    p.add_argument("--host", default=os.environ.get("XMR_SERVE_HOST", "127.0.0.1"),
                   help="bind address (default 127.0.0.1; 0.0.0.0 exposes the endpoint)")
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
    p.add_argument("--shard-deadline-s", type=float, default=5.0,
                   help="a sharded --index: answer with the shards that answered within this, naming the others "
                        "in missing_shards (default 5)")
    p.add_argument("--start-timeout-s", type=float, default=DEFAULT_START_TIMEOUT_S,
                   help="give up (exit 1) when the endpoint is not serving after this long, saying which deployments "
                        f"are not running and why (default {DEFAULT_START_TIMEOUT_S:g})")
    p.add_argument("--drain-s", type=float, default=20.0,
                   help="on SIGTERM / SIGINT, how long in-flight requests may take to finish")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray Serve's own log lines (controller, proxy, replicas) beside xmr's; without it "
                        "they go to Ray's log files only")
    p.set_defaults(func=_serve)

    idx = subparsers.add_parser("index", help="build saved gallery indexes for the endpoint")
    sub = idx.add_subparsers(dest="index_command", required=True, metavar="COMMAND")
    b = sub.add_parser("build", help="encode a gallery split once (category: and a FAISS index; vcmr: the corpus's "
                                     "clip encodings) for `xmr serve --index`")
    b.add_argument("--checkpoint", required=True, help="checkpoint dir, run dir (its best checkpoint), or s3://...")
    b.add_argument("--gallery", default=None, help="dataset root whose split is encoded (default: the run's data)")
    b.add_argument("--split", default="test", help="split to encode")
    b.add_argument("--out", required=True, help="folder to write the index to")
    b.add_argument("--approx", default="auto", choices=["auto", "on", "off"],
                   help="approximate index: on, off, or auto (past 200,000 items)")
    b.add_argument("--ann-kind", default="hnsw", choices=["hnsw", "ivfpq", "ivf"],
                   help="approximate index kind (default hnsw: the measured choice at 1M items, bench/serve_latency.py)")
    b.add_argument("--recall-target", type=float, default=0.95,
                   help="recall@10 vs exact search the search setting must reach (default 0.95)")
    b.add_argument("--hnsw-m", type=int, default=32, help="hnsw: links per item (default 32)")
    b.add_argument("--ef-construction", type=int, default=64, help="hnsw: build breadth (default 64)")
    b.add_argument("--nlist", type=int, default=0, help="ivf / ivfpq: inverted lists (default 4 x sqrt(n))")
    b.add_argument("--pq-m", type=int, default=32, help="ivfpq: sub-quantisers, dividing the embedding size (default 32)")
    b.add_argument("--shards", type=int, default=1,
                   help="cut the split into this many contiguous shards, each an index of its own, encoded by a "
                        "Ray Data job over the cluster and served one retriever deployment per shard (default 1: "
                        "one index folder)")
    b.add_argument("--workers", type=int, default=0,
                   help="with --shards: encoding workers (default: as many as shards to build and CPUs allow)")
    b.add_argument("--gpu", action="store_true", help="with --shards: one GPU per encoding worker")
    b.add_argument("--address", default=None, help="with --shards: Ray cluster, or 'local' for a new local Ray "
                                                   "(default: RAY_ADDRESS, a running local one, or embedded)")
    b.add_argument("--verbose", action="store_true",
                   help="show Ray's and Ray Data's own lines (progress, INFO) beside xmr's")
    b.set_defaults(func=_index_build)
