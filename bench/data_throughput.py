"""Reader throughput: samples/s for one epoch of a synthetic category dataset read from local
disk and from an S3 endpoint (moto server on 127.0.0.1, started here), against iterating
the same arrays already in memory, batched and converted the same way.

Usage: PYTHONPATH=platform python bench/data_throughput.py [--samples 20000] [--dim 256]
Writes bench/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from xmr.data import storage
from xmr.data.manifest import LabelSpec, ModalitySpec
from xmr.data.reader import make_loader
from xmr.data.writer import DatasetWriter

RESULTS = Path(__file__).resolve().parent / "results" / "data_throughput.json"


def write_dataset(root: Path, n: int, dim: int, per_shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, dim)).astype(np.float16)
    b = rng.normal(size=(n, dim)).astype(np.float16)
    labels = rng.integers(0, 10, size=n)
    w = DatasetWriter(str(root), name="bench", task="category",
                      modalities={"a": ModalitySpec("a", [dim], "float16"), "b": ModalitySpec("b", [dim], "float16")},
                      labels=LabelSpec("single", [10]), source={"kind": "bench"}, samples_per_shard=per_shard)
    with w.split("train") as s:
        for i in range(n):
            s.write(f"s{i:07d}", {"a": a[i], "b": b[i]}, {"id": str(i), "label": int(labels[i])})
    w.finish()
    return a, b, labels


def memory_epoch(a: np.ndarray, b: np.ndarray, labels: np.ndarray, batch: int, seed: int = 0) -> float:
    """The floor: shuffled batches of in-memory arrays, float16 -> float32 tensors."""
    t = time.perf_counter()
    order = np.random.default_rng(seed).permutation(len(a))
    n = 0
    for start in range(0, len(a), batch):
        idx = order[start:start + batch]
        out = {"a": torch.from_numpy(a[idx].astype(np.float32)), "b": torch.from_numpy(b[idx].astype(np.float32)),
               "label": torch.from_numpy(labels[idx]), "index": torch.from_numpy(idx)}
        n += len(out["index"])
    return n / (time.perf_counter() - t)


def reader_epoch(root: str, batch: int, workers: int) -> float:
    t = time.perf_counter()
    n = sum(len(b["key"]) for b in make_loader(root, "train", local_batch_size=batch, num_workers=workers))
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--per-shard", type=int, default=1_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per GET otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    storage.client().create_bucket(Bucket="bench")

    with tempfile.TemporaryDirectory(prefix="xmr-bench-") as tmp:
        t = time.perf_counter()
        a, b, labels = write_dataset(Path(tmp), args.samples, args.dim, args.per_shard)
        write_s = time.perf_counter() - t
        size = sum(p.stat().st_size for p in Path(tmp).glob("*.tar"))
        t = time.perf_counter()
        storage.upload_dir(tmp, "s3://bench/ds", progress=False)
        upload_s = time.perf_counter() - t
        figures: dict[str, float] = {"write_samples_per_s": args.samples / write_s,
                                     "upload_mb_per_s": size / 1e6 / upload_s}
        figures["memory"] = memory_epoch(a, b, labels, args.batch)
        for workers in (0, 2):
            figures[f"local_w{workers}"] = reader_epoch(tmp, args.batch, workers)
            figures[f"s3_w{workers}"] = reader_epoch("s3://bench/ds", args.batch, workers)
    server.stop()

    print(f"{args.samples} samples, d={args.dim} float16 x2, shards of {args.per_shard}, batch {args.batch}, "
          f"{size / 1e6:.1f} MB")
    print(f"{'source':<8}{'workers':>8}{'samples/s':>14}")
    print(f"{'memory':<8}{'-':>8}{figures['memory']:>14,.0f}")
    for src in ("local", "s3"):
        for workers in (0, 2):
            print(f"{src:<8}{workers:>8}{figures[f'{src}_w{workers}']:>14,.0f}")
    print(f"write {figures['write_samples_per_s']:,.0f} samples/s, upload {figures['upload_mb_per_s']:.1f} MB/s")
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "setup": {"samples": args.samples, "dim": args.dim, "dtype": "float16", "samples_per_shard": args.per_shard,
                  "local_batch_size": args.batch, "dataset_mb": round(size / 1e6, 1),
                  "s3": "moto server on 127.0.0.1 in the benchmark process (shares its CPU)"},
        "figures": {k: round(v, 1) for k, v in figures.items()},
        "headline": {"local_samples_per_s": round(max(figures["local_w0"], figures["local_w2"]), 1),
                     "s3_samples_per_s": round(max(figures["s3_w0"], figures["s3_w2"]), 1),
                     "memory_samples_per_s": round(figures["memory"], 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
