"""TVR at its real size, end to end, in one run: the release layout written at TVR's sizes and
dimensions, converted to shards, QACLN trained on it through Ray Train (local disk, and an S3
endpoint), and ``xmr eval`` over the validation split.

1. ``xmr data synth tvr-release``: 17,435 train + 2,179 val videos (``--scale`` shrinks both),
   the real validation queries and video durations from ../shared/data/tvr when present,
   3,072-d visual / 768-d subtitle / 768-d query-token features (float16, as the release).
2. ``xmr data convert tvr``: time and peak memory (the converter streams; its peak must not
   grow with the corpus).
3. The shard reader alone, one rank of ``--workers`` (what each training worker reads),
   against the training step's consumption per worker (target: the reader >= 5x faster).
4. ``xmr train --config qacln`` at the release's dimensions and d = 384 (the paper does not
   give d; 384 is XML's and ReLoCLNet's, which QACLN builds on), ``--workers`` Ray Train
   workers, ``--steps`` steps per epoch, one epoch; validation over the whole split is part
   of it (shared by the workers). Per worker: queries/s (= videos/s: every query brings its
   own video's clips), peak RSS (rank 0's), and the checkpoint's size and save time.
5. The same training from a moto S3 server on 127.0.0.1 over a smaller corpus at the same
   dimensions (``--s3-videos``): moto keeps objects in memory, so the full corpus cannot go
   there on this machine.
6. ``xmr eval`` of the trained checkpoint over the validation split (2,179 videos and
   10,895 queries at full size), in one process.

    python bench/tvr_scale.py [--scale 1.0] [--work /tmp/xmr-tvr-scale] [--steps 20] [--keep]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import TVR, write_results  # noqa: E402

TVR_SIZES = {"train": 17_435, "val": 2_179}
XMR = [sys.executable, "-m", "xmr.cli"]


def run(cmd: list[str], env: dict | None = None, label: str = "") -> dict:
    """Run a command; its wall time and peak RSS (VmHWM of the process, sampled until exit)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    if line.startswith("VmHWM:"):
                        peak[0] = max(peak[0], int(line.split()[1]) / 1024)
            except OSError:
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[xmr]") or "Error" in line:
            print(f"  {label}| {line.rstrip()[:200]}", flush=True)
    proc.wait()
    watcher.join(timeout=2)
    out = "".join(lines)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{out[-4000:]}")
    return {"wall_s": time.perf_counter() - t0, "peak_rss_mb": peak[0], "output": out}


def release(out: Path, splits: dict[str, int]) -> dict:
    args = [*XMR, "data", "synth", "tvr-release", "--out", str(out), "--overwrite", "--quiet",
            "--splits", *[f"{s}={n}" for s, n in splits.items()]]
    real = (TVR / "tvr_val_release.jsonl").is_file()
    if real:
        args += ["--annotations", str(TVR / "tvr_val_release.jsonl"), "--video2dur", str(TVR / "tvr_video2dur_idx.json")]
    r = run(args, label="release")
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return {"wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"], "gib": size / 2**30,
            "queries_from": "real TVR val annotations and durations" if real else "drawn"}


def convert(rel: Path, shards: str, env: dict | None = None) -> dict:
    r = run([*XMR, "data", "convert", "tvr", "--out", shards, "--quiet", "--overwrite",
             "--splits", f"train={rel / 'tvr_train_release.jsonl'}", f"val={rel / 'tvr_val_release.jsonl'}",
             "--video-feats", str(rel / "tvr_visual_cl-1.5.h5"), "--sub-feats", str(rel / "tvr_sub_cl-1.5.h5"),
             "--query-feats", str(rel / "tvr_query.h5"), "--video2dur", str(rel / "tvr_video2dur_idx.json")],
            env=env, label="convert")
    return {"wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"]}


def reader_rate(shards: str, workers: int, batch: int, seconds: float = 40.0) -> dict:
    """Rank 0 of ``workers`` reading its share in this process, as a training worker does."""
    from xmr.data.reader import make_loader

    loader = make_loader(shards, "train", local_batch_size=batch // workers, rank=0, world_size=workers,
                         shuffle=True, max_clips=128, max_query_tokens=32)
    n, t0 = 0, time.perf_counter()
    for b in loader:
        n += len(b["desc_id"]) if "desc_id" in b else int(b["visual"].shape[0])
        if time.perf_counter() - t0 > seconds:
            break
    dt = time.perf_counter() - t0
    return {"queries": n, "seconds": dt, "queries_per_s": n / dt}


