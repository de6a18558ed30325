"""Cost of one forward+backward of each multi-negative term, and VCMR inference per query.

Part 1: supcon / multineg / triplet at B in {64, 256, 1024}, K in {1, 16, 255}, d = 256,
against pytorch-metric-learning's SupConLoss / NTXentLoss on the same inputs (ratio):
median time of a forward+backward and peak extra memory (tensor bytes allocated by the
step, measured with torch's CPU allocator profiler).
Part 2: QACLN VCMR inference at TVR validation scale: 2,179 videos with their real
durations (1.5 s clips, capped at 100), d = 384, random weights and features; video
encodings once, then per query: encode, score every video, top-100 videos, span decoding,
top-100 moments. Median ms per query over batched chunks.

    python bench/losses.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import TVR, tvr_val_corpus, write_results  # noqa: E402

from xmr.config import Config, load_config  # noqa: E402
from xmr.losses.registry import TermContext, build_term  # noqa: E402
from xmr.outputs import PairOutputs  # noqa: E402



def timed(fn, repeats: int) -> tuple[float, float]:
    """(median ms, peak MB of memory allocated during one call)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = max((e.cpu_memory_usage for e in prof.key_averages()), default=0) / 2**20
    return statistics.median(times), peak


def term_step(name: str, task: str, b: int, k: int, d: int):
    cfg = Config()
    cfg.task, cfg.model.embed_dim, cfg.model.num_classes = task, d, [32]
    cfg.negatives.k, cfg.negatives.strategy = k, "uniform"
    term = build_term(name, cfg)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(b, d, generator=g, requires_grad=True)
    bb = torch.randn(b, d, generator=g, requires_grad=True)
    labels = torch.randint(0, 32, (b,), generator=g)
    batch = {"label": labels, "index": torch.arange(b)}
    ctx = TermContext(targets=torch.arange(b) if task == "pair" else labels)

    def step():
        loss = term(PairOutputs(F.normalize(a, dim=1), F.normalize(bb, dim=1)), batch, ctx)
        loss.backward()

    return step


def pml_step(name: str, b: int, d: int):
    from pytorch_metric_learning import losses

    g = torch.Generator().manual_seed(0)
    a = torch.randn(b, d, generator=g, requires_grad=True)
    bb = torch.randn(b, d, generator=g, requires_grad=True)
    if name == "SupConLoss":
        fn, labels = losses.SupConLoss(temperature=0.1), torch.randint(0, 32, (b,), generator=g)
        lab = torch.cat([labels, labels])
    else:
        fn, lab = losses.NTXentLoss(temperature=0.1), torch.cat([torch.arange(b), torch.arange(b)])

    def step():
        fn(torch.cat([a, bb]), lab).backward()

    return step


def bench_terms(sizes, ks, repeats) -> list[dict]:
    rows = []
    d = 256
    for b in sizes:
        ref, failed = {}, {}
        for name, pml in (("supcon", "SupConLoss"), ("multineg", "NTXentLoss")):
            try:  # PML's NTXent builds a [2B]^2 x [2B]^2 pair mask: at B = 1024 that is 34 GB
                ref[name] = timed(pml_step(pml, b, d), repeats)
            except (RuntimeError, MemoryError) as exc:
                failed[name] = f"PML {pml} failed: {str(exc).splitlines()[0][:160]}"
                print(f"B={b}: {failed[name]}")
        for k in ks:
            for name, task in (("supcon", "category"), ("multineg", "pair"), ("triplet", "category")):
                if name == "triplet" and k != 1:
                    continue
                ms, mb = timed(term_step(name, task, b, k, d), repeats)
                row = {"term": name, "B": b, "K": k, "d": d, "ms": ms, "peak_mb": mb}
                if name in ref:
                    row.update(pml_ms=ref[name][0], pml_peak_mb=ref[name][1], ratio_vs_pml=ms / ref[name][0])
                elif name in failed:
                    row["pml_error"] = failed[name]
                rows.append(row)
                print(f"{name:9s} B={b:5d} K={k:4d}  {ms:8.2f} ms  {mb:8.1f} MB"
                      + (f"   PML {ref[name][0]:8.2f} ms  ours/PML {ms / ref[name][0]:5.2f}" if name in ref else ""))
    return rows


