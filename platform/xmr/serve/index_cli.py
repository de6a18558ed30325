"""``xmr index build``: a gallery split encoded once into a saved index (``xmr serve --index``),
in this process, or cut into shards built by a Ray Data job (``xmr.serve.index_build``)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def _index_build(ns: argparse.Namespace) -> int:
    from xmr.progress_line import progress_every
    from xmr.serve.gallery import load_for_serving, save_index
    from xmr.serve.shards import resident_bytes
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
    with progress_every(ns.runtime.progress_every_s):  # the encoding loop's line (XMR_PROGRESS_EVERY_S)
        loaded = load_for_serving(ns.checkpoint, ns.gallery, ns.split, approx=ns.approx, ann=ann,
                                  cache_dir=ns.runtime.cache)
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
        divert_ray_console("index-build", ns.runtime.verbose)  # Ray's native ERROR lines: a log file, unless --verbose
    t0 = time.perf_counter()
    try:
        meta = build_sharded(ns.checkpoint, ns.gallery, ns.split, ns.out, ns.shards, approx=ns.approx,
                             ann_args=asdict(ann), address=ns.address, workers=ns.workers, gpu=ns.gpu,
                             runtime=ns.runtime)
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
    b.add_argument("--ann-kind", default="ivfpq", choices=["hnsw", "ivfpq", "ivf"],
                   help="approximate index kind (default ivfpq: the measured choice at 1M items, bench/serve_latency.py)")
    b.add_argument("--recall-target", type=float, default=0.95,
                   help="recall@10 vs exact search the search setting must reach (default 0.95)")
    b.add_argument("--hnsw-m", type=int, default=32, help="hnsw: links per item (default 32)")
    b.add_argument("--ef-construction", type=int, default=64, help="hnsw: build breadth (default 64)")
    b.add_argument("--nlist", type=int, default=0, help="ivf / ivfpq: inverted lists (default 4 x sqrt(n))")
    b.add_argument("--pq-m", type=int, default=0,
                   help="ivfpq: sub-quantisers, dividing the embedding size (default 0: its largest divisor up to 32)")
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
