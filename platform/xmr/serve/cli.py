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


REQUEST_TIMEOUT_S = 60.0


def start(args: dict[str, Any], host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          name: str = "xmr", route_prefix: str = "/", direct: bool = False):
    """Start (or update) the application on Serve; returns its base URL once it answers.
    ``direct`` starts an embedded Ray in throughput-optimised mode (see THROUGHPUT_ENV)."""
    from ray import serve

    from xmr.serve.app import build_app

    connect(address, direct)
    # A backstop deadline per request at the proxy (the gateway's body deadline and the
    # retriever's limits come first): nothing a client does holds a proxy slot past it.
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": REQUEST_TIMEOUT_S})
    serve.run(build_app(args), name=name, route_prefix=route_prefix, blocking=False)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def connect(address: str | None = None, direct: bool = False, replicas: int = 1) -> str:
    """Attach to the Ray there is, or start an embedded one (in throughput-optimised mode with
    ``direct``) with logical CPUs for ``replicas`` retriever replicas (every shard's) beside
    the gateway; idempotent. Returns how (``ensure_ray``'s words: "started ..." if embedded)."""
    import ray

    from xmr.train.driver import ensure_ray

    if direct and not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS")):
        os.environ[THROUGHPUT_ENV] = "1"
    if os.environ.get("XMR_VERBOSE") != "1":
        # Serve's components log to their files and, by default, to stderr too, which an embedded
        # Ray streams to this console: xmr serve prints its own lines only (--verbose: Ray's too)
        os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
        import logging

        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # this process's "Started Serve ..." lines
    return ensure_ray(address, num_cpus=max(4, 2 * (os.cpu_count() or 1), replicas + 2))


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
    import signal
    import threading
    import urllib.request

    if ns.verbose:
        os.environ["XMR_VERBOSE"] = "1"
    key = read_api_key(ns.api_key_file)
    digest = key_digest(key)
    if ns.host not in LOOPBACK and digest is None:
        print(f"[xmr] error: --host {ns.host} exposes the endpoint beyond this machine; set XMR_API_KEY or "
              f"--api-key-file (clients then send 'Authorization: Bearer <key>'), or bind 127.0.0.1",
              file=sys.stderr)
        return 2
    args = {"checkpoint": ns.checkpoint, "gallery": ns.gallery, "split": ns.split, "index": ns.index,
            "approx": ns.approx, "replicas": ns.replicas, "api_key_sha256": digest, "drain_s": ns.drain_s,
            "shard_deadline_s": ns.shard_deadline_s}
    try:
        replicas = served_replicas(ns.index, ns.replicas)
    except ValueError as exc:
        print(f"[xmr] error: {exc}", file=sys.stderr)
        return 2
    # else: leave the cluster running on exit
    embedded = connect(ns.address, ns.direct, replicas).startswith("started")
    url = start({k: v for k, v in args.items() if v is not None}, host=ns.host, port=ns.port, address=ns.address,
                direct=ns.direct)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    info = json.loads(urllib.request.urlopen(urllib.request.Request(f"{url}/info", headers=headers), timeout=60).read())
    where = ns.index or ns.gallery or info["gallery"]  # this machine's paths: the operator's own
    print(f"[xmr] serving {info['method']} ({info['task']}) from {ns.checkpoint}: gallery {where} "
          f"split {info['split']}, {info['gallery_size']} items, {info['search']} search, "
          f"{ns.replicas} replica(s){', bearer token required' if digest else ''}; {url}/docs", flush=True)
    if ns.direct:
        try:
            urls = direct_urls("xmr")
        except RuntimeError as e:
            print(f"[xmr] error: {e}", file=sys.stderr)
            return 2
        print(f"[xmr] replicas answering directly (no proxy hop): {', '.join(urls)}")
    if ns.detach:
        return 0
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum, _frame) -> None:  # replaces Ray's handler, which dumps a C++ stack
        received.append(signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    while not stop.wait(3600):
        pass
    return shutdown(embedded, received[0] if received else "stop")


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

    from xmr.serve.shards import build_sharded

    if ns.workers < 0:
        print(f"xmr index build: --workers {ns.workers}: 0 (as many as the cluster allows) or a count", file=sys.stderr)
        return 2
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
    p.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--direct", action="store_true",
                   help=f"throughput-optimised Serve ({THROUGHPUT_ENV}=1): replicas also answer HTTP on ports "
                        "of their own, bypassing the proxy (lowest latency); the proxy port keeps working")
    p.add_argument("--detach", action="store_true", help="return once the endpoint answers")
    p.add_argument("--api-key-file", default=None,
                   help="file holding the bearer token clients must send (default: XMR_API_KEY; required "
                        "when --host is not loopback)")
    p.add_argument("--shard-deadline-s", type=float, default=5.0,
                   help="a sharded --index: answer with the shards that answered within this, naming the others "
                        "in missing_shards (default 5)")
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
    b.add_argument("--address", default=None, help="with --shards: Ray cluster (default: RAY_ADDRESS, a running "
                                                   "local one, or embedded)")
    b.set_defaults(func=_index_build)
