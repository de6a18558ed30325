"""Sharded search past one replica, exact and approximate: ``xmr index build --shards`` (the
Ray Data job users run) over a 4,000,000 x 256 gallery in 4 shards, served by ``xmr serve``
and driven by ``hey`` (issues 25, 36).

- The gallery is bench/_million.py's recipe at four times the size, written as an xmr
  dataset (a category split, float16, WebDataset shards and manifest.json): item ``i`` is a
  draw around one of 2,000 class centres (its ``b`` side, searched) and its ``a`` side is
  another draw around the same centre (a query-like input: the held-out probes the
  approximate index calibrates its search setting on). The checkpoint's two towers share
  their weights: the alignment a trained model learns, stated, not tuned. The dataset
  files are written by this script in bulk (the per-sample writer's checks cost 35 min at
  4M items on this machine); the format is the writer's (``docs/shard-format.md``).
- The indexes are built by ``xmr index build --shards N`` as a user runs it (its own
  process, an embedded Ray, the Ray Data job): once exact (``--approx off``), once
  approximate (``--approx on --ann-kind ivfpq``, each shard's search setting chosen by
  measurement for recall@10 >= 0.95). ``build_s`` is the approximate job's wall time.
- The reference: an unsharded 1,000,000-item approximate index (``xmr index build
  --approx on``, same kind) over a gallery drawn the same way.
- One after another (never two deployed at once: memory), each served by ``xmr serve`` in
  its own process (proxy ingress, one replica per shard): p50 / p99 at one client, QPS at 8
  (and 32 for the sharded ones), recall@10 of the endpoint's merged answers against exact
  search over the whole gallery (numpy float32 over the shards' stored embeddings); for the
  sharded approximate index, a shard's replica SIGKILLed under load at 8 clients (errors
  and answers flagged partial counted); every retriever replica's RSS and the memory it
  asked Ray for.

On this 2-core machine hey, the proxy, the gateway and the replicas share the cores. Ray's
workers and replicas run at the bench's own niceness (``RAY_worker_niceness=0``; Ray's default
starts them 15 levels nicer), so on a shared machine they compete as the bench itself does.

    RAY_AUTH_MODE=token python bench/serve_shards.py [--items 4000000] [--shards 4] [--reference-items 1000000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402

from _common import write_results  # noqa: E402
from _million import CLASSES, DIM, NOISE, _model  # noqa: E402
from serve_load import XMR, hey, load_with_kill, start_server, stop_server  # noqa: E402

PORT = 8361
# Ray's raylet starts its workers 15 nice levels below itself (``worker_niceness``): on a
# machine other work shares, the encoding workers and the replicas would get a sliver of the
# CPU that the bench's own process (and ``hey``) get. Here they run at the bench's niceness.
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_worker_niceness": "0"}
PER_TAR = 50_000  # samples per WebDataset shard file


# --------------------------------------------------------------------------- the dataset


def _centres() -> np.ndarray:
    return np.random.default_rng(12345).standard_normal((CLASSES, DIM)).astype(np.float32)


def _draw(lo: int, hi: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Items lo..hi: (a: a query-like draw, b: the item), both around the item's class centre.
    A pure function of (seed, lo): any range is drawn alike in any process."""
    centres = _centres()
    rng = np.random.default_rng([seed, lo])
    cls = rng.integers(0, CLASSES, hi - lo)
    b = centres[cls] + NOISE * rng.standard_normal((hi - lo, DIM)).astype(np.float32)
    a = centres[cls] + NOISE * rng.standard_normal((hi - lo, DIM)).astype(np.float32)
    return a.astype(np.float16), b.astype(np.float16)


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def _write_tar(root: str, split: str, t: int, lo: int, hi: int, seed: int) -> dict:
    """One tar file of samples lo..hi, as xmr's writer lays it out: per sample ``key.a.npy``,
    ``key.b.npy`` and ``key.json`` (``{"index": i}``), members sorted by name."""
    import io

    a, b = _draw(lo, hi, seed)
    buf = io.BytesIO()
    np.save(buf, np.zeros(DIM, np.float16), allow_pickle=False)
    npy_head = buf.getvalue()[: -DIM * 2]
    path = os.path.join(root, f"{split}-{t:06d}.tar")
    h = hashlib.sha256()
    with open(path, "wb") as f:
        def put(data: bytes) -> None:
            f.write(data)
            h.update(data)

        for j in range(hi - lo):
            key = f"i{lo + j:08d}"
            meta = json.dumps({"index": lo + j}, sort_keys=True).encode()
            for name, data in ((f"{key}.a.npy", npy_head + a[j].tobytes()), (f"{key}.b.npy", npy_head + b[j].tobytes()),
                               (f"{key}.json", meta)):
                put(_header(name, len(data)) + data + b"\0" * (-len(data) % 512))
        end = b"\0" * 1024
        total = f.tell() + len(end)
        put(end + b"\0" * (-total % tarfile.RECORDSIZE))
    return {"path": os.path.basename(path), "num_samples": hi - lo, "sha256": h.hexdigest(),
            "bytes": os.path.getsize(path)}


