"""What a sweep costs beyond its training: ``xmr tune`` against the same trials trained
without Ray, side by side in one run.

The sweep is the command a user runs (issue 26's measurement)::

    xmr tune --config sccmrl --trials 6 --concurrency 2 --no-asha --set optim.epochs=3 \\
        --set resources.num_workers=1

timed end to end as a subprocess (its Ray start-up, Tune, the report and plots included),
with ``--confirm-top 0``: the confirmation of the top trials over more seeds (issue 38, on by
default since) is more training, not overhead, and the compute side does not train it.
Its compute is the same work without Ray: two processes at a time (one thread each, as a
one-worker trial has), each training three trials of the preset with ``fit_in_process``
(the one loop, its evaluation every epoch included), timed from the first fit to the last.
``sweep_over_compute`` = sweep wall / compute wall. The two are interleaved (compute,
sweep, compute, sweep, ...) and the medians taken, as this machine is shared.

The sweep runs two ways: as the issue ran it (``xmr tune`` starts an embedded Ray, paying
Ray's start-up, about 8 s here, inside the sweep) and attached to a Ray already running on
the machine (``ray start --head``, as a cluster user's ``ray job submit`` does). Twice
the trials, attached, give the marginal cost: what the extra trials cost the sweep over
their compute (the fixed costs, start-up and the report, cancel out). A
2-worker-per-trial sweep (the ``TorchTrainer`` path: a worker group per trial) is timed once
beside them, so its cost stays visible.

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


def sweep_wall(root: str, name: str, trials: int, concurrency: int, overrides: list[str], workers: int,
               address: str | None = None) -> dict:
    cmd = [PYTHON, "-m", "xmr.cli", "tune", "--config", "sccmrl", "--trials", str(trials), "--concurrency",
           str(concurrency), "--no-asha", "--confirm-top", "0", "--name", name, "--storage", root, "--no-tracking"]
    for o in [*overrides, f"resources.num_workers={workers}"]:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    env.pop("RAY_ADDRESS", None)
    if address:
        env["RAY_ADDRESS"] = address
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


def start_cluster() -> str:
    """A local Ray started with ``ray start --head`` (as a cluster's head is), for the sweep to attach to."""
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(Path(PYTHON).parent / "ray"), "start", "--head", "--num-cpus=4", "--port=6399",
                    "--dashboard-host=127.0.0.1", "--disable-usage-stats"], env=env, check=True,
                   capture_output=True, timeout=120)
    return "127.0.0.1:6399"


def stop_cluster() -> None:
    subprocess.run([str(Path(PYTHON).parent / "ray"), "stop", "--force"], capture_output=True, timeout=120)


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
    computes, sweeps, attached = [], [], []
    for rep in range(reps):
        computes.append(compute_wall(trials, concurrency, overrides))
        sweeps.append(sweep_wall(root, f"one{rep}", trials, concurrency, overrides, workers=1))
        address = start_cluster()
        try:
            attached.append(sweep_wall(root, f"att{rep}", trials, concurrency, overrides, workers=1, address=address))
        finally:
            stop_cluster()
        print(f"rep {rep}: compute {computes[-1]:.1f} s, sweep {sweeps[-1]['wall_s']:.1f} s, attached "
              f"{attached[-1]['wall_s']:.1f} s", flush=True)
    # twice the trials, attached: what one more trial costs the sweep beyond its compute
    scale = None
    if not args.quick:
        compute2 = compute_wall(2 * trials, concurrency, overrides)
        address = start_cluster()
        try:
            attached2 = sweep_wall(root, "att_x2", 2 * trials, concurrency, overrides, workers=1, address=address)
        finally:
            stop_cluster()
        scale = {"trials": 2 * trials, "compute_s": compute2, "attached_s": attached2["wall_s"]}
        print(f"x2: compute {compute2:.1f} s, attached {attached2['wall_s']:.1f} s", flush=True)
    two = None if args.quick else sweep_wall(root, "two", trials, concurrency, overrides, workers=2)
    compute, sweep = statistics.median(computes), statistics.median(s["wall_s"] for s in sweeps)
    sweep_attached = statistics.median(s["wall_s"] for s in attached)
    print(f"\nSCCMRL on avdigits, {trials} trials x {epochs} epochs, {concurrency} at a time, "
          f"{os.cpu_count()} cores; medians of {reps} interleaved repetitions")
    print(f"{'what':<44}{'wall s':>9}{'vs compute':>12}")
    print(f"{'compute: fit in process, no Ray':<44}{compute:>9.1f}{1.0:>12.2f}")
    print(f"{'xmr tune, 1 worker per trial (in process)':<44}{sweep:>9.1f}{sweep / compute:>12.2f}")
    print(f"{'  the same, attached to a running Ray':<44}{sweep_attached:>9.1f}{sweep_attached / compute:>12.2f}")
    marginal = None
    if scale is not None:
        marginal = (scale["attached_s"] - sweep_attached) / max(scale["compute_s"] - compute, 1e-9)
        print(f"{f'compute, {2 * trials} trials':<44}{scale['compute_s']:>9.1f}{1.0:>12.2f}")
        print(f"{f'xmr tune attached, {2 * trials} trials':<44}{scale['attached_s']:>9.1f}"
              f"{scale['attached_s'] / scale['compute_s']:>12.2f}")
        print(f"{f'marginal: the {trials} more trials, sweep / compute':<44}{'':>9}{marginal:>12.2f}")
    if two is not None:
        print(f"{'xmr tune, 2 workers per trial (TorchTrainer)':<44}{two['wall_s']:>9.1f}"
              f"{two['wall_s'] / compute:>12.2f}")
    headline = {"sweep_over_compute": sweep / compute, "sweep_s": sweep, "compute_s": compute,
                "attached_sweep_over_compute": sweep_attached / compute,
                "marginal_sweep_over_compute": marginal,
                "attached_sweep_over_compute_x2": (scale["attached_s"] / scale["compute_s"]) if scale else None,
                "two_worker_sweep_over_compute": (two["wall_s"] / compute) if two else None,
                "trials": trials, "epochs": epochs, "concurrency": concurrency}
    write_results(__file__, {"compute_s": computes, "sweep": sweeps, "attached_sweep": attached, "scale": scale,
                             "two_worker_sweep": two, "reps": reps,
                             "quick": args.quick, "command_overrides": overrides}, headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