def bench_vcmr(n_queries: int, chunk: int) -> dict:
    from xmr.tasks.vcmr import rank_queries
    from xmr.method import Method

    n_val_queries = sum(1 for _ in open(TVR / "tvr_val_release.jsonl"))
    cfg = load_config("qacln", ["model.embed_dim=384", "model.num_heads=8"])
    cfg.model.dims = {"visual": [1024], "subtitle": [768], "query": [768]}
    model = Method(cfg).model.eval()
    corpus, _, _, encode_s = tvr_val_corpus(model)
    n_clips = corpus["clip_mask"].sum(dim=1).tolist()
    n_max = corpus["clip_mask"].shape[1]
    g = torch.Generator().manual_seed(1)
    per_query = []
    with torch.no_grad():
        for lo in range(0, n_queries, chunk):
            n = min(chunk, n_queries - lo)
            tokens = torch.randn(n, 20, 768, generator=g)
            t = time.perf_counter()
            q = model.encode_queries(tokens, torch.ones(n, 20, dtype=torch.bool))
            rank_queries(model, q, corpus, top_videos=100, max_len=16, top_k=100)
            per_query.append((time.perf_counter() - t) * 1000 / n)
    with torch.no_grad():  # one query alone: latency rather than throughput
        single = []
        for _ in range(5):
            t = time.perf_counter()
            q = model.encode_queries(torch.randn(1, 20, 768, generator=g), torch.ones(1, 20, dtype=torch.bool))
            rank_queries(model, q, corpus, top_videos=100, max_len=16, top_k=100)
            single.append((time.perf_counter() - t) * 1000)
    result = {"videos": len(n_clips), "max_clips": n_max, "mean_clips": sum(n_clips) / len(n_clips), "d": 384,
              "queries_timed": n_queries, "val_queries": n_val_queries, "chunk": chunk,
              "video_encode_s": encode_s, "ms_per_query_median": statistics.median(per_query),
              "ms_per_query_mean": statistics.mean(per_query), "single_query_ms_median": statistics.median(single)}
    print(f"VCMR inference: {len(n_clips)} videos (mean {result['mean_clips']:.1f} clips), d=384, "
          f"{n_queries} of {n_val_queries} val queries in chunks of {chunk}: "
          f"{result['ms_per_query_median']:.2f} ms/query median, single query {result['single_query_ms_median']:.1f} ms; "
          f"video encoding {encode_s:.1f} s once")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller grid, for a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sizes, ks, repeats = ([64, 256], [1, 16], 3) if args.quick else ([64, 256, 1024], [1, 16, 255], 5)
    rows = bench_terms(sizes, ks, repeats)
    vcmr = bench_vcmr(n_queries=256 if args.quick else 1024, chunk=64)
    by = {(r["term"], r["B"], r["K"]): r for r in rows}
    big = max(sizes)
    headline = {
        f"supcon_b{big}_k255_ms": by.get(("supcon", big, max(ks)), {}).get("ms"),
        f"supcon_vs_pml_ratio_b{big}": by.get(("supcon", big, max(ks)), {}).get("ratio_vs_pml"),
        f"multineg_vs_pml_ratio_b{big}": by.get(("multineg", big, max(ks)), {}).get("ratio_vs_pml"),
        f"multineg_b{big}_k1_ms": by.get(("multineg", big, 1), {}).get("ms"),
        "vcmr_ms_per_query_median": vcmr["ms_per_query_median"],
        "vcmr_single_query_ms": vcmr["single_query_ms_median"],
    }
    write_results(__file__, {"terms": rows, "vcmr_inference": vcmr, "quick": args.quick}, headline)


if __name__ == "__main__":
    main()
