"""A gallery past one replica, served sharded: ``xmr serve --index`` over a synthetic
clustered gallery of 4,000,000 x 256 items in 4 shards, driven by ``hey`` (issue 25).

- The gallery is bench/_million.py's recipe at four times the size: inputs drawn around
  2,000 class centres, encoded by the checkpoint's query tower; queries are fresh draws
  that the endpoint encodes with the same tower. One embedding table serves both sides
  (stored and held once per shard). Each shard is written as ``xmr index build --shards``
  writes it (contiguous quarters, ``shards.json`` last); the encoding is done here in one
  process because the data are synthetic inputs, not a dataset's shards.
- Search is exact (float32, with the certified float16 pre-scan: half the bytes per scan;
  the float16 copy is what memory pays for it). Recall@10 against exact search over the
  whole gallery (numpy, float32) is measured on the endpoint's own answers for 100 fresh
  queries: it checks the scatter-gather merge, and would show an approximate index's loss.
  An approximate per-shard index (``--approx on``) trades memory and build time this
  2-core machine cannot spare at 4M items (HNSW over 1M x 256 alone: bench/serve_load.py).
- ``xmr serve --checkpoint ... --index DIR`` starts as a user starts it, in its own process
  with its own embedded Ray: a retriever deployment per shard (``--replicas`` each), the
  gateway scattering every query and merging the shards' top-k.
- ``hey`` at concurrency 1, 8 and 32: p50, p99, QPS, errors (non-200 or no answer).
- One shard's replica SIGKILLed under load at concurrency 8 (by its process title): errors
  (non-200) and answers flagged ``partial`` (from ``/info``) are counted; a partial answer
  is a 200 that names the missing shard.
- Memory per replica: each retriever replica's RSS (``/proc``) once serving.

On this 2-core machine hey, the proxy, the gateway and the replicas share the cores:
latency is this machine's; the figures per shard are what the sizing in docs/design.md uses.

    RAY_AUTH_MODE=token python bench/serve_shards.py [--items 4000000] [--shards 4] [--replicas 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402

from _common import fake_manifest, write_results  # noqa: E402
from _million import DIM, _model, draw_inputs, encode  # noqa: E402
from serve_load import hey, load_with_kill, start_server  # noqa: E402

PORT = 8361


def build(cache: Path, n: int, shards: int, log=print) -> dict:
    """The sharded index folder (cached), its checkpoint, and how long writing it took."""
    from xmr.data.manifest import Manifest
    from xmr.data.plan import near_equal
    from xmr.serve.gallery import Loaded, save_index
    from xmr.serve.shards import is_sharded, shard_name, write_manifest
    from xmr.tasks.category import CategoryGallery

    root = cache / f"sharded-{n}-{shards}"
    out = root / "index"
    if is_sharded(str(out)):
        return {**json.loads((root / "build.json").read_text()), "cached": True}
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    method, cfg, ckpt = _model(root)
    t0 = time.perf_counter()
    manifest = Manifest.from_dict(fake_manifest("category", {"a": [DIM], "b": [DIM]}, n))
    offset = 0
    for i, size in enumerate(near_equal(n, shards)):
        t = time.perf_counter()
        items = torch.from_numpy(encode(method.model, draw_inputs(size, seed=100 + i)))
        g = CategoryGallery({"a": items, "b": items}, [f"item-{offset + j:08d}" for j in range(size)], [None] * size)
        info = {"method": cfg.method, "task": cfg.task, "model": cfg.model.name, "embed_dim": DIM,
                "gallery_size": size, "search": "exact", "shard": {"index": i, "of": shards}}
        save_index(out / shard_name(i), Loaded(method.model, cfg, manifest, g, info), {})
        log(f"[bench] shard {i + 1}/{shards}: {size:,} items in {time.perf_counter() - t:.0f} s")
        offset += size
        del g, items
    write_manifest(str(out), shards, ckpt, "synthetic", "test", n)
    meta = {"ckpt": ckpt, "index": str(out), "build_s": time.perf_counter() - t0, "items": n, "shards": shards}
    (root / "build.json").write_text(json.dumps(meta))
    return {**meta, "cached": False}


def exact_top10(index: Path, shards: int, queries: np.ndarray) -> list[list[str]]:
    """Exact top 10 over the whole gallery (numpy float32, shard by shard, merged)."""
    from safetensors.numpy import load_file

    from xmr.serve.shards import shard_name

    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_id: np.ndarray = np.zeros((len(queries), 0), dtype=object)
    for i in range(shards):
        folder = index / shard_name(i)
        emb = load_file(str(folder / "embeddings.safetensors"))["emb_a"]
        ids = np.array(json.loads((folder / "items.json").read_text())["ids"], dtype=object)
        s = queries @ emb.T
        top = np.argpartition(-s, 10, axis=1)[:, :10]
        best_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
        best_id = np.concatenate([best_id, ids[top]], 1)
        del emb, s
    order = np.argsort(-best_s, axis=1, kind="stable")[:, :10]
    return np.take_along_axis(best_id, order, 1).tolist()


def replica_rss_mb() -> dict[str, float]:
    """RSS of every retriever replica process, by its title (ray::ServeReplica:xmr:RetrieverNNN)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if title.startswith("ray::ServeReplica:xmr:Retriever"):
                rss = next(int(ln.split()[1]) for ln in (entry / "status").read_text().splitlines()
                           if ln.startswith("VmRSS:"))
                out[f"{title.split(':')[-1]}#{entry.name}"] = rss / 1024
        except (OSError, StopIteration):
            pass
    return out