def train(shards: str, storage: Path, name: str, workers: int, steps: int, env: dict | None = None) -> dict:
    sets = [f"data.path={shards}", "model.embed_dim=384", "model.num_heads=8", "optim.epochs=1",
            f"optim.max_steps_per_epoch={steps}", f"resources.num_workers={workers}", "data.batch_size=32",
            "tracking.progress_every_s=30"]
    r = run([*XMR, "train", "--config", "qacln", "--storage", str(storage), "--run-name", name, "--no-tracking",
             *[x for s in sets for x in ("--set", s)]], env=env, label=f"train {name}")
    with open(storage / name / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f)]
    row = next(row for row in rows if row["epoch"] == "1")
    per_worker = float(row["samples_per_s"]) / workers
    ckpt = storage / name / "checkpoint_epoch0001"
    return {"wall_s": r["wall_s"], "queries_per_s_per_worker": per_worker, "videos_per_s_per_worker": per_worker,
            "train_s": float(row["train_s"]), "eval_s": float(row["eval_s"]), "steps": int(row["step"]),
            "worker_peak_rss_mb": float(row["max_rss_mb"]), "driver_peak_rss_mb": r["peak_rss_mb"],
            "checkpoint_mb": sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) / 2**20 if ckpt.exists()
            else None, "vcmr_0.7_r10": float(row.get("vcmr_0.7_r10") or "nan")}


def checkpoint_save(storage: Path, name: str) -> dict:
    """Save time of the trained model's checkpoint (weights, config, metrics), median of 3."""
    import statistics
    import tempfile

    from xmr.checkpoint import save_checkpoint
    from xmr.method import Method

    method = Method.from_checkpoint(str(storage / name / "checkpoint_epoch0001"))
    times = []
    for _ in range(3):
        with tempfile.TemporaryDirectory(prefix="xmr-ckpt-") as tmp:
            t = time.perf_counter()
            save_checkpoint(tmp, method, method.cfg)
            times.append(time.perf_counter() - t)
            size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    return {"save_s": statistics.median(times), "model_mb": size / 2**20,
            "parameters": sum(p.numel() for p in method.parameters())}


def evaluate(storage: Path, name: str, out: Path) -> dict:
    r = run([*XMR, "eval", "--checkpoint", str(storage / name), "--split", "val", "--out", str(out)], label="eval")
    metrics = json.loads((out / "metrics.json").read_text())
    preds = json.loads((out / "predictions.json").read_text())
    return {"wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"], "queries": len(preds["VCMR"]),
            "videos": len(preds["video2idx"]), "metrics": {k: v for k, v in metrics["metrics"].items()
                                                          if k.startswith(("vr_", "vcmr_0.7", "svmr_0.7"))}}


EVAL_RANK = r"""
import json, os, resource, sys, time
sys.path.insert(0, {platform!r})
import torch, torch.distributed as dist
from xmr.data.manifest import load_manifest
from xmr.method import load_model
from xmr.tasks.evaluate import evaluate
world = int(os.environ["WORLD_SIZE"])
if world > 1:
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=world)
torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
model, cfg = load_model({ckpt!r})
manifest = load_manifest(cfg.data.path)
t0 = time.perf_counter()
metrics = evaluate(model, cfg, manifest, "val")
print(json.dumps({{"rank": int(os.environ["RANK"]), "wall_s": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "vcmr_0.7_r10": metrics["vcmr_0.7_r10"], "vr_r10": metrics["vr_r10"]}}))
if world > 1:
    dist.barrier()
    dist.destroy_process_group()
"""


