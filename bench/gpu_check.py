"""The GPU path, exercised: every preset's model and loss terms train a bounded number of
steps on the GPU under bf16 autocast (the worker loop's own ``TrainStep``, in process), then
evaluate; a QACLN corpus index at TVR validation scale is built on the GPU and ``/moments``
search is timed per query (the QACLN paper reports 5.32 ms per query on a GPU).

Needs only the library's torch side (no Ray, webdataset, Optuna or boto3): batches are
synthetic tensors collated by the library's own collate functions. Durations of the TVR
validation videos come from ../shared/data/tvr when present, else a seeded draw of the same
range (said in the JSON). Where CUDA is absent it says so and exits 0 without writing;
``--device cpu`` runs the same checks on the CPU as a dry run (tests/test_gpu_check.py), and
writes nothing unless ``--out`` is given; ``--batch`` shrinks its batches (the dry run's
smallest sizes: the same code paths, less arithmetic). Finishes within 8 minutes on one GPU.

    python bench/gpu_check.py [--device cuda|cpu] [--steps 20] [--queries 50] [--videos N] [--batch B] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from xmr.config import load_config  # noqa: E402
from xmr.data.collate import collate_category, collate_vcmr_query, collate_vcmr_video  # noqa: E402
from xmr.data.decode import DecodeSpec  # noqa: E402
from xmr.method import Method  # noqa: E402
from xmr.train.step import TrainStep  # noqa: E402

PRESETS = ["sccmrl", "mnsgan", "triplet_category", "cdaml", "mixer_mae_pretrain", "mixer_mae", "triplet_pair",
           "qacln", "triplet_vcmr"]
TVR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tvr" / "tvr_video2dur_idx.json"
RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"


def category_batches(cfg, n_batches: int, batch: int, rng: np.random.Generator, classes: int = 10) -> list[dict]:
    """Pairs whose two modalities share a class mean (so the metrics can move)."""
    dims = cfg.model.dims
    hier = cfg.model.label_kind == "hierarchical"
    means = {r: rng.standard_normal((classes, int(np.prod(s)))).astype(np.float32) for r, s in dims.items()}
    spec = DecodeSpec(task=cfg.task, unit="pair", shapes={r: tuple(s) for r, s in dims.items()},
                      label_kind=cfg.model.label_kind or "single", num_classes=tuple(cfg.model.num_classes),
                      clip_len=None)
    out, index = [], 0
    for _ in range(n_batches):
        units = []
        for _ in range(batch):
            c = int(rng.integers(classes))
            u = {r: (means[r][c] + 0.5 * rng.standard_normal(means[r].shape[1])).astype(np.float32).reshape(dims[r])
                 for r in dims}
            u.update(index=index, key=f"k{index}", label=[c // 5, c] if hier else c)
            units.append(u)
            index += 1
        out.append(collate_category(units, spec))
    return out


def vcmr_videos(cfg, durations: list[float], rng: np.random.Generator) -> list[dict]:
    dv, ds = cfg.model.dims["visual"][-1], cfg.model.dims["subtitle"][-1]
    videos = []
    for i, dur in enumerate(durations):
        n = min(cfg.data.max_clips, max(1, math.ceil(dur / 1.5)))
        videos.append({"visual": rng.standard_normal((n, dv)).astype(np.float32),
                       "subtitle": rng.standard_normal((n, ds)).astype(np.float32),
                       "sub_mask": (rng.random(n) > 0.3), "video_index": i, "duration": dur, "index": i,
                       "vid_name": f"v{i}", "key": f"v{i}", "queries": []})
    return videos


def vcmr_query_batches(cfg, videos: list[dict], n_batches: int, batch: int, rng: np.random.Generator) -> list[dict]:
    dq = cfg.model.dims["query"][-1]
    out, desc = [], 0
    for _ in range(n_batches):
        units = []
        for _ in range(batch):
            v = videos[int(rng.integers(len(videos)))]
            n = v["visual"].shape[0]
            st = int(rng.integers(n))
            ed = int(min(n - 1, st + rng.integers(0, 6)))
            units.append({"video": v, "q_tokens": rng.standard_normal((int(rng.integers(4, 20)), dq)).astype(np.float32),
                          "st": st, "ed": ed, "ts": [st * 1.5, min(v["duration"], (ed + 1) * 1.5)], "desc_id": desc,
                          "type": "vt", "desc": f"q{desc}", "key": f"q{desc}"})
            desc += 1
        out.append(collate_vcmr_query(units))
    return out


def to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def preset_config(name: str, batch: int = 0):
    """``batch`` > 0: a VCMR preset's query batch (default 32)."""
    cfg = load_config(name, ["data.path=synthetic"])
    if cfg.task == "vcmr":
        cfg.model.dims = {"visual": [3072], "subtitle": [768], "query": [768]}  # TVR's
        cfg.data.batch_size = batch or 32
    else:
        cfg.model.dims = {"a": [128], "b": [96]}
        cfg.model.num_classes = [2, 10] if name == "cdaml" else [10]
        cfg.model.label_kind = "hierarchical" if name == "cdaml" else "single"
    cfg.optim.precision = "auto"  # bf16 autocast on CUDA, what the workers do
    return cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_preset(name: str, device: torch.device, steps: int, rng: np.random.Generator, batch: int = 0) -> dict:
    """``batch`` 0: the GPU run's sizes (64 pairs a batch, evaluated on 2 x 128; VCMR: 32
    queries a batch over 64 videos); ``batch`` > 0: B pairs or queries a batch, 2 x 2B pairs
    or 2B videos (the CPU dry run's smallest sizes)."""
    from xmr.tasks.category import evaluate_category
    from xmr.tasks.vcmr import evaluate_vcmr

    cfg = preset_config(name, batch)
    pairs = batch or 64
    torch.manual_seed(0)
    method = Method(cfg).to(device)
    step = TrainStep(method, cfg, total_steps=steps, device=device)
    if cfg.task == "vcmr":
        videos = vcmr_videos(cfg, list(rng.uniform(30, 150, 2 * cfg.data.batch_size)), rng)
        train = vcmr_query_batches(cfg, videos, 4, cfg.data.batch_size, rng)
    else:
        train = category_batches(cfg, 4, pairs, rng)
    records, times = [], []
    for i in range(steps):
        sync(device)
        t = time.perf_counter()
        records.append(step(to(train[i % len(train)], device)))
        sync(device)
        times.append(time.perf_counter() - t)
    finite = all(math.isfinite(v) for r in records for v in r.values())
    grads_finite = all(torch.isfinite(p.grad).all().item() for p in method.trainable_parameters() if p.grad is not None)
    with torch.no_grad():
        if cfg.task == "vcmr":
            vb = [to(collate_vcmr_video(videos[i:i + 16]), device) for i in range(0, len(videos), 16)]
            metrics = evaluate_vcmr(method.model, vb, [to(b, device) for b in train[:2]], 1.5, top_videos=20,
                                    max_len=cfg.model.max_moment_clips)
            main = "vr_r10"
        else:
            metrics = evaluate_category(method.model, [to(b, device) for b in category_batches(cfg, 2, 2 * pairs, rng)],
                                        cfg.task)
            main = "r1_mean" if cfg.task == "pair" else "map_mean"
    return {"preset": name, "task": cfg.task, "steps": steps,
            "batch": cfg.data.batch_size if cfg.task == "vcmr" else pairs, "loss_first": records[0]["loss"],
            "loss_last": records[-1]["loss"], "finite_losses": finite, "finite_grads": grads_finite,
            "step_ms_median": 1000 * statistics.median(times[1:] or times), main: metrics.get(main),
            "autocast": "bf16" if device.type == "cuda" else "fp32"}


