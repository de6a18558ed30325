"""Memory of the endpoint's processes through bursts of oversized and invalid bodies.

Issue 24 asks that memory return within 10% of its start after a burst. ``xmr serve`` is
started as a user starts it (its own process and embedded Ray, one replica of each
deployment, a saved 10,000 x 256 index), and the resident memory (RSS, from /proc) of the
gateway and retriever replicas, found by their process titles, is read:

- at **start** (the endpoint answers /healthz, nothing else sent);
- **warm**: after 200 valid searches and one of each refused body (the code paths a first
  request of each kind imports or builds, once);
- after each of 8 **bursts** (``--bursts``): 48 bodies from 4 clients at once, half over the 4 MiB body
  limit (413) and half a 100,000-number query for a 256-d model (422, parsed in full),
  then 200 valid searches.

Growth that stops after the first burst is the allocator keeping freed pages for reuse;
growth with every burst is a leak. Both are reported against start and against warm.

    RAY_AUTH_MODE=token python bench/serve_memory.py [--bursts 8]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import requests  # noqa: E402

from _common import write_results  # noqa: E402
from serve_latency import category_index  # noqa: E402
from serve_load import replica_pids, start_server, stop_server  # noqa: E402

PORT = 8361
BURSTS = 8


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def snapshot() -> dict[str, float]:
    """RSS in MB of each deployment's replica (one each here)."""
    return {d: sum(rss_mb(p) for p in replica_pids(d)) for d in ("Gateway", "Retriever")}


def post(url: str, data: bytes, content_type: str = "application/json") -> int:
    return requests.post(f"{url}/search", data=data, headers={"Content-Type": content_type}, timeout=120).status_code


def valid(url: str, body: bytes, n: int = 200) -> list[int]:
    return [post(url, body) for _ in range(n)]


def burst(url: str, bodies: list[bytes]) -> list[int]:
    statuses: list[int] = []
    lock = threading.Lock()

    def client(mine: list[bytes]) -> None:
        with requests.Session() as s:
            for b in mine:
                r = s.post(f"{url}/search", data=b, headers={"Content-Type": "application/json"}, timeout=120)
                with lock:
                    statuses.append(r.status_code)

    threads = [threading.Thread(target=client, args=(bodies[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bursts", type=int, default=BURSTS, help=f"bursts of bad bodies (default {BURSTS})")
    bursts = parser.parse_args().bursts
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(prefix="xmr-serve-memory-"))
    ckpt, index = category_index(root, 10_000)
    query = json.dumps({"query": rng.standard_normal(256).round(5).tolist(), "k": 10}).encode()
    over_limit = json.dumps({"query": rng.standard_normal(450_000).round(6).tolist()}).encode()  # > 4 MiB: 413
    wrong_dim = json.dumps({"query": rng.standard_normal(100_000).round(6).tolist()}).encode()  # parsed: 422
    from xmr.serve.requests import MAX_BODY_BYTES, MAX_ELEMENTS

    assert len(over_limit) > MAX_BODY_BYTES and len(wrong_dim) < MAX_BODY_BYTES and 100_000 <= MAX_ELEMENTS
    refused = [over_limit, wrong_dim, b"[" * 5000, b'{"query": [1e39], "k": 1}', b'{"k": ' + b"9" * 5000 + b"}"]
    bodies = [over_limit, wrong_dim] * 24
    proc, url = start_server("proxy", ckpt, index, root / "serve.log", replicas=1, port=PORT)
    rows = []
    try:
        rows.append({"phase": "start", **snapshot(), "statuses": {}})
        statuses = valid(url, query) + [post(url, b) for b in refused]
        rows.append({"phase": "warm", **snapshot(), "statuses": _count(statuses)})
        for i in range(bursts):
            statuses = burst(url, bodies) + valid(url, query)
            time.sleep(1.0)
            rows.append({"phase": f"burst {i + 1}", **snapshot(), "statuses": _count(statuses)})
    finally:
        shutdown = stop_server(proc)
    start, warm, first, last = rows[0], rows[1], rows[2], rows[-1]
    print(f"\n{'phase':<10}{'gateway MB':>12}{'retriever MB':>14}  answers")
    for r in rows:
        print(f"{r['phase']:<10}{r['Gateway']:>12.0f}{r['Retriever']:>14.0f}  {r['statuses']}")
    headline = {f"{d.lower()}_{name}": last[d] / ref[d] for d in ("Gateway", "Retriever")
                for name, ref in (("after_bursts_over_start", start), ("after_bursts_over_warm", warm),
                                  ("last_burst_over_first", first))}
    headline["bursts"] = bursts
    print("headline:", json.dumps(headline))
    write_results(__file__, {"rows": rows, "shutdown": shutdown, "body_mb": {"over_limit": len(over_limit) / 2**20,
                                                                            "wrong_dim": len(wrong_dim) / 2**20}},
                  headline)
    return 0


def _count(statuses: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in statuses:
        out[str(s)] = out.get(str(s), 0) + 1
    return out


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    sys.exit(main())