def eval_ranks(platform: Path, ckpt: str, world: int) -> dict:
    """The validation evaluation in ``world`` gloo processes (as Ray Train workers run it):
    each process's own peak RSS (``ru_maxrss``) and wall time."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    code = EVAL_RANK.format(platform=str(platform), ckpt=ckpt)
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=3600)
        if p.returncode != 0:
            raise SystemExit(f"eval rank failed ({p.returncode}):\n{err[-3000:]}")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return {"ranks": rows, "peak_rss_mb_per_rank": max(r["peak_rss_mb"] for r in rows),
            "wall_s": max(r["wall_s"] for r in rows), "vcmr_0.7_r10": rows[0]["vcmr_0.7_r10"]}


def eval_memory(work: Path, videos: int) -> dict:
    """Evaluation memory per rank at TVR validation scale (issue 25): the corpus sharded by
    video across ranks, 1 and 2 ranks, one run. The model is the QACLN preset at the
    release's dimensions and d = 384, untrained: memory does not depend on the weights.

    Until 12-07 a third leg ran the code before sharding (e612c9d, the corpus gathered on
    every rank: 2,495 MB per rank against 1,965 sharded on 12-01) from a git worktree; that
    code cannot read today's checkpoints and the figure pins no setting, so the leg is gone
    (its number stays in this file's history)."""
    from xmr.checkpoint import save_checkpoint
    from xmr.checks import resolve
    from xmr.config import load_config
    from xmr.method import Method

    rel, shards = work / "release-eval", work / "shards-eval"
    release(rel, {"train": 8, "val": videos})
    convert(rel, str(shards))
    shutil.rmtree(rel)
    cfg, _ = resolve(load_config("qacln", [f"data.path={shards}"]))
    ckpt = str(save_checkpoint(work / "eval-ckpt", Method(cfg).eval(), cfg))
    out: dict = {"videos": videos}
    for label, world in (("sharded_1", 1), ("sharded_2", 2)):
        print(f"[bench] eval memory: {label} ...", flush=True)
        out[label] = eval_ranks(REPO / "platform", ckpt, world)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_leg(work: Path, videos: dict[str, int], workers: int, steps: int) -> dict:
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        os.environ.update(env)
        from xmr.data import storage

        storage.client().create_bucket(Bucket="tvr")
        rel = work / "release_s3"
        made = release(rel, videos)
        conv = convert(rel, "s3://tvr/shards", env=env)
        read = reader_rate("s3://tvr/shards", workers, 32, seconds=20.0)
        trained = train("s3://tvr/shards", work / "runs", "s3", workers, steps, env=env)
        return {"videos": videos, "release": made, "convert": conv, "reader": read, "train": trained}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of TVR's train / val videos (default 1: full)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/xmr-tvr-scale"), help="scratch folder (~20 GB at full size)")
    ap.add_argument("--steps", type=int, default=20, help="training steps per epoch (bounded on CPU)")
    ap.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    ap.add_argument("--s3-videos", default="train=300,val=100", help="the S3 leg's corpus")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--only-eval-memory", action="store_true",
                    help="run only the evaluation-memory leg and merge it into the saved results")
    args = ap.parse_args()
    if args.only_eval_memory:
        return only_eval_memory(args)
    splits = {s: max(8, round(n * args.scale)) for s, n in TVR_SIZES.items()}
    work = args.work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    fig: dict = {"splits": splits, "scale": args.scale, "steps_per_epoch": args.steps, "workers": args.workers,
                 "model": "qacln preset, d = 384, 8 heads; dims 3072 / 768 / 768"}
    try:
        print(f"[bench] release layout at {splits} ...", flush=True)
        fig["release"] = release(work / "release", splits)
        print(f"[bench] convert ({fig['release']['gib']:.1f} GiB of HDF5) ...", flush=True)
        fig["convert"] = convert(work / "release", str(work / "shards"))
        shards = work / "shards"
        fig["shards_gib"] = sum(p.stat().st_size for p in shards.rglob("*") if p.is_file()) / 2**30
        shutil.rmtree(work / "release")  # the disk: the shards are what the rest reads
        print("[bench] reader alone ...", flush=True)
        fig["reader"] = reader_rate(str(shards), args.workers, 32)
        print("[bench] train from local shards ...", flush=True)
        fig["train_local"] = train(str(shards), work / "runs", "local", args.workers, args.steps)
        fig["checkpoint"] = checkpoint_save(work / "runs", "local")
        print("[bench] xmr eval over the validation split ...", flush=True)
        fig["eval"] = evaluate(work / "runs", "local", work / "eval")
        print("[bench] evaluation memory per rank ...", flush=True)
        fig["eval_memory"] = eval_memory(work, splits["val"])
        print("[bench] S3 leg ...", flush=True)
        s3_videos = {k: int(v) for k, v in (p.split("=") for p in args.s3_videos.split(","))}
        fig["s3"] = s3_leg(work, s3_videos, args.workers, args.steps)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    fig["wall_s"] = time.perf_counter() - t0
    consumption = fig["train_local"]["queries_per_s_per_worker"]
    ratio = fig["reader"]["queries_per_s"] / consumption
    rows = [
        ("release layout written", f"{fig['release']['wall_s']:.0f} s", f"{fig['release']['gib']:.1f} GiB, peak "
                                                                         f"{fig['release']['peak_rss_mb']:.0f} MB"),
        ("convert tvr -> shards", f"{fig['convert']['wall_s']:.0f} s", f"peak {fig['convert']['peak_rss_mb']:.0f} MB, "
                                                                       f"{fig['shards_gib']:.1f} GiB of shards"),
        ("reader alone (rank 0 of n)", f"{fig['reader']['queries_per_s']:.1f} q/s", f"{ratio:.1f}x the step's consumption"),
        ("train, local (per worker)", f"{consumption:.2f} q/s", f"peak RSS {fig['train_local']['worker_peak_rss_mb']:.0f} MB, "
                                                               f"eval in training {fig['train_local']['eval_s']:.0f} s"),
        ("train, S3 (per worker)", f"{fig['s3']['train']['queries_per_s_per_worker']:.2f} q/s",
         f"reader alone {fig['s3']['reader']['queries_per_s']:.1f} q/s over {fig['s3']['videos']}"),
        ("checkpoint", f"{fig['checkpoint']['save_s']:.2f} s", f"{fig['checkpoint']['model_mb']:.1f} MB model, "
                                                               f"{fig['train_local']['checkpoint_mb']:.1f} MB with optimiser"),
        ("xmr eval (val split)", f"{fig['eval']['wall_s']:.0f} s", f"{fig['eval']['videos']} videos, "
                                                                   f"{fig['eval']['queries']} queries"),
    ]
    for what, value, note in rows:
        print(f"{what:30s} {value:>12s}   {note}")
    _memory_rows(fig["eval_memory"])
    print(f"wall {fig['wall_s'] / 60:.1f} min")
    write_results(__file__, fig, {
        "train_videos_per_s": consumption, "reader_over_consumption": ratio,
        "worker_peak_rss_mb": fig["train_local"]["worker_peak_rss_mb"], "eval_s": fig["eval"]["wall_s"],
        "convert_peak_rss_mb": fig["convert"]["peak_rss_mb"], "convert_s": fig["convert"]["wall_s"],
        "s3_train_videos_per_s": fig["s3"]["train"]["queries_per_s_per_worker"], "scale": args.scale,
        "eval_queries": fig["eval"]["queries"], "wall_s": fig["wall_s"], **_memory_headline(fig["eval_memory"])})
    return 0


