"""``xmr compare``: train variants across seeds and report whether the claimed orderings hold."""

from __future__ import annotations

import argparse
from typing import Any


def _compare(args: argparse.Namespace) -> int:
    from xmr.compare.runner import markdown, run_comparison, update_report
    from xmr.machine import describe
    from xmr.compare.spec import SPEC_DIR, load_spec

    names = sorted(p.stem for p in SPEC_DIR.glob("*.yaml")) if args.all else args.spec
    if not names:
        print("xmr compare: give --spec NAME (repeatable) or --all; shipped specs: "
              + ", ".join(sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))))
        return 2
    specs = [load_spec(n, data_path=args.data, seeds=args.seeds, extra=args.set) for n in names]  # all checked first
    status = 0
    for spec in specs:
        c = run_comparison(spec, args.storage, concurrency=args.concurrency, address=args.address)
        print(markdown(c, describe()))
        print(f"[xmr] {spec.name}: runs, summary (CSV, Markdown) and {spec.metric}.png in {c.out}")
        if args.report:
            update_report(args.report, c)
            print(f"[xmr] updated {args.report}")
        status |= int((c.runs["status"] == "failed").any())
    return status


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("compare", help="train methods / baselines / ablations across seeds and compare",
                              description="Train every variant of a comparison spec with N seeds (concurrent Ray "
                                          "Tune trials), score each on the test split and report mean, std and 95%% "
                                          "confidence intervals, and whether the claimed orderings held.")
    p.add_argument("--spec", action="append", default=[], help="shipped spec name or YAML path (repeatable)")
    p.add_argument("--all", action="store_true", help="every shipped spec")
    p.add_argument("--data", default=None, help="override the spec's dataset path")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: the spec's)")
    p.add_argument("--set", action="append", default=[], metavar="A.B=VALUE", help="override for every variant")
    p.add_argument("--storage", default="runs/compare", help="where runs and summaries go (local or s3://)")
    p.add_argument("--concurrency", type=int, default=0, help="runs at a time (default: as CPUs allow)")
    p.add_argument("--report", default=None, help="results page to update, e.g. docs/results.md")
    p.add_argument("--address", default=None)
    p.set_defaults(func=_compare)
