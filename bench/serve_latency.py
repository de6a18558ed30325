"""Latency and throughput of the Serve endpoint, beside in-process search and a no-op
endpoint, for both ways HTTP reaches a replica, all in one run.

- ``/search`` over galleries of 10k and 100k items (d = 256; an untrained dual encoder
  over random 256-d features, saved as an index): p50 / p99 latency and QPS at concurrency
  1, 8 and 32, and the in-process time of the same search (encoder + exact scan + top-k),
  measured with the replica's own thread count (its ``num_cpus``) and with every core.
- ``/moments`` at TVR validation scale: the 2,179 val videos with their real durations
  (../shared/data/tvr, 1.5 s clips, capped at 100), d = 384, a QACLN with random weights;
  in-process mean time per query over all 10,895 queries (batches of 64), and HTTP figures.
- A no-op Serve endpoint (FastAPI ingress, same path) for the floor.
- Two ingress paths, each on a fresh local Ray: ``proxy`` (Serve's default: HTTP proxy
  actor -> replica) and ``direct`` (``xmr serve --direct``: RAY_SERVE_THROUGHPUT_OPTIMIZED,
  the replica answers HTTP on its own port).
- Per load phase, the replica's batching counters (/info): mean batch and compute per batch.
- ``--million`` (or ``--only-million``, which updates that section of the last results):
  ``/search`` over 1,000,000 x 256 items through the saved approximate index of
  bench/_million.py (both kinds measured, the faster one at recall@10 >= 0.95 kept):
  the raw index's and the endpoint's in-process p50 / p99 on one thread, the reload time,
  and HTTP p50 / p99 / QPS at concurrency 1, 8 and 32 on each ingress path.

In-process figures are taken first, with no Ray running. Load comes from an asyncio HTTP
client (aiohttp) in the driver process; on a 2-core machine it competes with the server.

    RAY_AUTH_MODE=token python bench/serve_latency.py [--quick] [--modes proxy,direct] [--million | --only-million]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import TVR, fake_manifest, tvr_val_corpus, write_results  # noqa: E402

PORT = 8321
REPLICA_THREADS = 1  # the Retriever's ray_actor_options num_cpus: Ray sets OMP_NUM_THREADS to it
MODE_ENV = {"proxy": {}, "direct": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                                    # deleting an app otherwise drains its replica for 30 s
                                    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}}


def category_index(root: Path, n: int, d: int = 256) -> tuple[str, str]:
    """An untrained dual encoder with d-dim inputs and embeddings, and an index of n items."""
    from xmr.checkpoint import save_checkpoint
    from xmr.config import load_config
    from xmr.data.manifest import Manifest
    from xmr.method import Method
    from xmr.serve.gallery import Loaded, save_index
    from xmr.tasks.category import CategoryGallery

    cfg = load_config("triplet_pair", [f"model.embed_dim={d}", "model.hidden_dim=512", "data.path=bench"])
    cfg.model.dims = {"a": [d], "b": [d]}
    torch.manual_seed(0)
    method = Method(cfg).eval()
    ckpt = str(save_checkpoint(root / f"ckpt_cat_{n}", method, cfg))
    g = torch.Generator().manual_seed(n)
    emb = {}
    with torch.no_grad():
        for role in ("a", "b"):
            emb[role] = torch.cat([method.model.encode(role, torch.randn(min(8192, n - lo), d, generator=g)).float()
                                   for lo in range(0, n, 8192)])
    gallery = CategoryGallery(emb, [f"item-{i:06d}" for i in range(n)], [None] * n)
    manifest = Manifest.from_dict(fake_manifest("category", cfg.model.dims, n))
    info = {"method": cfg.method, "task": cfg.task, "model": cfg.model.name, "embed_dim": d, "gallery_size": n,
            "input_dims": cfg.model.dims}
    index = str(save_index(root / f"index_cat_{n}", Loaded(method.model, cfg, manifest, gallery, info), {}))
    return ckpt, index


def vcmr_index(root: Path) -> tuple[str, str, int, dict]:
    from xmr.checkpoint import save_checkpoint
    from xmr.config import load_config
    from xmr.data.manifest import Manifest
    from xmr.method import Method
    from xmr.serve.gallery import Loaded, save_index
    from xmr.tasks.vcmr import VideoCorpus

    n_queries = sum(1 for _ in open(TVR / "tvr_val_release.jsonl"))
    cfg = load_config("qacln", ["model.embed_dim=384", "model.num_heads=8", "data.path=bench"])
    cfg.model.dims = {"visual": [1024], "subtitle": [768], "query": [768]}
    torch.manual_seed(0)
    method = Method(cfg).eval()
    ckpt = str(save_checkpoint(root / "ckpt_vcmr", method, cfg))
    enc, names, durations, encode_s = tvr_val_corpus(method.model)
    n_clips = enc["clip_mask"].sum(dim=1).tolist()
    corpus = VideoCorpus(enc, names, torch.tensor(durations))
    manifest = Manifest.from_dict(fake_manifest("vcmr", cfg.model.dims, len(names), clip_len=1.5, queries=n_queries))
    info = {"method": cfg.method, "task": "vcmr", "model": cfg.model.name, "embed_dim": 384, "gallery_size": len(names),
            "input_dims": cfg.model.dims}
    index = str(save_index(root / "index_vcmr", Loaded(method.model, cfg, manifest, corpus, info), {}))
    facts = {"videos": len(names), "mean_clips": sum(n_clips) / len(n_clips), "max_clips": int(enc["clip_mask"].shape[1]),
             "val_queries": n_queries, "video_encode_s": encode_s}
    return ckpt, index, n_queries, facts


async def _load(url: str, bodies: list[bytes], concurrency: int) -> tuple[list[float], float, int]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    queue = list(range(len(bodies)))

    async def worker(session):
        nonlocal errors
        while queue:
            i = queue.pop()
            t = time.perf_counter()
            async with session.post(url, data=bodies[i], headers={"Content-Type": "application/json"}) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
            latencies.append((time.perf_counter() - t) * 1000)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        for b in bodies[: min(8, len(bodies))]:  # warm the connection pool and the replica
            async with session.post(url, data=b, headers={"Content-Type": "application/json"}) as r:
                await r.read()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return latencies, wall, errors


async def _side_by_side(search_url: str, noop_url: str, bodies: list[bytes], local) -> dict[str, list[float]]:
    import aiohttp

    out: dict[str, list[float]] = {"noop": [], "search": [], "in_process": []}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2)) as session:
        async def post(url: str, body: bytes) -> float:
            t = time.perf_counter()
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url}: HTTP {r.status}")
            return (time.perf_counter() - t) * 1000

        for b in bodies[:8]:  # warm
            await post(noop_url, b"{}")
            await post(search_url, b)
        for i, b in enumerate(bodies):
            out["noop"].append(await post(noop_url, b"{}"))
            out["search"].append(await post(search_url, b))
            out["in_process"].append(timed_ms(lambda: local(i), 1)[0])
    return out


def side_by_side(search_url: str, noop_url: str, bodies: list[bytes], local) -> dict:
    """Concurrency 1, interleaved query by query: a no-op request, the search request and the
    same search in this process (at the replica's thread count), so the machine's drift on a
    shared host hits all three alike. p50 of each."""
    lat = asyncio.run(_side_by_side(search_url, noop_url, bodies, local))
    return {f"{k}_p50_ms": float(np.percentile(v, 50)) for k, v in lat.items()} | {"requests": len(bodies)}


def load(url: str, bodies: list[bytes], concurrency: int) -> dict:
    lat, wall, errors = asyncio.run(_load(url, bodies, concurrency))
    return {"concurrency": concurrency, "requests": len(lat), "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "qps": len(lat) / wall, "errors": errors}


def _json(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=60).read())


def phase(url: str, info_url: str, bodies: list[bytes], concurrency: int, endpoint: str) -> dict:
    """One load phase, with the replica's batching counters over exactly that phase."""
    before = _json(info_url)["batching"][endpoint] if info_url else None
    row = load(url, bodies, concurrency)
    if before is not None:
        after = _json(info_url)["batching"][endpoint]
        batches = after["batches"] - before["batches"]
        queries = after["queries"] - before["queries"]
        compute_ms = 1000 * (after["compute_s"] - before["compute_s"])
        row.update(mean_batch=queries / max(batches, 1), compute_ms_per_batch=compute_ms / max(batches, 1))
    return row


def timed_ms(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def in_process(plan: dict, quick: bool) -> dict:
    """The same searches as the endpoint's, in this process, before any Ray starts."""
    from xmr.serve.gallery import load_for_serving
    from xmr.serve.search import moments_items, search_items

    cores = torch.get_num_threads()
    figures: dict = {"search": {}, "cores": cores}
    queries = np.random.default_rng(0).standard_normal((1000, 256)).astype(np.float32)
    for n, paths in plan["search"].items():
        loaded = load_for_serving(paths["ckpt"], index=paths["index"])
        row = {}
        for threads in sorted({REPLICA_THREADS, cores}):
            torch.set_num_threads(threads)
            search_items([(loaded, "a", queries[0], 10)])  # warm
            single = [timed_ms(lambda q=q: search_items([(loaded, "a", q, 10)]), 1)[0] for q in queries[:200]]
            t = time.perf_counter()
            for lo in range(0, 960, 32):
                search_items([(loaded, "a", q, 10) for q in queries[lo:lo + 32]])
            row[threads] = {"p50_ms": statistics.median(single),
                            "batched32_ms_per_query": (time.perf_counter() - t) * 1000 / 960}
        torch.set_num_threads(cores)
        figures["search"][n] = row
        del loaded
    loaded = load_for_serving(plan["vcmr"]["ckpt"], index=plan["vcmr"]["index"])
    total = plan["vcmr"]["queries"] if not quick else 640
    g = np.random.default_rng(1)
    tokens = [g.standard_normal((20, 768)).astype(np.float32) for _ in range(64)]
    moments_items([(loaded, tok, 100) for tok in tokens])  # warm
    compute_ms = 0.0
    for lo in range(0, total, 64):  # only the search is timed, not making up the query tokens
        batch = [(loaded, g.standard_normal((20, 768)).astype(np.float32), 100) for _ in range(min(64, total - lo))]
        compute_ms += timed_ms(lambda: moments_items(batch), 1)[0]
    figures["moments"] = {"queries": total, "mean_ms_per_query": compute_ms / total,
                          "single_p50_ms": statistics.median(timed_ms(lambda: moments_items([(loaded, tokens[0], 10)]), 20))}
    return figures


def child(mode: str, plan: dict) -> dict:
    """HTTP figures for one ingress path, on a fresh local Ray started by this process."""
    from fastapi import FastAPI
    from ray import serve

    from xmr.serve.app import build_app
    from xmr.ray.serve import direct_urls
    from xmr.serve.gallery import load_for_serving
    from xmr.serve.search import search_items
    from xmr.ray.session import ensure_ray

    torch.set_num_threads(REPLICA_THREADS)  # this process's own searches run like the replica's
    per_c = {int(c): n for c, n in plan["per_c"].items()}
    ensure_ray(None, num_cpus=4)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})

    def base(app: str, prefix: str) -> str:
        return direct_urls(app, prefix)[0] if mode == "direct" else f"http://127.0.0.1:{PORT}{prefix}"

    noop_api = FastAPI()

    @serve.deployment(max_ongoing_requests=64, logging_config={"enable_access_log": False})
    @serve.ingress(noop_api)
    class Noop:
        @noop_api.post("/noop")
        async def noop(self) -> dict:
            return {}

    serve.run(Noop.bind(), name="noop", route_prefix="/n", blocking=False)
    noop_url = f"{base('noop', '/n')}/noop"
    out: dict = {"noop": [phase(noop_url, "", [b"{}"] * n, c, "") for c, n in per_c.items()], "search": {}}
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((1000, 256)).astype(np.float32)
    bodies = [json.dumps({"query": q.tolist(), "k": 10}).encode() for q in queries]
    for n, paths in plan["search"].items():
        serve.run(build_app({"checkpoint": paths["ckpt"], "index": paths["index"]}), name=f"cat{n}",
                  route_prefix=f"/c{n}", blocking=False)
        url = base(f"cat{n}", f"/c{n}")
        loaded = load_for_serving(paths["ckpt"], index=paths["index"])
        side = side_by_side(f"{url}/search", noop_url, bodies[:per_c[1]],
                            lambda i, loaded=loaded: search_items([(loaded, "a", queries[i], 10)]))
        del loaded
        out["search"][n] = {"side_by_side_c1": side,
                            "http": [phase(f"{url}/search", f"{url}/info", bodies[:m], c, "search")
                                     for c, m in per_c.items()]}
        out["torch_threads"] = _json(f"{url}/info")["torch_threads"]
        serve.delete(f"cat{n}")
    serve.run(build_app({"checkpoint": plan["vcmr"]["ckpt"], "index": plan["vcmr"]["index"]}), name="vcmr",
              route_prefix="/v", blocking=False)
    url = base("vcmr", "/v")
    g = np.random.default_rng(1)
    mbodies = [json.dumps({"query": g.standard_normal((20, 768)).astype(np.float32).round(4).tolist(), "k": 10}).encode()
               for _ in range(max(per_c.values()) // 2)]
    m_per_c = {c: max(10, n // 4) if c < 32 else len(mbodies) for c, n in per_c.items()}
    out["moments"] = [phase(f"{url}/moments", f"{url}/info", mbodies[:m], c, "moments") for c, m in m_per_c.items()]
    return out


def million_child(mode: str, plan: dict) -> dict:
    """HTTP figures of /search over the million-item index, on a fresh local Ray."""
    from ray import serve

    from xmr.serve.app import build_app
    from xmr.ray.serve import direct_urls
    from xmr.ray.session import ensure_ray

    m = plan["million"]
    ensure_ray(None, num_cpus=4)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    t = time.perf_counter()
    serve.run(build_app({"checkpoint": m["ckpt"], "index": m["index"]}), name="million", route_prefix="/m",
              blocking=False)
    url = direct_urls("million", "/m")[0] if mode == "direct" else f"http://127.0.0.1:{PORT}/m"
    while True:  # the replica loads 1M items before it answers
        try:
            _json(f"{url}/info")
            break
        except Exception:  # noqa: BLE001 - not up yet
            if time.perf_counter() - t > 900:
                raise
            time.sleep(1.0)
    ready_s = time.perf_counter() - t
    queries = np.load(m["queries"])
    bodies = [json.dumps({"query": q.tolist(), "k": 10}).encode() for q in queries]
    phase(f"{url}/search", "", bodies[:50], 4, "search")  # warm
    rows = [phase(f"{url}/search", f"{url}/info", bodies[:n], int(c), "search") for c, n in plan["per_c"].items()]
    return {"ready_s": ready_s, "http": rows}


def million_section(cache: Path, items: int, modes: list[str], quick: bool) -> dict:
    from _million import ensure_million_index, reload_check

    m = ensure_million_index(cache, n=items, log=lambda s: print(s, flush=True))
    queries_path = Path(m["index"]).parent / "queries.npy"
    print("[bench] million: in-process (reload, endpoint search on 1 thread) ...", flush=True)
    inproc = reload_check(m["ckpt"], m["index"], np.load(queries_path))
    plan = {"million": {"ckpt": m["ckpt"], "index": m["index"], "queries": str(queries_path)},
            "per_c": {"1": 150, "8": 400, "32": 960} if not quick else {"1": 40, "8": 80, "32": 160}}
    plan_path = cache / "million_plan.json"
    plan_path.write_text(json.dumps(plan))
    http = run_children(modes, plan_path, child_flag="--child-million")
    chosen = m["choice"][m["chosen"]]
    return {"gallery": m["gallery"], "choice": m["choice"], "chosen": m["chosen"], "index_cached": m["cached"],
            "in_process": inproc, "http": http,
            "headline": {"million_index_kind": m["chosen"], "million_recall10": chosen["recall_at_10"],
                         "million_index_p50_ms": chosen["p50_ms_1thread"],
                         "million_endpoint_p50_ms_in_process": inproc["endpoint_search_p50_ms_1thread"],
                         "million_reload_s": inproc["load_s"],
                         **{f"million_http_p50_ms_c1_{mode}": next(r["p50_ms"] for r in f["http"]
                                                                    if r["concurrency"] == 1)
                            for mode, f in http.items()}}}


def print_million(sec: dict) -> None:
    print(f"\n/search over {sec['gallery']['items']:,} x {sec['gallery']['dim']} (index chosen: {sec['chosen']}):")
    for kind, f in sec["choice"].items():
        print(f"  {kind:<6} built {f['build_s']:.0f} s, recall@10 {f['recall_at_10']:.4f} {f['search_params']}, "
              f"{f['bytes_per_item']:.0f} B/item, index p50 {f['p50_ms_1thread']:.2f} / p99 {f['p99_ms_1thread']:.2f} ms")
    ip = sec["in_process"]
    print(f"  reload {ip['load_s']:.1f} s; endpoint search in process (encoder + index, 1 thread): p50 "
          f"{ip['endpoint_search_p50_ms_1thread']:.2f} / p99 {ip['endpoint_search_p99_ms_1thread']:.2f} ms")
    for mode, f in sec["http"].items():
        for r in f["http"]:
            print(f"  {mode:<7} c={r['concurrency']:<3} p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} ms, "
                  f"{r['qps']:.0f} QPS, mean batch {r.get('mean_batch', float('nan')):.1f}, errors {r['errors']}")


def run_children(modes: list[str], plan_path: Path, child_flag: str = "--child") -> dict:
    results = {}
    for mode in modes:
        out = plan_path.with_name(f"http_{mode}{child_flag.replace('--child', '')}.json")
        env = {**os.environ, **MODE_ENV[mode]}
        print(f"[bench] HTTP figures, {mode} ingress ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, child_flag, mode, "--plan", str(plan_path), "--out", str(out)],
                              env=env, timeout=1500)
        if proc.returncode != 0:
            raise SystemExit(f"the {mode} run failed (exit {proc.returncode})")
        results[mode] = json.loads(out.read_text())
    return results


def print_tables(inproc: dict, http: dict, threads: int) -> None:
    print(f"\nin process, no Ray running ({threads} thread(s) = the replica's, and {inproc['cores']} = every core):")
    for n, row in inproc["search"].items():
        print("  /search %-7s" % n + ", ".join(f"{t} thr: p50 {r['p50_ms']:.2f} ms, batched-32 {r['batched32_ms_per_query']:.2f} "
                                              f"ms/query" for t, r in row.items()))
    mo = inproc["moments"]
    print(f"  /moments TVR-val: {mo['mean_ms_per_query']:.2f} ms mean per query over {mo['queries']} queries "
          f"(batches of 64, {inproc['cores']} threads); single query p50 {mo['single_p50_ms']:.1f} ms")
    print(f"\n{'ingress':<8}{'endpoint':<18}{'c':>4}{'p50 ms':>9}{'p99 ms':>9}{'QPS':>8}{'batch':>7}{'comp ms':>9}{'err':>5}")
    for mode, f in http.items():
        rows = [("no-op", r) for r in f["noop"]] + [(f"/search {n}", r) for n, rs in f["search"].items() for r in rs["http"]] + \
               [("/moments TVR", r) for r in f["moments"]]
        for name, r in rows:
            print(f"{mode:<8}{name:<18}{r['concurrency']:>4}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['qps']:>8.0f}"
                  f"{r.get('mean_batch', float('nan')):>7.1f}{r.get('compute_ms_per_batch', float('nan')):>9.1f}"
                  f"{r['errors']:>5}")
    print("\nc=1 side by side (no-op request, search request, the same search in process; p50 ms):")
    for mode, f in http.items():
        for n, rs in f["search"].items():
            side = rs["side_by_side_c1"]
            print(f"  {mode:<7}/search {n:<7} no-op {side['noop_p50_ms']:.2f}  HTTP {side['search_p50_ms']:.2f}  "
                  f"in-process {side['in_process_p50_ms']:.2f}  endpoint's own cost "
                  f"{side['search_p50_ms'] - side['noop_p50_ms'] - side['in_process_p50_ms']:.2f}")


def summary(http: dict, size: str) -> dict:
    """The issue's targets per ingress path: the c=1 latency from the side-by-side phase
    (no-op, endpoint and in-process search interleaved), the QPS ratio from the load phases."""
    out = {}
    for mode, f in http.items():
        side = f["search"][size]["side_by_side_c1"]
        rows = {r["concurrency"]: r for r in f["search"][size]["http"]}
        out[mode] = {"search_http_p50_ms_c1": side["search_p50_ms"], "noop_http_p50_ms_c1": side["noop_p50_ms"],
                     "search_in_process_p50_ms": side["in_process_p50_ms"],
                     "endpoint_overhead_ms": side["search_p50_ms"] - side["noop_p50_ms"] - side["in_process_p50_ms"],
                     "qps_c32_over_c1": rows[32]["qps"] / rows[1]["qps"]}
        out[mode]["latency_target_met"] = out[mode]["endpoint_overhead_ms"] <= 2.0
        out[mode]["batching_target_met"] = out[mode]["qps_c32_over_c1"] >= 4.0
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--modes", default="proxy,direct")
    parser.add_argument("--million", action="store_true", help="add /search over a 1,000,000-item index")
    parser.add_argument("--only-million", action="store_true",
                        help="measure only the million-item section and update it in the last results file")
    parser.add_argument("--items", type=int, default=1_000_000, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=os.environ.get("XMR_BENCH_CACHE", "/tmp/xmr-bench-cache"),
                        help="where the million-item index is kept between runs")
    parser.add_argument("--child", choices=list(MODE_ENV), help=argparse.SUPPRESS)
    parser.add_argument("--child-million", choices=list(MODE_ENV), help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.out).write_text(json.dumps(child(args.child, json.loads(Path(args.plan).read_text()))))
        return 0
    if args.child_million:
        Path(args.out).write_text(json.dumps(million_child(args.child_million, json.loads(Path(args.plan).read_text()))))
        return 0
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODE_ENV)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)} (known: {sorted(MODE_ENV)})")
    if args.only_million:
        return update_million(Path(args.cache), args.items, modes, args.quick)
    tmp = Path(tempfile.mkdtemp(prefix="xmr-bench-serve-"))
    sizes = [10_000, 100_000] if not args.quick else [10_000]
    plan: dict = {"search": {}, "per_c": {1: 150, 8: 400, 32: 960} if not args.quick else {1: 40, 8: 80, 32: 160}}
    for n in sizes:
        ckpt, index = category_index(tmp, n)
        plan["search"][str(n)] = {"ckpt": ckpt, "index": index}
    ckpt, index, n_queries, facts = vcmr_index(tmp)
    plan["vcmr"] = {"ckpt": ckpt, "index": index, "queries": n_queries}
    plan_path = tmp / "plan.json"
    plan_path.write_text(json.dumps(plan))
    print("[bench] in-process figures (no Ray running) ...", flush=True)
    inproc = in_process(plan, args.quick)
    http = run_children(modes, plan_path)
    threads = http[modes[0]]["torch_threads"]
    if threads not in inproc["search"][str(sizes[0])]:
        raise SystemExit(f"the replica ran {threads} torch threads; in-process figures exist for "
                         f"{sorted(inproc['search'][str(sizes[0])])} (set REPLICA_THREADS)")
    print_tables(inproc, http, threads)
    big = str(max(sizes))
    targets = summary(http, big)
    mo = inproc["moments"]["mean_ms_per_query"]
    print(f"\ntargets ({big}-item gallery; c=1 figures interleaved query by query, in-process at {threads} thread(s)):")
    print(f"  /moments in process {mo:.2f} ms/query (target < 5.32): {'met' if mo < 5.32 else 'MISSED'}")
    for mode, t in targets.items():
        print(f"  {mode:<7} HTTP p50 c1 {t['search_http_p50_ms_c1']:.2f} = no-op {t['noop_http_p50_ms_c1']:.2f} + "
              f"in-process {t['search_in_process_p50_ms']:.2f} + {t['endpoint_overhead_ms']:.2f} ms (target <= 2): "
              f"{'met' if t['latency_target_met'] else 'MISSED'}; QPS c32/c1 {t['qps_c32_over_c1']:.2f} "
              f"(target >= 4): {'met' if t['batching_target_met'] else 'MISSED'}")
    million = million_section(Path(args.cache), args.items, modes, args.quick) if args.million else None
    if million:
        print_million(million)
    lead = "direct" if "direct" in targets else modes[0]
    headline = {"moments_mean_ms_in_process": mo,
                **{k: v for k, v in targets[lead].items() if not k.endswith("_met")}, "search_gallery_size": int(big),
                "headline_ingress": lead,
                **{f"{k}_{m}": v for m, t in targets.items() if m != lead for k, v in t.items() if not k.endswith("_met")}}
    figures = {"in_process_quiet": inproc, "http": http, "targets": targets, "moments_corpus": facts,
               "replica_threads": threads, "quick": args.quick}
    if million:
        figures["million"] = million
        headline.update(million["headline"])
    write_results(__file__, figures, headline)
    return 0


def update_million(cache: Path, items: int, modes: list[str], quick: bool) -> int:
    """``--only-million``: measure that section and put it into the last results, dated."""
    import datetime

    from _common import RESULTS, machine

    path = RESULTS / "serve_latency.json"
    last = json.loads(path.read_text()) if path.is_file() else {"figures": {}, "headline": {}}
    sec = million_section(cache, items, modes, quick)
    print_million(sec)
    sec["measured"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "machine": machine(), "note": "measured alone (--only-million); the other sections are "
                                                     "from the date at the top of this file"}
    last["figures"]["million"] = sec
    last["headline"].update(sec["headline"])
    path.write_text(json.dumps(last, indent=2, default=float))
    print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