def tvr_durations(rng: np.random.Generator) -> tuple[list[float], str]:
    if TVR.is_file():
        v2d = json.loads(TVR.read_text())["val"]
        return [float(v[0]) for v in v2d.values()], "real (../shared/data/tvr)"
    return list(rng.uniform(20, 150, 2179)), "drawn (../shared absent): 2,179 videos, uniform 20-150 s"


def moments_search(device: torch.device, rng: np.random.Generator, n_queries: int, n_videos: int = 0) -> dict:
    """The corpus of the 2,179 TVR validation videos encoded on the device by a QACLN at
    d = 384, then /moments' compute per query: encode the query, score every video, top-100
    videos, span decoding, top-100 moments (``rank_queries``, what the endpoint runs)."""
    from xmr.tasks.vcmr import encode_corpus, rank_queries

    cfg = preset_config("qacln")
    cfg.model.embed_dim, cfg.model.num_heads = 384, 8
    torch.manual_seed(0)
    model = Method(cfg).model.to(device).eval()
    durations, source = tvr_durations(rng)
    if n_videos:
        durations, source = durations[:n_videos], f"{source}, first {n_videos}"
    videos = vcmr_videos(cfg, durations, rng)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        corpus, _ = encode_corpus(model, (to(collate_vcmr_video(videos[i:i + 64]), device)
                                          for i in range(0, len(videos), 64)))
    sync(device)
    index_s = time.perf_counter() - t0
    corpus = {k: v.float() if v.is_floating_point() else v for k, v in corpus.items()}

    def ms_per_query(n: int) -> float:
        """Encode n random queries and rank the corpus for them: ms per query."""
        tokens = torch.from_numpy(rng.standard_normal((n, 20, 768)).astype(np.float32)).to(device)
        sync(device)
        t = time.perf_counter()
        q = model.encode_queries(tokens, torch.ones(n, 20, dtype=torch.bool, device=device))
        rank_queries(model, q, corpus, top_videos=100, max_len=16, top_k=100)
        sync(device)
        return 1000 * (time.perf_counter() - t) / n

    with torch.no_grad():
        single = [ms_per_query(1) for _ in range(n_queries + 3)][3:]  # 3 warm-up
        batched = [ms_per_query(64) for _ in range(3)]
    return {"videos": len(videos), "durations": source, "d": 384, "index_build_s": index_s,
            "ms_per_query_single_p50": statistics.median(single), "ms_per_query_batched_64": statistics.median(batched),
            "paper_ms_per_query": 5.32}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the same checks")
    parser.add_argument("--steps", type=int, default=20, help="training steps per preset")
    parser.add_argument("--queries", type=int, default=50, help="single queries timed on /moments' compute")
    parser.add_argument("--videos", type=int, default=0, help="corpus size (default 0: all 2,179 TVR val videos)")
    parser.add_argument("--batch", type=int, default=0,
                        help="pairs / queries per training batch (default 0: the GPU run's 64 / 32); a dry run's size")
    parser.add_argument("--out", default=None, help="results JSON (default: bench/results/gpu_check.json on CUDA)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no GPU here (torch.cuda.is_available() is False); nothing checked, nothing written. "
              "Run it where CUDA is present (or --device cpu for a dry run).")
        return 0
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    rows = []
    for preset in PRESETS:
        row = check_preset(preset, device, args.steps, rng, args.batch)
        rows.append(row)
        print(f"{preset:20s} {row['task']:8s} loss {row['loss_first']:.4f} -> {row['loss_last']:.4f}  "
              f"step {row['step_ms_median']:7.1f} ms  finite {row['finite_losses'] and row['finite_grads']}")
    search = moments_search(device, rng, args.queries, args.videos)
    print(f"/moments at TVR val scale ({search['videos']} videos, {search['durations']}): index {search['index_build_s']:.1f} s, "
          f"{search['ms_per_query_single_p50']:.2f} ms/query single (p50), {search['ms_per_query_batched_64']:.2f} ms/query "
          f"in batches of 64 (paper: 5.32 ms)")
    ok = all(r["finite_losses"] and r["finite_grads"] for r in rows)
    out = Path(args.out) if args.out else (RESULTS if device.type == "cuda" else None)
    if out is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import datetime
        import platform as _platform

        payload = {"machine": {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                               "python": _platform.python_version()},
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "figures": {"presets": rows, "moments_search": search, "wall_s": time.perf_counter() - t0},
                   "headline": {"device": name, "all_finite": ok,
                                "moments_ms_per_query": search["ms_per_query_single_p50"],
                                "moments_ms_per_query_batched": search["ms_per_query_batched_64"],
                                "qacln_step_ms": next(r["step_ms_median"] for r in rows if r["preset"] == "qacln"),
                                "wall_s": time.perf_counter() - t0}}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2, default=float))
        print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
