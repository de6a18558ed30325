"""What a sweep costs beyond its training: ``xmr tune`` against the same trials trained
without Ray, side by side in one run.

The sweep is the command a user runs (issue 26's measurement)::

    xmr tune --config sccmrl --trials 6 --concurrency 2 --no-asha --set optim.epochs=3 \\
        --set resources.num_workers=1

timed end to end as a subprocess (its Ray start-up, Tune, the report and plots included).
Its compute is the same work without Ray: two processes at a time (one thread each, as a
one-worker trial has), each training three trials of the preset with ``fit_in_process``
(the one loop, its evaluation every epoch included), timed from the first fit to the last.
``sweep_over_compute`` = sweep wall / compute wall. The two are interleaved (compute,
sweep, compute, sweep, ...) and the medians taken, as this machine is shared.

A 2-worker-per-trial sweep (the ``TorchTrainer`` path: a worker group per trial) is timed
once beside them, so its cost stays visible.

    RAY_AUTH_MODE=token python bench/sweep_overhead.py [--reps 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _common import write_results  # noqa: E402

PYTHON = sys.executable

COMPUTE = r"""
import sys, time, torch
sys.path.insert(0, {platform!r})
torch.set_num_threads(1)
from xmr.checks import resolve
from xmr.config import load_config
from xmr.train.fit import fit_in_process
t0 = time.perf_counter()
for i in range({n}):
    cfg, _ = resolve(load_config("sccmrl", {overrides!r} + [f"seed={{i}}"]))
    fit_in_process(cfg)
print(time.perf_counter() - t0)
"""


def compute_wall(trials: int, concurrency: int, overrides: list[str]) -> float:
    """``trials`` fits without Ray, ``concurrency`` processes at a time: the slowest
    process's time inside its fits (imports excluded, as the sweep's reused trial processes
    import once)."""
    per_process = -(-trials // concurrency)
    code = COMPUTE.format(platform=str(REPO / "platform"), n=per_process, overrides=overrides)
    procs = [subprocess.Popen([PYTHON, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(concurrency)]
    times = []
    for p in procs:
        out, _ = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"compute process failed ({p.returncode})")
        times.append(float(out.strip().splitlines()[-1]))
    return max(times)


def sweep_wall(root: str, name: str, trials: int, concurrency: int, overrides: list[str], workers: int) -> dict:
    cmd = [PYTHON, "-m", "xmr.cli", "tune", "--config", "sccmrl", "--trials", str(trials), "--concurrency",
           str(concurrency), "--no-asha", "--name", name, "--storage", root, "--no-tracking"]
    for o in [*overrides, f"resources.num_workers={workers}"]:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"sweep failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    import pandas as pd

    table = pd.read_csv(Path(root) / name / "trials.csv")
    if len(table) != trials or table["error"].notna().any():
        raise RuntimeError(f"sweep {name}: {len(table)} trials, errors {table['error'].dropna().tolist()}")
    return {"wall_s": wall, "epochs": int(table["epochs"].sum())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions of (compute, sweep)")
    parser.add_argument("--quick", action="store_true", help="2 trials, 1 epoch, 1 repetition, no 2-worker sweep")
    args = parser.parse_args()
    trials, concurrency, epochs = (2, 2, 1) if args.quick else (6, 2, 3)
    reps = 1 if args.quick else args.reps
    data = REPO / "data" / "avdigits"
    if not (data / "manifest.json").is_file():
        print(f"needs the avdigits dataset at {data}: run `make demo` (it builds it) first")
        return 2
    overrides = [f"data.path={data}", f"optim.epochs={epochs}", "resources.num_workers=1"]
    root = tempfile.mkdtemp(prefix="xmr-bench-sweep-")
    computes, sweeps = [], []
    for rep in range(reps):
        computes.append(compute_wall(trials, concurrency, overrides))
        sweeps.append(sweep_wall(root, f"one{rep}", trials, concurrency, overrides, workers=1))
        print(f"rep {rep}: compute {computes[-1]:.1f} s, sweep {sweeps[-1]['wall_s']:.1f} s", flush=True)
    two = None if args.quick else sweep_wall(root, "two", trials, concurrency, overrides, workers=2)
    compute, sweep = statistics.median(computes), statistics.median(s["wall_s"] for s in sweeps)
    print(f"\nSCCMRL on avdigits, {trials} trials x {epochs} epochs, {concurrency} at a time, "
          f"{os.cpu_count()} cores; medians of {reps} interleaved repetitions")
    print(f"{'what':<44}{'wall s':>9}{'vs compute':>12}")
    print(f"{'compute: fit in process, no Ray':<44}{compute:>9.1f}{1.0:>12.2f}")
    print(f"{'xmr tune, 1 worker per trial (in process)':<44}{sweep:>9.1f}{sweep / compute:>12.2f}")
    if two is not None:
        print(f"{'xmr tune, 2 workers per trial (TorchTrainer)':<44}{two['wall_s']:>9.1f}"
              f"{two['wall_s'] / compute:>12.2f}")
    headline = {"sweep_over_compute": sweep / compute, "sweep_s": sweep, "compute_s": compute,
                "two_worker_sweep_over_compute": (two["wall_s"] / compute) if two else None,
                "trials": trials, "epochs": epochs, "concurrency": concurrency}
    write_results(__file__, {"compute_s": computes, "sweep": sweeps, "two_worker_sweep": two, "reps": reps,
                             "quick": args.quick, "command_overrides": overrides}, headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
