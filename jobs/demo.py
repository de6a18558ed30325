"""The README's main command on the embedded default: local Ray, local shards, CPU.

Until the training job lands (issue 4) this runs the data pipeline end to end the way
training will use it: verify the dataset's checksums, then read one epoch of the training
split as N data-parallel ranks in N Ray tasks (each with its own DataLoader workers),
and check that every sample was read exactly once with the same number of steps per rank.

    RAY_AUTH_MODE=token python jobs/demo.py [--data data/avdigits] [--ranks 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

os.environ.setdefault("RAY_AUTH_MODE", "token")


def read_rank(root: str, split: str, rank: int, world: int, workers: int, batch: int, seed: int, epoch: int) -> dict:
    """One data-parallel rank's epoch: which samples it saw, in how many steps, how fast."""
    from xmr.data.reader import make_loader

    loader = make_loader(root, split, local_batch_size=batch, rank=rank, world_size=world,
                         num_workers=workers, seed=seed, epoch=epoch, shuffle=True)
    start, indices, steps, skipped = time.perf_counter(), [], 0, 0
    for b in loader:
        indices.extend(int(i) for i in b["index"])
        steps += 1
        skipped += int(b.get("n_skipped", 0))
    return {"rank": rank, "indices": indices, "steps": steps, "planned_steps": loader.steps,
            "seconds": time.perf_counter() - start, "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/avdigits", help="dataset root (local dir or s3://...)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--ranks", type=int, default=2, help="data-parallel ranks (Ray tasks)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import ray

    from xmr.data.manifest import load_manifest
    from xmr.data.verify import verify_dataset

    manifest = load_manifest(args.data)
    bad = verify_dataset(args.data, manifest)
    print(f"dataset {manifest.name!r} at {args.data}: task {manifest.task}, "
          f"{sum(s.num_samples for s in manifest.splits.values())} samples, checksums "
          + ("OK" if not bad else f"FAILED for {bad}"))
    if bad:
        return 1

    ray.init(num_cpus=max(4, args.ranks * (args.workers + 1)), include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    task = ray.remote(num_cpus=1)(read_rank)
    local_batch = args.batch_size // args.ranks
    expected = manifest.splits[args.split].num_samples
    orders, ok = [], True
    print(f"{'epoch':>5} {'rank':>4} {'steps':>5} {'samples':>7} {'samples/s':>10}")
    for epoch in range(args.epochs):
        results = ray.get([task.remote(args.data, args.split, r, args.ranks, args.workers, local_batch,
                                       args.seed, epoch) for r in range(args.ranks)])
        for res in results:
            print(f"{epoch:>5} {res['rank']:>4} {res['steps']:>5} {len(res['indices']):>7} "
                  f"{len(res['indices']) / res['seconds']:>10.0f}")
        counts = Counter(i for res in results for i in res["indices"])
        once = len(counts) == expected and set(counts.values()) == {1}
        same_steps = len({res["steps"] for res in results}) == 1
        ok &= once and same_steps
        orders.append([i for res in results for i in res["indices"]])
        print(f"epoch {epoch}: {len(counts)}/{expected} samples, each exactly once: {once}; "
              f"equal steps on every rank: {same_steps}")
    if len(orders) > 1:
        print(f"order differs between epochs (reshuffled from the seed): {orders[0] != orders[1]}")
    ray.shutdown()
    print("data pipeline demo:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
