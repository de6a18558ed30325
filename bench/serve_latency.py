"""Latency and throughput of the Serve endpoint, beside in-process search and a no-op
endpoint, all in one run on one local Ray.

- ``/search`` over galleries of 10k and 100k items (d = 256; an untrained dual encoder
  over random 256-d features, saved as an index): p50 / p99 latency and QPS at concurrency
  1, 8 and 32, and the in-process time of the same search (encoder + exact scan + top-k).
- ``/moments`` at TVR validation scale: the 2,179 val videos with their real durations
  (../shared/data/tvr, 1.5 s clips, capped at 100), d = 384, a QACLN with random weights;
  in-process mean time per query over all 10,895 queries (batches of 64), and HTTP figures.
- A no-op Serve endpoint (FastAPI ingress, same proxy path) for the floor.

Load comes from an asyncio HTTP client (aiohttp) in this process; on a 2-core machine the
client competes with the server, so the figures are conservative.

    RAY_AUTH_MODE=token python bench/serve_latency.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "token")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import write_results  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tvr"
PORT = 8321


def fake_manifest(task: str, dims: dict[str, list[int]], n: int, clip_len: float | None = None,
                  queries: int | None = None) -> dict:
    """A valid manifest describing the benchmark's in-memory gallery (no shards are read)."""
    q = {"num_queries": queries} if task == "vcmr" else {}
    return {"schema_version": 1, "name": f"bench-{task}", "task": task, "created": "",
            "modalities": {r: {"name": r, "shape": s, "dtype": "float16"} for r, s in dims.items()},
            "labels": {"kind": "none", "num_classes": []}, "clip_len": clip_len, "source": {"kind": "bench"},
            "splits": {"test": {"num_samples": n, **q, "shards": [{"path": "none.tar", "num_samples": n, **q,
                                                                   "sha256": "0" * 64, "bytes": 1}]}}}


def category_index(root: Path, n: int, d: int = 256) -> tuple[str, str]:
    """An untrained dual encoder with d-dim inputs and embeddings, and an index of n items."""
    from xmr.checkpoint import save_checkpoint
    from xmr.config import load_config
    from xmr.data.manifest import Manifest
    from xmr.method import Method
    from xmr.serve.gallery import CategoryGallery, Loaded, save_index

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
    info = {"method": cfg.method, "task": cfg.task, "model": cfg.model.name, "embed_dim": d, "gallery_size": n}
    index = str(save_index(root / f"index_cat_{n}", Loaded(method, cfg, manifest, gallery, info), {}))
    return ckpt, index