def kill_phase(url: str, body: Path, n: int) -> dict:
    """Load at concurrency 8; shard 1's replica SIGKILLed 3 s in."""
    before = requests.get(f"{url}/info", timeout=60).json()["partial_answers"]
    pids = [int(k.split("#")[1]) for k in replica_rss_mb() if k.startswith("Retriever001")]
    result = load_with_kill(url, body, n, pids[0])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=10).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1.0)
    result["partial_answers"] = requests.get(f"{url}/info", timeout=60).json()["partial_answers"] - before
    result["killed_pid"] = pids[0]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=4_000_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--replicas", type=int, default=1, help="retriever replicas per shard")
    ap.add_argument("--cache", default=os.environ.get("XMR_BENCH_CACHE", "/tmp/xmr-bench-cache"))
    ap.add_argument("--quick", action="store_true", help="fewer requests per phase")
    args = ap.parse_args()
    if shutil.which("hey") is None:
        print("bench/serve_shards.py needs hey (Debian package 'hey'): run `make bench`, or "
              "`apt-get install -y hey` as root", file=sys.stderr)
        return 2
    cache = Path(args.cache)
    print(f"[bench] sharded gallery: {args.items:,} x {DIM} in {args.shards} shards ...", flush=True)
    built = build(cache, args.items, args.shards)
    work = cache / "shards-load"
    work.mkdir(parents=True, exist_ok=True)
    method_q = draw_inputs(100, seed=7)
    body = work / "query.json"
    body.write_text(json.dumps({"query": method_q[0].tolist(), "k": 10}))
    print("[bench] starting xmr serve ...", flush=True)
    t = time.perf_counter()
    proc, url = start_server("proxy", built["ckpt"], built["index"], work / "serve.log", replicas=args.replicas,
                             port=PORT, wait_s=1800)
    start_s = time.perf_counter() - t
    fig: dict = {"items": args.items, "shards": args.shards, "replicas_per_shard": args.replicas, "dim": DIM,
                 "build_s": built["build_s"], "build_cached": built["cached"], "start_s": start_s,
                 "search": "exact (float32, certified float16 pre-scan)", "phases": []}
    try:
        fig["replica_rss_mb"] = replica_rss_mb()
        print("[bench] recall@10 of the endpoint's answers against exact search ...", flush=True)
        from xmr.method import load_model

        model, _ = load_model(built["ckpt"])  # the tower the endpoint encodes queries with
        model.eval()
        with torch.no_grad():
            q_emb = model.encode("a", torch.from_numpy(method_q)).float().numpy()
        exact = exact_top10(Path(built["index"]), args.shards, q_emb)
        hits, partial = 0, 0
        for row, q in enumerate(method_q):
            got = requests.post(f"{url}/search", json={"query": q.tolist(), "k": 10}, timeout=120).json()
            partial += bool(got.get("partial"))
            hits += len({h["id"] for h in got["results"]} & set(exact[row]))
        fig["recall10"] = hits / (10 * len(method_q))
        fig["recall_partial_answers"] = partial
        hey(f"{url}/search", body, "application/json", 16, 4)  # warm
        per_c = {1: 60, 8: 160, 32: 320} if not args.quick else {1: 20, 8: 48, 32: 96}
        for c, n in per_c.items():
            before = requests.get(f"{url}/info", timeout=60).json()["partial_answers"]
            fig["phases"].append(hey(f"{url}/search", body, "application/json", n, c))
            # a 200 that names a shard past its deadline (queueing at high concurrency)
            fig["phases"][-1]["partial_answers"] = requests.get(f"{url}/info", timeout=60).json()["partial_answers"] - before
            print(f"[bench]   c={c}: {fig['phases'][-1]}", flush=True)
        print("[bench] a shard's replica killed under load ...", flush=True)
        fig["kill"] = kill_phase(url, body, 240 if not args.quick else 80)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            fig["shutdown_exit"] = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            fig["shutdown_exit"] = proc.wait()
    print(f"\n{'phase':10s} {'p50 ms':>9s} {'p99 ms':>9s} {'QPS':>7s} {'errors':>7s} {'partial':>8s}")
    for p in fig["phases"]:
        print(f"c={p['concurrency']:<8d} {p['p50_ms']:9.1f} {p['p99_ms']:9.1f} {p['qps']:7.2f} {p['errors']:7d} "
              f"{p['partial_answers']:8d}")
    k = fig["kill"]
    print(f"shard kill  {k['p50_ms']:9.1f} {k['p99_ms']:9.1f} {k['qps']:7.2f} {k['errors']:7d}   "
          f"({k['partial_answers']} answers flagged partial)")
    rss = list(fig["replica_rss_mb"].values())
    print(f"items {args.items:,} in {args.shards} shards; recall@10 vs exact {fig['recall10']:.4f}; "
          f"replica RSS {min(rss):.0f}..{max(rss):.0f} MB; build {fig['build_s']:.0f} s; start {start_s:.0f} s")
    by_c = {p["concurrency"]: p for p in fig["phases"]}
    write_results(__file__, fig, {"items": args.items, "shards": args.shards, "recall10": fig["recall10"],
                                  "p50_ms": by_c[1]["p50_ms"], "p99_ms": by_c[1]["p99_ms"],
                                  "qps_c8": by_c[8]["qps"], "qps_c32": by_c[32]["qps"],
                                  "errors_during_shard_kill": k["errors"],
                                  "partial_answers_during_shard_kill": k["partial_answers"],
                                  "replica_rss_mb_max": max(rss), "build_s": fig["build_s"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
