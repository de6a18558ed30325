"""Load from an outside client: ``hey`` against a running ``xmr serve`` over the million-item
gallery, at concurrency 1, 8, 32 and 64 on each ingress path, and through replica kills.

What a team putting the endpoint in front of users runs before they do:

- The endpoint is started as a user starts it, ``xmr serve --checkpoint ... --index ...
  --replicas 2`` (``--direct`` for the throughput-optimised ingress, ``--ingress haproxy``
  with a bearer token for Serve's HAProxy ingress), in its own process
  with its own embedded Ray, over the saved 1,000,000 x 256 index of bench/_million.py
  (built once, both index kinds measured, the faster one reaching recall@10 0.95 kept).
- Load comes from ``hey`` (a Go HTTP load generator, the Debian package; ``make bench``
  installs it), a separate process: no Python client in the server's way. Each phase sends
  a fixed number of requests (so a request that never got an answer is counted: hey's CSV
  lists answers only) with one JSON query body; p50 / p99 / QPS / errors (transport errors
  and non-200 answers) per phase.
- Binary bodies: the same phases at concurrency 1 and 32 with the query as an
  ``application/x-npy`` body, and the in-process cost of parsing each body form for the
  256-d query and a 20 x 768 VCMR query (the endpoint's own parser, median of 200).
- Replica kills (proxy and HAProxy ingress, the paths that route around a dead replica): a
  steady load at concurrency 8 while one of the two retriever replicas, then one of the two
  gateway replicas (the ingress deployment, which holds the client's request), is
  SIGKILLed by PID (found by its process title). hey is a Go client: it resends a request
  whose keep-alive connection closed before any answer, which is how HAProxy hands back
  a request it cannot replay itself. In direct ingress a client talks to one replica's own
  port, so a killed replica's clients see refused connections until a load balancer (not
  part of xmr) moves them.
- Shutdown: SIGTERM to ``xmr serve``; its exit status and last line are recorded.

On this 2-core machine hey, the proxy and two replicas share the cores: QPS figures are
this machine's, the ratios between phases are the point.

    RAY_AUTH_MODE=token python bench/serve_load.py [--items 1000000] [--modes proxy,direct] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402

from _common import write_results  # noqa: E402
from _million import N_ITEMS, ensure_million_index  # noqa: E402

PORT = 8351
# --ingress haproxy needs a bearer token (HAProxy's other ports listen on every interface):
# a server this module starts that way gets KEY, and hey sends it.
KEY = os.urandom(16).hex()
AUTH: dict[str, str] = {}
XMR = str(ROOT / ".venv" / "bin" / "xmr") if (ROOT / ".venv" / "bin" / "xmr").exists() else "xmr"


def hey(url: str, body: Path, content_type: str, n: int, c: int, headers: dict | None = None) -> dict:
    """One phase: ``n`` requests at concurrency ``c`` (hey sends n // c per worker, so n is
    rounded down to a multiple of c); figures from hey's per-answer CSV. ``headers``
    defaults to the bearer token of a server this module started with one (``KEY``)."""
    n = (n // c) * c
    extra = [x for k, v in (headers if headers is not None else AUTH).items() for x in ("-H", f"{k}: {v}")]
    out = subprocess.run(["hey", "-n", str(n), "-c", str(c), "-m", "POST", "-T", content_type, "-D", str(body),
                          *extra, "-t", "30", "-o", "csv", url], capture_output=True, text=True, timeout=900)
    rows = [ln.split(",") for ln in out.stdout.splitlines()[1:] if ln.count(",") == 7]
    lat = [1000 * float(r[0]) for r in rows]
    ok = [lat_ms for lat_ms, r in zip(lat, rows) if r[6] == "200"]
    wall = max((float(r[7]) + float(r[0]) for r in rows), default=float("nan"))
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r[6]] = statuses.get(r[6], 0) + 1
    return {"concurrency": c, "requests": n, "answered": len(rows), "ok": len(ok),
            "errors": n - len(ok), "unanswered": n - len(rows), "statuses": statuses,
            "p50_ms": float(np.percentile(ok, 50)) if ok else float("nan"),
            "p99_ms": float(np.percentile(ok, 99)) if ok else float("nan"),
            "qps": len(ok) / wall if ok else 0.0}


def start_server(mode: str, ckpt: str, index: str, log: Path, replicas: int = 2, port: int = PORT,
                 wait_s: float = 900, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """``xmr serve`` as a user runs it (``extra``: more of its flags); returns (process, base
    URL the load goes to)."""
    cmd = [XMR, "serve", "--checkpoint", ckpt, "--index", index, "--replicas", str(replicas), "--port", str(port),
           *extra]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
    if mode == "direct":
        cmd.append("--direct")
    if mode == "haproxy":
        cmd += ["--ingress", "haproxy"]
        env["XMR_API_KEY"] = KEY
        AUTH["Authorization"] = f"Bearer {KEY}"
    else:  # no key: the endpoint open to this machine, as hey calls it (a key in the caller's environment stays out)
        env.pop("XMR_API_KEY", None)
        AUTH.clear()
    fh = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, env=env, start_new_session=True)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line.rstrip())
            fh.write(line)
            fh.flush()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + wait_s
    want = "replicas answering directly" if mode == "direct" else "[xmr] serving"
    while not any(want in ln for ln in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"xmr serve ({mode}) did not come up; see {log}")
        time.sleep(0.5)
    if mode == "direct":
        urls = next(ln for ln in lines if want in ln).split(": ", 1)[1].split(", ")
        return proc, urls[0]
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc: subprocess.Popen) -> dict:
    t = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    return {"exit_code": rc, "stop_s": time.perf_counter() - t}


def replica_pids(deployment: str = "Retriever", app: str = "xmr") -> list[int]:
    """PIDs of the application's replicas of one deployment, by their process titles
    (``ray::ServeReplica:<app>:<deployment>``): no Ray driver of our own, so no chance of
    attaching to another Ray on the machine."""
    title = f"ray::ServeReplica:{app}:{deployment}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(title):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return sorted(pids)


def load_with_kill(url: str, body: Path, n: int, pid: int, c: int = 8, after_s: float = 3.0) -> dict:
    """``hey`` with ``n`` requests at concurrency ``c`` on ``/search``; process ``pid``
    SIGKILLed ``after_s`` into it."""
    result: dict = {}
    load = threading.Thread(target=lambda: result.update(hey(f"{url}/search", body, "application/json", n, c)))
    load.start()
    time.sleep(after_s)
    during = load.is_alive()  # a load that ended before the kill measured nothing of it
    os.kill(pid, signal.SIGKILL)
    load.join()
    return {**result, "killed_during_load": during}


def kill_phase(url: str, body: Path, n: int, deployment: str = "Retriever") -> dict:
    """Steady load at concurrency 8; one of the two replicas of ``deployment`` (the
    retrievers, or the gateway: the ingress deployment) SIGKILLed 3 s in."""
    pids = replica_pids(deployment)
    if len(pids) != 2:
        raise SystemExit(f"expected 2 {deployment} replicas, found {len(pids)}")
    result = load_with_kill(url, body, n, pids[0])
    deadline = time.monotonic() + 120
    while len(replica_pids(deployment)) < 2 and time.monotonic() < deadline:
        time.sleep(1.0)
    result["replicas_after"] = len(replica_pids(deployment))
    return {**result, "killed": deployment, "killed_pid": pids[0]}

def parse_costs(repeats: int = 200) -> dict:
    """In-process cost of the endpoint's own body parser per body form (to the float32 array
    the search takes), and the bytes sent."""
    from starlette.requests import Request

    from xmr.serve.requests import parse_request
    from xmr.serve.requests import MomentsRequest, SearchRequest

    rng = np.random.default_rng(0)
    out = {}
    for name, model, arr in (("search_256", SearchRequest, rng.standard_normal(256).astype(np.float32)),
                             ("moments_20x768", MomentsRequest, rng.standard_normal((20, 768)).astype(np.float32))):
        npy = io.BytesIO()
        np.save(npy, arr)
        forms = {"json_list": (json.dumps({"query": arr.tolist(), "k": 10}).encode(), "application/json", b""),
                 "json_base64": (json.dumps({"query_base64": base64.b64encode(arr.tobytes()).decode(),
                                             "k": 10}).encode(), "application/json", b""),
                 "npy": (npy.getvalue(), "application/x-npy", b"k=10")}
        row = {}
        for form, (body, ctype, qs) in forms.items():
            async def once(body=body, ctype=ctype, qs=qs):
                async def receive():
                    return {"type": "http.request", "body": body, "more_body": False}
                scope = {"type": "http", "method": "POST", "path": "/", "query_string": qs,
                         "headers": [(b"content-type", ctype.encode())]}
                t = time.perf_counter()
                req, binary = await parse_request(Request(scope, receive), model)
                np.asarray(req.query if binary is None else binary, dtype=np.float32)  # as the replica does
                return (time.perf_counter() - t) * 1000

            async def many():
                return [await once() for _ in range(repeats)]

            times = asyncio.run(many())
            row[form] = {"bytes": len(body), "parse_ms_p50": statistics.median(times)}
        base = row["json_list"]["parse_ms_p50"]
        for form in row:
            row[form]["saving_ms_vs_json_list"] = base - row[form]["parse_ms_p50"]
            row[form]["bytes_vs_json_list"] = row[form]["bytes"] / row["json_list"]["bytes"]
        out[name] = row
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=N_ITEMS, help="gallery size (default 1,000,000)")
    parser.add_argument("--cache", default=os.environ.get("XMR_BENCH_CACHE", "/tmp/xmr-bench-cache"),
                        help="where the built gallery index is kept between runs")
    parser.add_argument("--modes", default="proxy,direct,haproxy",
                        help="ingress paths: proxy (Serve's), direct (replicas' own ports), haproxy (--ingress haproxy)")
    parser.add_argument("--quick", action="store_true", help="fewer requests per phase")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        print("bench/serve_load.py needs hey (Debian package 'hey'): run `make bench`, or "
              "`apt-get install -y hey` as root", file=sys.stderr)
        return 2
    million = ensure_million_index(Path(args.cache), n=args.items)
    chosen = million["choice"][million["chosen"]]
    tmp = Path(args.cache) / "load"
    tmp.mkdir(parents=True, exist_ok=True)
    q = np.load(Path(million["index"]).parent / "queries.npy")[0]
    body_json = tmp / "query.json"
    body_json.write_text(json.dumps({"query": q.tolist(), "k": 10}))
    body_npy = tmp / "query.npy"
    np.save(body_npy, q)
    per_c = {1: 200, 8: 800, 32: 1600, 64: 2560} if not args.quick else {1: 40, 8: 160, 32: 320, 64: 640}
    print("[bench] body parse costs (in process) ...", flush=True)
    costs = parse_costs()
    phases: dict = {}
    for mode in [m for m in args.modes.split(",") if m]:
        print(f"[bench] {mode} ingress: starting xmr serve over {args.items:,} items ...", flush=True)
        t = time.perf_counter()
        proc, url = start_server(mode, million["ckpt"], million["index"], tmp / f"serve_{mode}.log")
        row: dict = {"start_s": time.perf_counter() - t, "url": url, "json": [], "npy": []}
        hey(f"{url}/search", body_json, "application/json", 50, 4)  # warm both replicas
        for c, n in per_c.items():
            row["json"].append(hey(f"{url}/search", body_json, "application/json", n, c))
            print(f"[bench]   {mode} c={c}: {row['json'][-1]}", flush=True)
        for c in (1, 32):
            row["npy"].append(hey(f"{url}/search?k=10", body_npy, "application/x-npy", per_c[c], c))
        if mode in ("proxy", "haproxy"):  # direct: a client holds one replica's port, no routing around
            for phase, deployment in (("kill", "Retriever"), ("ingress_kill", "Gateway")):
                print(f"[bench]   {deployment} replica kill under load ...", flush=True)
                try:
                    row[phase] = kill_phase(url, body_json, 3000 if not args.quick else 800, deployment)
                    print(f"[bench]   {mode} {deployment} kill: {row[phase]}", flush=True)
                except Exception as exc:  # noqa: BLE001 - record it; the other phases still count
                    print(f"[bench]   {deployment} kill phase failed: {type(exc).__name__}: {exc}", flush=True)
                    row[phase] = {"error": f"{type(exc).__name__}: {exc}"}
        row["shutdown"] = stop_server(proc)
        phases[mode] = row
    print_tables(million, costs, phases)
    lead = "proxy" if "proxy" in phases else next(iter(phases))
    by_c = {r["concurrency"]: r for r in phases[lead]["json"]}
    headline = {"qps_c32_over_c1": by_c[32]["qps"] / by_c[1]["qps"],
                "errors_during_replica_kill": phases.get("proxy", {}).get("kill", {}).get("errors"),
                **{f"errors_during_gateway_kill_{m}": p["ingress_kill"].get("errors")
                   for m, p in phases.items() if "ingress_kill" in p},
                "hnsw_1m_recall10": million["choice"]["hnsw"]["recall_at_10"],
                "hnsw_1m_p50_ms": million["choice"]["hnsw"]["p50_ms_1thread"],
                "index_kind": million["chosen"], "index_recall10": chosen["recall_at_10"],
                "endpoint_p50_ms_c1": by_c[1]["p50_ms"], "gallery_items": args.items,
                "npy_parse_saving_ms_moments": costs["moments_20x768"]["npy"]["saving_ms_vs_json_list"],
                **{f"qps_c32_over_c1_{m}": {r["concurrency"]: r for r in p["json"]}[32]["qps"]
                   / {r["concurrency"]: r for r in p["json"]}[1]["qps"] for m, p in phases.items() if m != lead}}
    write_results(__file__, {"million": {k: v for k, v in million.items() if k not in ("ckpt", "index")},
                             "body_parse": costs, "phases": phases, "quick": args.quick}, headline)
    return 0


def print_tables(million: dict, costs: dict, phases: dict) -> None:
    print(f"\nindex over {million['gallery']['items']:,} x {million['gallery']['dim']} (chosen: {million['chosen']}):")
    print(f"{'kind':<7}{'build s':>9}{'recall@10':>11}{'B/item':>8}{'p50 ms':>8}{'p99 ms':>8}  search")
    for kind, f in million["choice"].items():
        print(f"{kind:<7}{f['build_s']:>9.0f}{f['recall_at_10']:>11.4f}{f['bytes_per_item']:>8.0f}"
              f"{f['p50_ms_1thread']:>8.2f}{f['p99_ms_1thread']:>8.2f}  {f['search_params']}")
    print(f"\n{'body':<16}{'form':<13}{'bytes':>8}{'parse ms':>10}{'saving ms':>11}")
    for name, row in costs.items():
        for form, f in row.items():
            print(f"{name:<16}{form:<13}{f['bytes']:>8}{f['parse_ms_p50']:>10.3f}{f['saving_ms_vs_json_list']:>11.3f}")
    print(f"\n{'ingress':<8}{'body':<6}{'c':>4}{'n':>6}{'p50 ms':>9}{'p99 ms':>9}{'QPS':>8}{'errors':>8}")
    for mode, p in phases.items():
        for form in ("json", "npy"):
            for r in p[form]:
                print(f"{mode:<8}{form:<6}{r['concurrency']:>4}{r['requests']:>6}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
                      f"{r['qps']:>8.1f}{r['errors']:>8}")
        for phase in ("kill", "ingress_kill"):
            if phase in p and "error" not in p[phase]:
                k = p[phase]
                print(f"{mode:<8}{'kill':<6}{k['concurrency']:>4}{k['requests']:>6}{k['p50_ms']:>9.1f}{k['p99_ms']:>9.1f}"
                      f"{k['qps']:>8.1f}{k['errors']:>8}  ({k['killed']} SIGKILLed; statuses {k['statuses']}; "
                      f"replicas after: {k['replicas_after']})")
        print(f"{mode:<8}start {p['start_s']:.0f} s; SIGTERM -> exit {p['shutdown']['exit_code']} in "
              f"{p['shutdown']['stop_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
