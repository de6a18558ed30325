"""``xmr serve`` (start the endpoint) and ``xmr index build`` (save an encoded gallery)."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any


def start(args: dict[str, Any], host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          name: str = "xmr", route_prefix: str = "/"):
    """Start (or update) the application on Serve; returns its base URL once it answers."""
    from ray import serve

    from xmr.serve.app import build_app
    from xmr.train.driver import ensure_ray

    ensure_ray(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=name, route_prefix=route_prefix, blocking=False)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def _serve(ns: argparse.Namespace) -> int:
    args = {"checkpoint": ns.checkpoint, "gallery": ns.gallery, "split": ns.split, "index": ns.index,
            "approx": ns.approx, "replicas": ns.replicas}
    url = start({k: v for k, v in args.items() if v is not None}, host=ns.host, port=ns.port, address=ns.address)
    import urllib.request

    info = json.loads(urllib.request.urlopen(f"{url}/info", timeout=60).read())
    print(f"[xmr] serving {info['method']} ({info['task']}) from {info['checkpoint']}: gallery {info['gallery']} "
          f"split {info['split']}, {info['gallery_size']} items, {info['search']} search; {url}/docs")
    if ns.detach:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0


def _index_build(ns: argparse.Namespace) -> int:
    from xmr.serve.gallery import add_approx, load_for_serving, save_index

    loaded = load_for_serving(ns.checkpoint, ns.gallery, ns.split, approx="off")
    recalls = add_approx(loaded.gallery, ns.approx) if loaded.cfg.task != "vcmr" else {}
    out = save_index(ns.out, loaded, recalls)
    print(f"[xmr] index of {loaded.gallery.size} items ({loaded.info['embed_dim']}-d) -> {out}")
    for role, r in recalls.items():
        print(f"[xmr] approximate index over modality {role}: recall@10 vs exact search = {r:.4f}")
    if not recalls:
        print("[xmr] exact search (gallery below the approximate-index threshold, or --approx off)")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="serve a checkpoint as a retrieval endpoint (Ray Serve)")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, run dir (its best checkpoint), or s3://...")
    p.add_argument("--gallery", default=None, help="dataset root whose split is searched (default: the run's data)")
    p.add_argument("--split", default="test")
    p.add_argument("--index", default=None, help="a saved index from `xmr index build` instead of encoding")
    p.add_argument("--approx", default="auto", choices=["auto", "on", "off"], help="FAISS index for large galleries")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--host", default=os.environ.get("XMR_SERVE_HOST", "127.0.0.1"),
                   help="bind address (default 127.0.0.1; 0.0.0.0 exposes the endpoint)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--detach", action="store_true", help="return once the endpoint answers")
    p.set_defaults(func=_serve)

    idx = subparsers.add_parser("index", help="build saved gallery indexes for the endpoint")
    sub = idx.add_subparsers(dest="index_command", required=True, metavar="COMMAND")
    b = sub.add_parser("build", help="encode a gallery split once (category: and a FAISS index; vcmr: the corpus's "
                                     "clip encodings) for `xmr serve --index`")
    b.add_argument("--checkpoint", required=True)
    b.add_argument("--gallery", default=None)
    b.add_argument("--split", default="test")
    b.add_argument("--out", required=True)
    b.add_argument("--approx", default="auto", choices=["auto", "on", "off"])
    b.set_defaults(func=_index_build)
