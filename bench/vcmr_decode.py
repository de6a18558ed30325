"""Time ``xmr.metrics.vcmr.rank_moments`` at TVR val scale and keep the figures.

10,895 queries x top-100 videos x 100 clips, spans up to ``--max-len`` clips, top-100
moments per query. Inputs are synthetic but shaped like TVR: the corpus is the 2,179 val
videos with clip masks from their real durations (1.5 s clips, at most 100), video scores
are exp(alpha * cosine) and span probabilities are softmaxes over the valid clips. Input
generation is not timed; each chunk's ``rank_moments`` call is.

    PYTHONPATH=platform .venv/bin/python bench/vcmr_decode.py [--queries 10895] [--device cpu]

Writes ``bench/results/vcmr_decode.json`` (machine, date, all figures, flat ``headline``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from xmr.metrics.vcmr import n_clips_for, rank_moments

ROOT = Path(__file__).resolve().parents[1]
VIDEO_INDEX = ROOT.parent / "shared" / "data" / "tvr" / "tvr_video2dur_idx.json"
OUT = ROOT / "bench" / "results" / "vcmr_decode.json"


def corpus_clip_mask(n_clips_max: int, n_videos_fallback: int, gen: torch.Generator) -> torch.Tensor:
    """[V, L] valid clips of the TVR val videos (random lengths if the annotations are absent)."""
    if VIDEO_INDEX.exists():
        durations = [row[0] for row in json.loads(VIDEO_INDEX.read_text())["val"].values()]
        lengths = torch.from_numpy(np.minimum(n_clips_for(np.array(durations, dtype=np.float64)), n_clips_max))
    else:
        lengths = torch.randint(20, n_clips_max + 1, (n_videos_fallback,), generator=gen)
    return torch.arange(n_clips_max)[None, :] < lengths[:, None]


def make_chunk(q: int, mask: torch.Tensor, n_top: int, gen: torch.Generator, device: str):
    """Synthetic model outputs for ``q`` queries; the top-N video selection is done here too."""
    n_videos, n_clips = mask.shape
    cosine = torch.rand(q, n_videos, generator=gen) * 2 - 1
    video_scores = torch.exp(20.0 * cosine)
    top_idx = video_scores.topk(n_top, dim=1).indices
    valid = mask[top_idx]
    logits_s = torch.randn(q, n_top, n_clips, generator=gen).masked_fill(~valid, float("-inf"))
    logits_e = torch.randn(q, n_top, n_clips, generator=gen).masked_fill(~valid, float("-inf"))
    tensors = (video_scores, logits_s.softmax(-1), logits_e.softmax(-1), top_idx)
    return tuple(t.to(device) for t in tensors)


def machine_info(device: str) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=10_895)
    parser.add_argument("--top-videos", type=int, default=100)
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=None, help="queries per rank_moments call (default: auto)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    mask = corpus_clip_mask(args.clips, 2179, gen).to(args.device)
    width = min(args.max_len, args.clips)
    chunk = args.chunk or max(1, (1 << 24) // (args.top_videos * args.clips * width))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    warm = make_chunk(min(chunk, args.queries), mask.cpu(), args.top_videos, gen, args.device)
    rank_moments(warm[0], warm[1], warm[2], mask, warm[3], args.max_len, args.top_k, chunk)

    per_query_ms, chunk_s, done = [], [], 0
    while done < args.queries:
        q = min(chunk, args.queries - done)
        vs, ps, pe, top_idx = make_chunk(q, mask.cpu(), args.top_videos, gen, args.device)
        sync()
        start = time.perf_counter()
        ranked = rank_moments(vs, ps, pe, mask, top_idx, args.max_len, args.top_k, chunk)
        sync()
        elapsed = time.perf_counter() - start
        assert ranked.score.shape == (q, args.top_k) and torch.isfinite(ranked.score).all()
        chunk_s.append(elapsed)
        per_query_ms.append(1000 * elapsed / q)
        done += q

    total = sum(chunk_s)
    headline = {
        "decode_ms_per_query_median": round(statistics.median(per_query_ms), 4),
        "decode_ms_per_query_mean": round(1000 * total / args.queries, 4),
        "decode_ms_per_query_p90_chunk": round(float(np.percentile(per_query_ms, 90)), 4),
        "decode_total_s": round(total, 3),
        "queries_per_s": round(args.queries / total, 1),
        "scores_per_query": args.top_videos * args.clips * width,
    }
    result = {
        "benchmark": "rank_moments (VCMR decoding) at TVR val scale",
        "machine": machine_info(args.device),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "queries": args.queries, "top_videos": args.top_videos, "clips": args.clips,
            "max_len_clips": args.max_len, "top_k": args.top_k, "chunk_queries": chunk,
            "corpus_videos": int(mask.shape[0]),
            "mean_valid_clips": round(float(mask.sum(1).float().mean()), 2),
        },
        "chunks": {"n": len(chunk_s), "seconds": [round(s, 4) for s in chunk_s]},
        "headline": headline,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'figure':<34}{'value':>14}")
    for key, value in {**result["config"], **headline}.items():
        print(f"{key:<34}{value:>14}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