def write_dataset(root: Path, n: int, seed: int, log=print) -> dict:
    """An xmr category dataset of ``n`` items, split ``test`` (cached: its manifest is
    written last)."""
    from xmr.data.manifest import LabelSpec, Manifest, ModalitySpec, ShardInfo, SplitInfo

    if (root / "manifest.json").is_file():
        return {"root": str(root), "write_s": json.loads((root / "written.json").read_text())["write_s"],
                "cached": True}
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    ranges = [(t, lo, min(n, lo + PER_TAR)) for t, lo in enumerate(range(0, n, PER_TAR))]
    with ProcessPoolExecutor(max_workers=2) as pool:
        shards = list(pool.map(_write_tar, *zip(*[(str(root), "test", t, lo, hi, seed) for t, lo, hi in ranges])))
    m = Manifest(name=f"bench-shards-{n}", task="category",
                 modalities={r: ModalitySpec("synthetic", [DIM], "float16") for r in ("a", "b")},
                 labels=LabelSpec("none", []), source={"kind": "bench", "details": {"seed": seed, "classes": CLASSES}},
                 splits={"test": SplitInfo(num_samples=n, shards=[ShardInfo(**s) for s in shards])}, clip_len=None,
                 created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    m.validate()
    write_s = time.perf_counter() - t0
    (root / "written.json").write_text(json.dumps({"write_s": write_s}))
    (root / "manifest.json").write_text(m.to_json())
    log(f"[bench] dataset of {n:,} items written in {write_s:.0f} s ({sum(s['bytes'] for s in shards) / 1e9:.1f} GB)")
    return {"root": str(root), "write_s": write_s, "cached": False}


def checkpoint(cache: Path) -> str:
    """The bench's dual encoder (bench/_million.py's), its two towers sharing their weights."""
    out = cache / "ckpt-shared"
    if (out / "done").is_file():
        return (out / "done").read_text()
    from xmr.checkpoint import save_checkpoint

    method, cfg, _ = _model(cache / "model")
    method.model.enc["b"].load_state_dict(method.model.enc["a"].state_dict())
    path = str(save_checkpoint(out / "ckpt", method, cfg))
    (out / "done").write_text(path)
    return path


# --------------------------------------------------------------------------- building and measuring


def index_build(ckpt: str, data: str, out: Path, shards: int, approx: str, ann_kind: str, workers: int,
                log=print) -> dict:
    """``xmr index build`` as a user runs it (``--address local``: its own new local Ray, never
    a cluster another process started on this machine); its wall time and its own output.
    Cached: a finished build (its ``.build.json``) is reused; an interrupted one is resumed by
    xmr itself (shards already complete are kept), and its wall time then says so."""
    done = out.with_suffix(".build.json")
    if done.is_file():
        meta = json.loads(done.read_text())
        if meta.get("data") == data and meta.get("approx") == approx:
            return {**meta, "cached": True}
    resumed = out.exists() and shards > 1
    if not resumed:
        shutil.rmtree(out, ignore_errors=True)
    cmd = [XMR, "index", "build", "--checkpoint", ckpt, "--gallery", data, "--split", "test", "--out", str(out),
           "--approx", approx, "--ann-kind", ann_kind]
    if shards > 1:
        cmd += ["--shards", str(shards), "--address", "local"] + (["--workers", str(workers)] if workers else [])
    log(f"[bench] {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    for attempt in range(1, 4):  # a failed build is resumed (its finished shards kept), twice at most
        run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **RAY_ENV})
        for line in run.stdout.splitlines():
            log(f"    {line}")
        if run.returncode == 0:
            break
        log(f"[bench] xmr index build failed ({run.returncode}), attempt {attempt}: {run.stderr.strip()[-600:]}")
        resumed = True
    else:
        raise SystemExit(f"xmr index build failed ({run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    meta = {"wall_s": wall, "resumed": resumed, "attempts": attempt, "data": data, "approx": approx, "workers": workers,
            "stdout": run.stdout.splitlines(), "foreign_lines": run.stderr.splitlines()[-20:]}
    done.write_text(json.dumps(meta))
    return {**meta, "cached": False}