def _memory_rows(mem: dict) -> None:
    for label in ("sharded_1", "sharded_2"):
        m = mem[label]
        print(f"eval, {label:12s} {m['peak_rss_mb_per_rank']:8.0f} MB per rank {m['wall_s']:7.0f} s   "
              f"vcmr_0.7_r10 {m['vcmr_0.7_r10']:.4f}")


def _memory_headline(mem: dict) -> dict:
    return {"eval_peak_rss_mb_per_rank": mem["sharded_2"]["peak_rss_mb_per_rank"],
            "eval_peak_rss_mb_one_rank": mem["sharded_1"]["peak_rss_mb_per_rank"]}


def only_eval_memory(args) -> int:
    """The evaluation-memory leg alone, merged into bench/results/tvr_scale.json (its own
    date in ``figures.eval_memory.date``; the other figures keep theirs)."""
    import datetime

    work = args.work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        mem = eval_memory(work, max(8, round(TVR_SIZES["val"] * args.scale)))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    mem["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    _memory_rows(mem)
    path = REPO / "bench" / "results" / "tvr_scale.json"
    saved = json.loads(path.read_text()) if path.is_file() else {"figures": {}, "headline": {}}
    saved["figures"]["eval_memory"] = mem
    saved["headline"].update(_memory_headline(mem))
    path.write_text(json.dumps(saved, indent=2, default=float))
    print(f"merged into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
