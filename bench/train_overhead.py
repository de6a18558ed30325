"""Ray Train's cost over a plain PyTorch loop: same model, data, batch and threads.

Trains SCCMRL on a synthetic category dataset (written once to a temp dir) for a few epochs
three ways, in one run: a plain single-process loop (the same ``Method``, loader, optimiser
and schedule as the Ray worker), Ray Train with 1 worker, and Ray Train with 2 workers
(DDP over gloo). Throughput is training samples/s over the training phase of each epoch
after the first (warm-up); the wall time of the whole ``fit()`` (Ray start-up, worker
group, per-epoch evaluation and checkpointing) is shown beside it. Memory: each Ray worker's
peak RSS, and the plain process's.

    RAY_AUTH_MODE=token python bench/train_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_results  # noqa: E402


def make_cfg(data: str, epochs: int, workers: int, threads: int, root: str):
    from xmr.config import load_config

    return load_config("sccmrl", [f"data.path={data}", f"optim.epochs={epochs}", "data.batch_size=128",
                                  f"resources.num_workers={workers}", f"resources.cpus_per_worker={threads}",
                                  f"storage.root={root}", "model.embed_dim=128", "model.hidden_dim=512"])


def plain_loop(cfg, threads: int) -> dict:
    """The reference: the Ray worker's loop body with no Ray, no DDP, no reporting."""
    import torch

    from xmr.checks import resolve
    from xmr.data.reader import loader_for
    from xmr.method import Method
    from xmr.train.step import TrainStep, schedule

    torch.set_num_threads(threads)
    cfg, _ = resolve(cfg)
    torch.manual_seed(cfg.seed)
    method = Method(cfg)
    loader = loader_for(cfg, "train", train=True)
    step = TrainStep(method, cfg, total_steps=schedule(cfg, loader.steps)[1])  # the workers' own step
    rates, start = [], time.perf_counter()
    for epoch in range(cfg.optim.epochs):
        loader.set_epoch(epoch)
        n, t0 = 0, time.perf_counter()
        for batch in loader:
            step(batch)
            n += len(batch["index"])
        rates.append(n / (time.perf_counter() - t0))
    return {"samples_per_s": sum(rates[1:]) / len(rates[1:]), "wall_s": time.perf_counter() - start,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def ray_run(cfg, name: str) -> dict:
    from xmr.train.driver import run_training

    t0 = time.perf_counter()
    result = run_training(cfg, run_name=name, verbose=False)
    wall = time.perf_counter() - t0
    rows = [r for r in result.history if r["epoch"] >= 2]
    return {"samples_per_s": sum(r["samples_per_s"] for r in rows) / len(rows), "wall_s": wall,
            "max_rss_mb": max(r["max_rss_mb"] for r in rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and epochs (smoke run)")
    args = parser.parse_args()
    import ray
    import torch

    from xmr.data.sources.synth_category import SynthCategoryConfig, write_synth_category
    from xmr.ray.session import ensure_ray

    n_train, epochs = (2048, 3) if args.quick else (8192, 4)
    threads = max(1, (os.cpu_count() or 2) // 2)
    tmp = tempfile.mkdtemp(prefix="xmr-bench-train-")
    data = str(Path(tmp) / "data")
    write_synth_category(data, SynthCategoryConfig(splits={"train": n_train, "val": 512}, dim_a=256, dim_b=256),
                         progress=False)
    ensure_ray(None)  # the one local sizing (xmr.ray.session.local_cpus)
    rows = {}
    # Interleave so drift on a shared machine hits both sides alike.
    rows["ray_1_worker"] = ray_run(make_cfg(data, epochs, 1, threads, tmp + "/runs"), "one")
    rows["plain"] = plain_loop(make_cfg(data, epochs, 1, threads, tmp + "/runs"), threads)
    rows["ray_2_workers"] = ray_run(make_cfg(data, epochs, 2, threads, tmp + "/runs"), "two")
    ray.shutdown()

    plain = rows["plain"]["samples_per_s"]
    print(f"\nSCCMRL, synthetic category data: {n_train} train samples, d=256/256, global batch 128, "
          f"{epochs} epochs, {threads} thread(s) per process, torch {torch.__version__}")
    print(f"{'setup':<16}{'samples/s':>11}{'vs plain':>10}{'fit wall s':>12}{'peak RSS MB':>13}")
    for name, r in rows.items():
        print(f"{name:<16}{r['samples_per_s']:>11.0f}{r['samples_per_s'] / plain:>10.3f}{r['wall_s']:>12.1f}"
              f"{r['max_rss_mb']:>13.0f}")
    headline = {"ray_over_plain": rows["ray_1_worker"]["samples_per_s"] / plain,
                "ray2_over_plain": rows["ray_2_workers"]["samples_per_s"] / plain,
                "plain_samples_per_s": plain, "ray_1_worker_samples_per_s": rows["ray_1_worker"]["samples_per_s"],
                "worker_peak_rss_mb": rows["ray_1_worker"]["max_rss_mb"]}
    write_results(__file__, {"rows": rows, "n_train": n_train, "epochs": epochs, "threads": threads,
                             "quick": args.quick}, headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