def folders(index: Path) -> list[Path]:
    return [index / p["path"] for p in json.loads((index / "shards.json").read_text())["shards"]] \
        if (index / "shards.json").is_file() else [index]


def exact_top10(index: Path, queries: np.ndarray) -> list[list[str]]:
    """Exact top 10 over the whole gallery (numpy float32 over each folder's stored gallery
    side ``emb_b``: what an ``a`` query searches), merged."""
    from safetensors.numpy import load_file

    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_id: np.ndarray = np.zeros((len(queries), 0), dtype=object)
    for folder in folders(index):
        arrays = load_file(str(folder / "embeddings.safetensors"))
        emb = arrays.get("emb_b", arrays["emb_a"])
        ids = np.array(json.loads((folder / "items.json").read_text())["ids"], dtype=object)
        s = queries @ emb.T
        top = np.argpartition(-s, 10, axis=1)[:, :10]
        best_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
        best_id = np.concatenate([best_id, ids[top]], 1)
        del arrays, emb, s
    order = np.argsort(-best_s, axis=1, kind="stable")[:, :10]
    return np.take_along_axis(best_id, order, 1).tolist()


def _ancestors(pid: int) -> set[int]:
    out = set()
    while pid > 1:
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        out.add(pid)
    return out


def replicas(server: int | None = None) -> dict[str, dict]:
    """Every retriever replica of app xmr started under process ``server`` (other sessions'
    endpoints on this machine are not ours to measure or kill): its RSS (``/proc``), by its
    process title."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if title.startswith("ray::ServeReplica:xmr:Retriever") and (
                    server is None or server in _ancestors(int(entry.name))):
                rss = next(int(ln.split()[1]) for ln in (entry / "status").read_text().splitlines()
                           if ln.startswith("VmRSS:"))
                out[f"{title.split(':')[-1]}#{entry.name}"] = {"rss_mb": rss / 1024}
        except (OSError, StopIteration):
            pass
    return out


def asked_memory_mb(index: Path) -> list[float]:
    """The memory each retriever replica asks Ray for (``xmr.serve.shards.replica_memory``)."""
    from xmr.serve.shards import replica_memory

    return [replica_memory(json.loads((f / "index.json").read_text()).get("resident_bytes")) / 2**20
            for f in folders(index)]


def recall(url: str, queries_raw: np.ndarray, exact: list[list[str]]) -> dict:
    hits, partial = 0, 0
    for row, q in enumerate(queries_raw):
        got = requests.post(f"{url}/search", json={"query": q.tolist(), "k": 10}, timeout=120).json()
        partial += bool(got.get("partial"))
        hits += len({h["id"] for h in got["results"]} & set(exact[row]))
    return {"recall10": hits / (10 * len(queries_raw)), "partial_answers": partial}


def partial_count(url: str) -> int:
    info = requests.get(f"{url}/info", timeout=60).json()
    return int(info.get("partial_answers", 0))


def measure(name: str, ckpt: str, index: Path, queries_raw: np.ndarray, exact: list[list[str]], work: Path,
            concurrencies: dict[int, int], kill: int = 0, log=print) -> dict:
    """One deployment: start, recall, load at each concurrency, (a shard kill), stop."""
    body = work / "query.json"
    body.write_text(json.dumps({"query": queries_raw[0].tolist(), "k": 10}))
    log(f"[bench] {name}: starting xmr serve ...")
    os.environ.update(RAY_ENV)  # start_server passes its environment on
    t = time.perf_counter()
    proc, url = start_server("proxy", ckpt, str(index), work / f"serve-{name}.log", replicas=1, port=PORT,
                             wait_s=1800, extra=("--address", "local", "--start-timeout-s", "1500"))
    fig: dict = {"start_s": time.perf_counter() - t, "phases": [], "replica_asked_mb": asked_memory_mb(index)}
    try:
        fig["replicas"] = replicas(proc.pid)
        fig.update(recall(url, queries_raw, exact))
        log(f"[bench]   recall@10 vs exact over the whole gallery: {fig['recall10']:.4f}")
        hey(f"{url}/search", body, "application/json", 32, 4)  # warm
        sharded = (index / "shards.json").is_file()
        for c, n in concurrencies.items():
            before = partial_count(url) if sharded else 0
            phase = hey(f"{url}/search", body, "application/json", n, c)
            phase["partial_answers"] = (partial_count(url) - before) if sharded else 0
            fig["phases"].append(phase)
            log(f"[bench]   c={c}: p50 {phase['p50_ms']:.1f} ms, p99 {phase['p99_ms']:.1f} ms, {phase['qps']:.1f} QPS, "
                f"{phase['errors']} errors, {phase['partial_answers']} partial")
        if kill:
            before = partial_count(url)
            pid = next(int(k.split("#")[1]) for k in replicas(proc.pid) if k.startswith("Retriever001"))
            qps8 = next((p["qps"] for p in fig["phases"] if p["concurrency"] == 8), 0.0)
            n_kill = max(kill, 8 * int(qps8 * 20 / 8))  # ~20 s of load: the kill lands 3 s into it
            result = load_with_kill(url, body, n_kill, pid)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    if requests.get(f"{url}/healthz", timeout=10).json().get("status") == "ok":
                        break
                except (requests.RequestException, ValueError):
                    pass
                time.sleep(1.0)
            result["partial_answers"] = partial_count(url) - before
            result["killed_pid"] = pid
            fig["kill"] = result
            log(f"[bench]   shard replica killed under load ({n_kill} requests, the kill "
                f"{'during' if result['killed_during_load'] else 'AFTER'} the load): {result['errors']} errors, "
                f"{result['partial_answers']} answers flagged partial")
    finally:
        fig["stop"] = stop_server(proc)
    return fig


def c1_rounds(ckpt: str, indexes: dict[str, Path], queries_raw: np.ndarray, work: Path, rounds: int, n: int,
              remeasure: bool, log=print) -> list[dict]:
    """The one-client ratio (sharded approximate over the unsharded 1M reference), measured
    as the rule for ratios says: interleaved (approx, reference, approx, ...; one deployed at
    a time, memory) and the median of the rounds' ratios, since one pair on this shared
    machine moves with its load (two single pairs gave 1.82 and 2.10). Cached in
    ``work/c1-rounds.json``."""
    cached = work / "c1-rounds.json"
    stamp = {k: str(v) for k, v in indexes.items()} | {"rounds": rounds, "n": n}
    if cached.is_file() and not remeasure:
        got = json.loads(cached.read_text())
        if got.get("stamp") == stamp:
            return got["rounds"]
    body = work / "query.json"
    body.write_text(json.dumps({"query": queries_raw[0].tolist(), "k": 10}))
    os.environ.update(RAY_ENV)
    out = []
    for r in range(rounds):
        row: dict = {"round": r}
        for name in ("approx", "reference"):
            proc, url = start_server("proxy", ckpt, str(indexes[name]), work / f"serve-c1-{name}.log", replicas=1,
                                     port=PORT, wait_s=1800, extra=("--address", "local", "--start-timeout-s", "1500"))
            try:
                hey(f"{url}/search", body, "application/json", 32, 4)  # warm, as measure() does
                phase = hey(f"{url}/search", body, "application/json", n, 1)
            finally:
                stop_server(proc)
            row[f"{name}_p50_ms"], row[f"{name}_errors"] = phase["p50_ms"], phase["errors"]
        row["ratio"] = row["approx_p50_ms"] / row["reference_p50_ms"]
        log(f"[bench]   c=1 round {r + 1}/{rounds}: sharded {row['approx_p50_ms']:.1f} ms, unsharded "
            f"{row['reference_p50_ms']:.1f} ms, ratio {row['ratio']:.2f}")
        out.append(row)
    cached.write_text(json.dumps({"stamp": stamp, "rounds": out}))
    return out


def deployment(name: str, work: Path, index: Path, build: dict, remeasure: bool, run) -> dict:
    """One deployment's figures, measured by ``run()`` or reused from an earlier run of the
    bench over the same build (``work/<name>.json``): the bench resumes where it stopped."""
    cached = work / f"deploy-{name}.json"
    stamp = {"index": str(index), "build_wall_s": build["wall_s"]}
    if cached.is_file() and not remeasure:
        fig = json.loads(cached.read_text())
        if fig.get("stamp") == stamp:
            return {**fig, "cached": True}
    fig = {**run(), "stamp": stamp}
    cached.write_text(json.dumps(fig, default=float))
    return {**fig, "cached": False}


def ground_truth(model, index: Path, queries_raw: np.ndarray) -> list[list[str]]:
    with torch.no_grad():
        q_emb = model.encode("a", torch.from_numpy(queries_raw)).float().numpy()
    return exact_top10(index, q_emb)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=4_000_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--reference-items", type=int, default=1_000_000)
    ap.add_argument("--ann-kind", default="ivfpq", choices=["hnsw", "ivfpq", "ivf"])
    ap.add_argument("--workers", type=int, default=2,
                    help="xmr index build --workers: encoding workers (each holds a shard's embeddings: memory)")
    ap.add_argument("--cache", default=os.environ.get("XMR_BENCH_CACHE", "/tmp/xmr-bench-cache"))
    ap.add_argument("--only", default="approx,reference,exact",
                    help="deployments to build and measure, in this order (the rest reported as not run)")
    ap.add_argument("--remeasure", action="store_true", help="measure deployments again even when cached")
    ap.add_argument("--quick", action="store_true", help="fewer requests per phase")
    ap.add_argument("--c1-rounds", type=int, default=5,
                    help="interleaved one-client rounds (sharded, unsharded) for the p50 ratio (0: none)")
    args = ap.parse_args()
    if shutil.which("hey") is None:
        print("bench/serve_shards.py needs hey (Debian package 'hey'): run `make bench`, or "
              "`apt-get install -y hey` as root", file=sys.stderr)
        return 2
    import xmr

    print(f"[bench] xmr from {xmr.__file__}; xmr CLI {XMR}", flush=True)
    cache = Path(args.cache) / "shards36"
    cache.mkdir(parents=True, exist_ok=True)
    work = cache / "work"
    work.mkdir(exist_ok=True)
    ckpt = checkpoint(cache)
    n, s = args.items, args.shards
    data = write_dataset(cache / f"data-{n}", n, seed=100)
    idx = {"exact": cache / f"exact-{n}-{s}", "approx": cache / f"{args.ann_kind}-{n}-{s}",
           "reference": cache / f"{args.ann_kind}-{args.reference_items}"}

    from xmr.method import load_model

    model, _ = load_model(ckpt)
    model.eval()
    queries_raw = _draw(0, 100, seed=7)[0].astype(np.float32)  # fresh query-like draws
    per_c = {1: 60, 8: 160, 32: 320} if not args.quick else {1: 20, 8: 48, 32: 96}
    fig: dict = {"items": n, "shards": s, "dim": DIM, "reference_items": args.reference_items,
                 "ann_kind": args.ann_kind, "workers": args.workers,
                 "datasets": {"gallery": data}, "builds": {}, "deployments": {},
                 "not_run": {}}
    plan = {"approx": (data, s, "on", {**per_c}, 240 if not args.quick else 80),
            "reference": (None, 1, "on", {1: per_c[1], 8: per_c[8]}, 0),
            "exact": (data, s, "off", {**per_c}, 0)}
    order = [k for k in args.only.split(",") if k in plan]
    truth: dict[str, list[list[str]]] = {}
    for name in order:
        d, shards, approx, phases, kill = plan[name]
        if d is None:  # the reference's gallery: written when its turn comes
            d = fig["datasets"]["reference"] = write_dataset(cache / f"data-{args.reference_items}-ref",
                                                             args.reference_items, seed=200)
        build = index_build(ckpt, d["root"], idx[name], shards, approx, args.ann_kind, args.workers)
        fig["builds"][name] = {x: build[x] for x in ("wall_s", "stdout", "cached", "resumed", "workers") if x in build}
        # the ground truth: exact top 10 over the whole gallery's stored embeddings (every
        # build stores them in full, so the first index over a gallery serves for both)
        key = d["root"]
        if key not in truth:
            truth[key] = ground_truth(model, idx[name], queries_raw)
        fig["deployments"][name] = deployment(
            name, work, idx[name], build, args.remeasure,
            lambda: measure(name, ckpt, idx[name], queries_raw, truth[key], work, phases, kill=kill))
        report(fig, args, write=True)
    if args.c1_rounds and {"approx", "reference"} <= set(fig["deployments"]):
        fig["c1_rounds"] = c1_rounds(ckpt, {k: idx[k] for k in ("approx", "reference")}, queries_raw, work,
                                     args.c1_rounds, per_c[1] * 2, args.remeasure)
    report(fig, args, write=True)
    return 0


def report(fig: dict, args, write: bool) -> None:
    """The table and the headline of what is measured so far (a figure not yet measured is
    None, and ``not_run`` says why); written every time, so an interrupted run leaves its
    figures."""
    n, s = fig["items"], fig["shards"]
    deps = fig["deployments"]
    by = {k: {p["concurrency"]: p for p in d["phases"]} for k, d in deps.items()}
    asked = args.only.split(",")
    fig["not_run"] = {name: ("not asked for (--only)" if name not in asked else
                             "not measured: the run stopped before it (time)")
                      for name in ("approx", "reference", "exact") if name not in deps}
    print(f"\n{'deployment':24s} {'c':>3s} {'p50 ms':>8s} {'p99 ms':>8s} {'QPS':>7s} {'errors':>6s} {'partial':>7s} "
          f"{'recall@10':>9s}")
    for k, d in deps.items():
        label = {"exact": f"exact {n:,} / {s}", "approx": f"{args.ann_kind} {n:,} / {s}",
                 "reference": f"{args.ann_kind} {args.reference_items:,} / 1"}[k]
        for c, p in by[k].items():
            print(f"{label:24s} {c:3d} {p['p50_ms']:8.1f} {p['p99_ms']:8.1f} {p['qps']:7.2f} {p['errors']:6d} "
                  f"{p['partial_answers']:7d} {d['recall10']:9.4f}")
    kill = deps.get("approx", {}).get("kill")
    if kill:
        print(f"{'approx, shard kill':24s} {8:3d} {kill['p50_ms']:8.1f} {kill['p99_ms']:8.1f} {kill['qps']:7.2f} "
              f"{kill['errors']:6d} {kill['partial_answers']:7d}")
    for name, b in fig["builds"].items():
        print(f"build {name}: {b['wall_s']:.0f} s (xmr index build{' --shards ' + str(s) if name != 'reference' else ''}"
              f"{', resumed' if b.get('resumed') else ''})")
    for name, d in deps.items():
        rss = [r["rss_mb"] for r in d["replicas"].values()] or [float("nan")]
        print(f"{name}: replica RSS {min(rss):.0f}..{max(rss):.0f} MB, asked Ray for "
              f"{min(d['replica_asked_mb']):.0f}..{max(d['replica_asked_mb']):.0f} MB")
    for name, why in fig["not_run"].items():
        print(f"{name}: not run ({why})")

    def at(name: str, c: int, field: str):
        return by.get(name, {}).get(c, {}).get(field)

    def ratio(a, b):
        return a / b if a is not None and b else None

    ap1, ref1, ap8, ex8 = at("approx", 1, "p50_ms"), at("reference", 1, "p50_ms"), at("approx", 8, "qps"), \
        at("exact", 8, "qps")
    builds = fig["builds"]
    rounds = fig.get("c1_rounds") or []
    if rounds:  # the ratio from the interleaved rounds (their medians); the single pair stays in the table
        print("one client, interleaved rounds: " + "; ".join(
            f"{r['approx_p50_ms']:.1f} / {r['reference_p50_ms']:.1f} ms = {r['ratio']:.2f}" for r in rounds))
        ap1 = float(np.median([r["approx_p50_ms"] for r in rounds]))
        ref1 = float(np.median([r["reference_p50_ms"] for r in rounds]))
    headline = {"items": n, "shards": s, "ann_kind": args.ann_kind,
                "approx_p50_ms": ap1, "unsharded_1m_approx_p50_ms": ref1,
                "approx_p50_over_unsharded_1m": (float(np.median([r["ratio"] for r in rounds])) if rounds
                                                 else ratio(ap1, ref1)),
                "c1_rounds": len(rounds),
                "approx_p50_over_unsharded_1m_single_pair": ratio(at("approx", 1, "p50_ms"), at("reference", 1, "p50_ms")),
                "approx_qps_c8": ap8, "exact_qps_c8": ex8, "approx_qps_c8_over_exact": ratio(ap8, ex8),
                "approx_recall10": deps.get("approx", {}).get("recall10"),
                "exact_recall10": deps.get("exact", {}).get("recall10"),
                "exact_p50_ms": at("exact", 1, "p50_ms"),
                "errors_during_shard_kill": kill["errors"] if kill else None,
                "partial_answers_during_shard_kill": kill["partial_answers"] if kill else None,
                "build_s": builds.get("approx", {}).get("wall_s"), "exact_build_s": builds.get("exact", {}).get("wall_s"),
                "replica_rss_mb_max_approx": max((r["rss_mb"] for r in deps.get("approx", {}).get("replicas", {}).values()),
                                                 default=None),
                "not_run": sorted(fig["not_run"])}
    print(json.dumps(headline, indent=1))
    if write:
        write_results(__file__, fig, headline)


if __name__ == "__main__":
    sys.exit(main())