def vcmr_index(root: Path) -> tuple[str, str, int, dict]:
    from xmr.checkpoint import save_checkpoint
    from xmr.config import load_config
    from xmr.data.manifest import Manifest
    from xmr.method import Method
    from xmr.serve.gallery import Loaded, VideoCorpus, save_index

    video2dur = json.loads((SHARED / "tvr_video2dur_idx.json").read_text())["val"]
    names = list(video2dur)
    durations = [float(video2dur[v][0]) for v in names]
    n_clips = [min(100, max(1, int(-(-dur // 1.5)))) for dur in durations]
    n_queries = sum(1 for _ in open(SHARED / "tvr_val_release.jsonl"))
    cfg = load_config("qacln", ["model.embed_dim=384", "model.num_heads=8", "data.path=bench"])
    cfg.model.dims = {"visual": [1024], "subtitle": [768], "query": [768]}
    torch.manual_seed(0)
    method = Method(cfg).eval()
    ckpt = str(save_checkpoint(root / "ckpt_vcmr", method, cfg))
    g = torch.Generator().manual_seed(0)
    n_max = max(n_clips)
    mask = torch.arange(n_max)[None, :] < torch.tensor(n_clips)[:, None]
    t0 = time.perf_counter()
    parts = []
    with torch.no_grad():
        for lo in range(0, len(n_clips), 128):
            m = mask[lo:lo + 128]
            parts.append(method.model.encode_videos(torch.randn(len(m), n_max, 1024, generator=g),
                                                    torch.randn(len(m), n_max, 768, generator=g), m, m))
    enc = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    encode_s = time.perf_counter() - t0
    corpus = VideoCorpus(enc, names, torch.tensor(durations))
    manifest = Manifest.from_dict(fake_manifest("vcmr", cfg.model.dims, len(names), clip_len=1.5, queries=n_queries))
    info = {"method": cfg.method, "task": "vcmr", "model": cfg.model.name, "embed_dim": 384, "gallery_size": len(names)}
    index = str(save_index(root / "index_vcmr", Loaded(method, cfg, manifest, corpus, info), {}))
    facts = {"videos": len(names), "mean_clips": sum(n_clips) / len(n_clips), "max_clips": n_max,
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


def load(url: str, bodies: list[bytes], concurrency: int) -> dict:
    lat, wall, errors = asyncio.run(_load(url, bodies, concurrency))
    return {"concurrency": concurrency, "requests": len(lat), "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "qps": len(lat) / wall, "errors": errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from fastapi import FastAPI
    from ray import serve

    from xmr.serve.app import build_app
    from xmr.serve.gallery import load_for_serving
    from xmr.serve.search import moments_batch, search_category
    from xmr.train.driver import ensure_ray

    per_c = {1: 150, 8: 400, 32: 960} if not args.quick else {1: 40, 8: 80, 32: 160}
    sizes = [10_000, 100_000] if not args.quick else [10_000]
    tmp = Path(tempfile.mkdtemp(prefix="xmr-bench-serve-"))
    ensure_ray(None, num_cpus=4)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    base = f"http://127.0.0.1:{PORT}"

    noop_api = FastAPI()

    @serve.deployment(max_ongoing_requests=64)
    @serve.ingress(noop_api)
    class Noop:
        @noop_api.post("/noop")
        async def noop(self) -> dict:
            return {}

    serve.run(Noop.bind(), name="noop", route_prefix="/n", blocking=False)
    figures: dict = {"noop": [load(f"{base}/n/noop", [b"{}"] * n, c) for c, n in per_c.items()], "search": {},
                     "moments": {}}
    rng = np.random.default_rng(0)
    for n in sizes:
        ckpt, index = category_index(tmp, n)
        serve.run(build_app({"checkpoint": ckpt, "index": index}), name=f"cat{n}", route_prefix=f"/c{n}",
                  blocking=False)
        loaded = load_for_serving(ckpt, index=index)
        queries = rng.standard_normal((1000, 256)).astype(np.float32)
        single = []
        for q in queries[:200]:
            t = time.perf_counter()
            search_category([(loaded, "a", q, 10)])
            single.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        for lo in range(0, 960, 32):
            search_category([(loaded, "a", q, 10) for q in queries[lo:lo + 32]])
        batched = (time.perf_counter() - t) * 1000 / 960
        bodies = [json.dumps({"query": q.tolist(), "k": 10}).encode() for q in queries]
        figures["search"][n] = {"in_process_p50_ms": statistics.median(single), "in_process_batched32_ms_per_query":
                                batched, "http": [load(f"{base}/c{n}/search", bodies[:m], c) for c, m in per_c.items()]}
        serve.delete(f"cat{n}")
        del loaded

    ckpt, index, n_queries, facts = vcmr_index(tmp)
    serve.run(build_app({"checkpoint": ckpt, "index": index}), name="vcmr", route_prefix="/v", blocking=False)
    loaded = load_for_serving(ckpt, index=index)
    total = n_queries if not args.quick else 640
    g = np.random.default_rng(1)
    t = time.perf_counter()
    for lo in range(0, total, 64):
        m = min(64, total - lo)
        moments_batch([(loaded, g.standard_normal((20, 768)).astype(np.float32), 100) for _ in range(m)])
    mean_ms = (time.perf_counter() - t) * 1000 / total
    single = []
    for _ in range(20):
        tok = g.standard_normal((20, 768)).astype(np.float32)
        t = time.perf_counter()
        moments_batch([(loaded, tok, 10)])
        single.append((time.perf_counter() - t) * 1000)
    bodies = [json.dumps({"query": g.standard_normal((20, 768)).astype(np.float32).round(4).tolist(), "k": 10}).encode()
              for _ in range(max(per_c.values()) // 2)]
    m_per_c = {1: 40, 8: 160, 32: len(bodies)} if not args.quick else {1: 10, 8: 40, 32: len(bodies)}
    figures["moments"] = {**facts, "queries_in_process": total, "in_process_mean_ms_per_query": mean_ms,
                          "in_process_single_p50_ms": statistics.median(single),
                          "http": [load(f"{base}/v/moments", bodies[:m], c) for c, m in m_per_c.items()]}
    serve.shutdown()

    noop_c1 = figures["noop"][0]["p50_ms"]
    print(f"\nno-op endpoint: " + ", ".join(f"c={r['concurrency']} p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms "
                                           f"{r['qps']:.0f} QPS" for r in figures["noop"]))
    print(f"{'endpoint':<22}{'in-proc ms':>11}{'c':>4}{'p50 ms':>9}{'p99 ms':>9}{'QPS':>8}{'errors':>7}")
    for n, f in figures["search"].items():
        for r in f["http"]:
            print(f"{'/search ' + str(n):<22}{f['in_process_p50_ms']:>11.2f}{r['concurrency']:>4}{r['p50_ms']:>9.1f}"
                  f"{r['p99_ms']:>9.1f}{r['qps']:>8.0f}{r['errors']:>7}")
    mo = figures["moments"]
    for r in mo["http"]:
        print(f"{'/moments TVR-val':<22}{mo['in_process_single_p50_ms']:>11.2f}{r['concurrency']:>4}{r['p50_ms']:>9.1f}"
              f"{r['p99_ms']:>9.1f}{r['qps']:>8.0f}{r['errors']:>7}")
    print(f"/moments in process: {mo['in_process_mean_ms_per_query']:.2f} ms mean per query over {total} queries "
          f"(batches of 64; {mo['videos']} videos, mean {mo['mean_clips']:.1f} clips, d=384)")
    big = figures["search"][max(sizes)]
    qps = {r["concurrency"]: r["qps"] for r in big["http"]}
    headline = {"moments_mean_ms_in_process": mo["in_process_mean_ms_per_query"],
                "search_http_p50_ms_c1": big["http"][0]["p50_ms"], "noop_http_p50_ms_c1": noop_c1,
                "search_in_process_p50_ms": big["in_process_p50_ms"], "qps_c32_over_c1": qps[32] / qps[1],
                "search_gallery_size": max(sizes)}
    write_results(__file__, {**figures, "quick": args.quick}, headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
