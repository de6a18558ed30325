"""The million-item gallery shared by bench/serve_latency.py (``--million``) and
bench/serve_load.py: 1,000,000 x 256 embeddings, both approximate index kinds built over
it and measured, the faster one that reaches recall@10 0.95 saved as an ``xmr serve
--index`` folder (reloaded, not rebuilt, by the next run that finds it in the cache).

The gallery. Embeddings of an untrained encoder are nearly isotropic, which no trained
retrieval model produces and which is the worst case for any approximate index. Trained
galleries are clustered (items of a class together, a query near its matches). So the
items' inputs are drawn around 2,000 class centres (within-class noise the size of the
spread of the centres) and encoded by the checkpoint's query-side tower; the gallery side
of the saved index holds those embeddings, and a query (the same draw, other items) is
encoded by the same tower when it reaches the endpoint -- the alignment a trained model
learns. The structure is stated, not tuned: this is the only gallery the choice saw.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from _common import fake_manifest

N_ITEMS = 1_000_000
DIM = 256
CLASSES = 2_000
NOISE = 1.0  # within-class spread relative to the centres' (unit-variance) spread


def draw_inputs(n: int, seed: int) -> np.ndarray:
    """Raw 256-d inputs of ``n`` items around the shared class centres."""
    centres = np.random.default_rng(12345).standard_normal((CLASSES, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    return centres[rng.integers(0, CLASSES, n)] + NOISE * rng.standard_normal((n, DIM)).astype(np.float32)


def _model(root: Path):
    from xmr.checkpoint import save_checkpoint
    from xmr.config import load_config
    from xmr.method import Method

    cfg = load_config("triplet_pair", [f"model.embed_dim={DIM}", "model.hidden_dim=512", "data.path=bench"])
    cfg.model.dims = {"a": [DIM], "b": [DIM]}
    torch.manual_seed(0)
    method = Method(cfg).eval()
    return method, cfg, str(save_checkpoint(root / "ckpt", method, cfg))


@torch.no_grad()
def encode(model, x: np.ndarray, chunk: int = 16_384) -> np.ndarray:
    return torch.cat([model.encode("a", torch.from_numpy(x[lo:lo + chunk])).float()
                      for lo in range(0, len(x), chunk)]).numpy()


def single_query_ms(index, queries: np.ndarray, k: int = 10) -> list[float]:
    """Per-query search time, one query at a time, on the calling thread count."""
    out = []
    index.search(queries[:1], k)  # warm
    for q in queries:
        t = time.perf_counter()
        index.search(q[None, :], k)
        out.append((time.perf_counter() - t) * 1000)
    return out


def ensure_million_index(cache: Path, n: int = N_ITEMS, log=print) -> dict:
    """The cached index folder and the measurements that chose it, building both when absent.

    Returns {"ckpt", "index", "choice": {kind: build / recall / bytes / latency figures},
    "chosen": kind, "cached": bool}."""
    import faiss

    from xmr.data.manifest import Manifest
    from xmr.serve.gallery import Loaded, save_index
    from xmr.tasks.ann import AnnConfig, build_ann
    from xmr.tasks.category import CategoryGallery

    cache = Path(cache) / f"million-{n}"
    done = cache / "choice.json"
    if done.is_file():
        return {**json.loads(done.read_text()), "cached": True}
    cache.mkdir(parents=True, exist_ok=True)
    method, cfg, ckpt = _model(cache)
    t0 = time.perf_counter()
    items = encode(method.model, draw_inputs(n, seed=1))
    probes = encode(method.model, draw_inputs(2_000, seed=2))
    fresh = encode(method.model, draw_inputs(1_000, seed=3))
    log(f"[bench] {n:,} x {DIM} gallery encoded in {time.perf_counter() - t0:.0f} s")
    choice, built = {}, {}
    for kind in ("hnsw", "ivfpq"):
        log(f"[bench] building {kind} over {n:,} items (recall@10 target 0.95) ...")
        a = build_ann(items, probes, AnnConfig(kind=kind))
        faiss.omp_set_num_threads(1)  # a replica searches on one thread (its num_cpus)
        lat = single_query_ms(a.index, fresh)
        t = time.perf_counter()
        for lo in range(0, len(fresh), 32):
            a.search(fresh[lo:lo + 32], 10)
        batched = (time.perf_counter() - t) * 1000 / len(fresh)
        choice[kind] = {**a.describe(), "p50_ms_1thread": statistics.median(lat),
                        "p99_ms_1thread": float(np.percentile(lat, 99)), "batched32_ms_per_query": batched}
        log(f"[bench]   {kind}: built in {a.build_s:.0f} s, recall@10 {a.recall_at_10:.4f} with {a.search_params}, "
            f"{a.bytes_per_item:.0f} B/item, p50 {choice[kind]['p50_ms_1thread']:.2f} ms (1 thread)")
        built[kind] = a
    reaching = [k for k in choice if choice[k]["met_target"]] or list(choice)
    chosen = min(reaching, key=lambda k: choice[k]["p50_ms_1thread"])
    emb = torch.from_numpy(items)
    gallery = CategoryGallery({"a": emb, "b": emb}, [f"item-{i:07d}" for i in range(n)], [None] * n,
                              approx={"b": built[chosen]}, recalls={"b": built[chosen].recall_at_10})
    del built
    manifest = Manifest.from_dict(fake_manifest("category", {"a": [DIM], "b": [DIM]}, n))
    info = {"method": cfg.method, "task": cfg.task, "model": cfg.model.name, "embed_dim": DIM, "gallery_size": n,
            "input_dims": cfg.model.dims}
    t = time.perf_counter()
    index = str(save_index(cache / "index", Loaded(method.model, cfg, manifest, gallery, info),
                           gallery.recalls))
    save_s = time.perf_counter() - t
    np.save(cache / "queries.npy", draw_inputs(2_000, seed=4))  # raw inputs the HTTP phases send
    out = {"ckpt": ckpt, "index": index, "choice": choice, "chosen": chosen, "save_s": save_s,
           "gallery": {"items": n, "dim": DIM, "classes": CLASSES, "noise": NOISE}}
    done.write_text(json.dumps(out, indent=2, default=float))
    return {**out, "cached": False}


def reload_check(ckpt: str, index: str, queries: np.ndarray) -> dict:
    """Load the saved folder as a replica does (no rebuilding) and time it; the reloaded
    search answers as the saved index was measured."""
    from xmr.serve.gallery import load_for_serving
    from xmr.serve.search import search_items

    t = time.perf_counter()
    loaded = load_for_serving(ckpt, index=index)
    load_s = time.perf_counter() - t
    import faiss

    torch.set_num_threads(1)  # as a replica (num_cpus 1: Ray sets OMP_NUM_THREADS=1)
    faiss.omp_set_num_threads(1)
    search_items([(loaded, "a", queries[0], 10)])
    lat = []
    for q in queries[:500]:
        t = time.perf_counter()
        search_items([(loaded, "a", q, 10)])
        lat.append((time.perf_counter() - t) * 1000)
    a = loaded.gallery.approx["b"]
    return {"load_s": load_s, "kind": a.kind, "search_params": a.search_params,
            "endpoint_search_p50_ms_1thread": statistics.median(lat),
            "endpoint_search_p99_ms_1thread": float(np.percentile(lat, 99)), "search": loaded.info["search"]}
