"""How long ``xmr`` takes to answer before it does any work: ``xmr --help`` and a
subcommand's ``--help``, as a user runs them (a fresh ``python -m xmr.cli`` each time).

Side by side in the same interleaved rounds: the command line as it is, and the command
line with the modules it imported before the input errors moved to ``xmr.config``
(``xmr.compare.spec`` and ``xmr.tune.space``, which bring torch) imported first: the
start-up users paid before. Median of the rounds; also whether torch and Ray were loaded.

    python bench/cli_startup.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO / "bench"))

from _common import write_results  # noqa: E402

NOW = "import runpy, sys; sys.argv = ['xmr', *{argv!r}]; runpy.run_module('xmr.cli', run_name='__main__')"
BEFORE = "import xmr.compare.spec, xmr.tune.space; " + NOW
LOADED = ("import sys, runpy; sys.argv = ['xmr', *{argv!r}]\ntry:\n    runpy.run_module('xmr.cli', run_name='__main__')\n"
          "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'ray') if m in sys.modules), file=sys.stderr)")
COMMANDS = {"xmr --help": ["--help"], "xmr tune --help": ["tune", "--help"]}


def timed(code: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0 or "usage: xmr" not in proc.stdout:
        raise SystemExit(f"the command failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    args = parser.parse_args()
    rows = []
    for name, argv in COMMANDS.items():
        now, before = [], []
        timed(NOW.format(argv=argv))  # warm the file cache for both
        for _ in range(args.rounds):
            now.append(timed(NOW.format(argv=argv)))
            before.append(timed(BEFORE.format(argv=argv)))
        loaded = subprocess.run([sys.executable, "-c", LOADED.format(argv=argv)], capture_output=True, text=True,
                                cwd=REPO).stderr.strip().splitlines()[-1]
        ratios = [b / n for b, n in zip(before, now)]
        rows.append({"command": name, "now_s": statistics.median(now), "before_s": statistics.median(before),
                     "speedup": statistics.median(ratios), "loaded_now": loaded, "rounds": args.rounds})
    print(f"{'command':<18} {'before s':>9} {'now s':>7} {'speedup':>8}  loaded now")
    for r in rows:
        print(f"{r['command']:<18} {r['before_s']:>9.2f} {r['now_s']:>7.2f} {r['speedup']:>7.1f}x  {r['loaded_now']}")
    write_results(__file__, {"commands": rows, "load_avg_1m": os.getloadavg()[0]},  # a shared machine: how loaded
                  {"help_s": rows[0]["now_s"], "help_s_before": rows[0]["before_s"], "help_speedup": rows[0]["speedup"],
                   "tune_help_s": rows[1]["now_s"], "tune_help_speedup": rows[1]["speedup"]})


if __name__ == "__main__":
    main()
