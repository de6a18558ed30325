"""``xmr compare``: tune, train and test variants across seeds; judge the claimed orderings."""

from __future__ import annotations

import argparse
import time
from typing import Any


def _compare(args: argparse.Namespace) -> int:
    from xmr.compare.report import markdown, update_report, write_page
    from xmr.compare.runner import run_comparison
    from xmr.compare.spec import SPEC_DIR, load_spec
    from xmr.machine import describe

    names = sorted(p.stem for p in SPEC_DIR.glob("*.yaml")) if args.all else args.spec
    if not names:
        print("xmr compare: give --spec NAME (repeatable) or --all; shipped specs: "
              + ", ".join(sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))))
        return 2
    specs = [load_spec(n, data_path=args.data, seeds=args.seeds, extra=args.set, tuning_seed=args.tuning_seed)
             for n in names]  # all checked first
    status, done, t0 = 0, [], time.perf_counter()
    for spec in specs:
        print(f"[xmr] comparison {spec.name}: {len(spec.variants)} variants x {len(spec.seeds)} replicates"
              + (f" x {len(spec.map.levels)} levels of {spec.map.label}" if spec.map else "")
              + (f", {spec.tuning_trials} tuning candidates per variant in every replicate" if spec.tuning_trials else ""),
              flush=True)
        c = run_comparison(spec, args.storage, concurrency=args.concurrency, address=args.address,
                           runtime=args.runtime)
        done.append(c)
        print(markdown(c, describe()))
        print(f"[xmr] {spec.name}: runs, tuning, summary, paired differences and plots in {c.out}", flush=True)
        if args.report and not args.all:
            update_report(args.report, c)
            print(f"[xmr] updated {args.report}")
        status |= int((c.runs["status"] == "failed").any())
    if args.report and args.all:
        wall, this_call = sum(c.wall_s for c in done), time.perf_counter() - t0
        write_page(args.report, done,
                   f"The whole set's runs took {wall / 60:.0f} min on {describe()} (per spec: the wall time "
                   "during which any of its tuning or seed runs was training, summed over the specs; "
                   "building the synthetic datasets and starting Ray come on top).")
        print(f"[xmr] wrote {args.report} (runs: {wall / 60:.1f} min; this invocation: {this_call / 60:.1f} min)")
    return status


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("compare", help="tune, train and test methods / baselines / ablations across seeds",
                              description="For every replicate r of a comparison spec: every variant tunes on "
                                          "its own fresh draw of candidates (the same draw for every variant), each "
                                          "trained with training seed r until validation stops improving; the best "
                                          "on validation is replicate r's run and is scored on the test split. Both "
                                          "sides of a claim share one epoch cap (doubled for all, and retuned, while "
                                          "a chosen run still improves at it); a range whose winners sit at its edge "
                                          "is widened. Each claimed ordering is judged held / reversed / equivalent / "
                                          "inconclusive from the paired differences (Holm-adjusted across the "
                                          "spec's claims), with P(claimed side wins).")
    p.add_argument("--spec", action="append", default=[], help="shipped spec name or YAML path (repeatable)")
    p.add_argument("--all", action="store_true", help="every shipped spec (with --report: rewrite the whole page)")
    p.add_argument("--data", default=None, help="run on this dataset instead of the spec's (default: the spec's)")
    p.add_argument("--seeds", type=int, default=None,
                   help="replicates (a training seed and a tuning draw each; default: the spec's, 5)")
    p.add_argument("--tuning-seed", type=int, default=None,
                   help="seed of the tuning draws (default: the spec's tuning.seed, 1000; a variant's own "
                        "tuning_seed is kept)")
    p.add_argument("--set", action="append", default=[], metavar="A.B=VALUE",
                   help="a config override for every variant (repeatable)")
    p.add_argument("--storage", default="runs/compare", help="where runs and tables go, local or s3:// (default: runs/compare)")
    p.add_argument("--concurrency", type=int, default=0, help="runs at a time (default: as the cluster's CPUs allow)")
    p.add_argument("--report", default=None, help="results page to write, e.g. docs/results.md (default: none)")
    p.add_argument("--address", default=None,
                   help="Ray cluster, or 'local' for a new local Ray (default: RAY_ADDRESS, a running local one, or embedded)")
    p.add_argument("--verbose", action="store_true", help="show Ray Tune's own trial tables and logs (default: xmr's lines)")
    p.set_defaults(func=_compare)
