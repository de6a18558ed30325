"""``xmr train``: the same code path as ``jobs/train.py`` under ``ray job submit``."""

from __future__ import annotations

import argparse
from typing import Any


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="preset name (sccmrl, qacln, ...) or a YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="A.B=VALUE",
                        help="override a config field (repeatable), e.g. --set loss.lambdas.center=0.1")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to attach to (default: RAY_ADDRESS, else an embedded local Ray)")


def _train(args: argparse.Namespace) -> int:
    from xmr.config import load_config
    from xmr.train.driver import run_training

    cfg = load_config(args.config, args.set)
    if args.storage:
        cfg.storage.root = args.storage
    result = run_training(cfg, address=args.address, run_name=args.run_name)
    return 0 if result.history else 1


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("train", help="train a method on Ray Train (local Ray or a cluster)",
                                   description="Train a preset with Ray Train. Relaunching with the same "
                                               "--run-name resumes from the run's latest checkpoint.")
    add_config_arguments(parser)
    parser.add_argument("--run-name", default=None, help="run folder name (default: <method>-<timestamp>)")
    parser.add_argument("--storage", default=None, help="runs root, local dir or s3://bucket/prefix (storage.root)")
    parser.set_defaults(func=_train)
