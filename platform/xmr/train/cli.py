"""``xmr train``: the same code path as ``jobs/train.py`` under ``ray job submit``."""

from __future__ import annotations

import argparse
from typing import Any


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="preset name (sccmrl, qacln, ...) or a YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="A.B=VALUE",
                        help="override a config field (repeatable), e.g. --set loss.lambdas.center=0.1")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to attach to, or 'local' for a new local Ray (default: RAY_ADDRESS, a Ray "
                             "running on this machine, else an embedded local Ray)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs beside xmr's lines")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else SQLite in the run folder)")
    parser.add_argument("--no-tracking", action="store_true", help="no MLflow tracking (tracking.enabled=false)")


def apply_common(args: argparse.Namespace, cfg) -> None:
    """--tracking-uri, --no-tracking onto the config (--verbose is the runtime's: ``args.runtime``,
    built by ``xmr.cli.main``)."""
    if getattr(args, "tracking_uri", None):
        cfg.tracking.uri = args.tracking_uri
    if getattr(args, "no_tracking", False):
        cfg.tracking.enabled = False


def _train(args: argparse.Namespace) -> int:
    from xmr.config import load_config
    from xmr.train.driver import run_training

    cfg = load_config(args.config, args.set)
    apply_common(args, cfg)
    if args.storage:
        cfg.storage.root = args.storage
    result = run_training(cfg, address=args.address, run_name=args.run_name, force=args.force, runtime=args.runtime)
    return 0 if result.history else 1


def _eval(args: argparse.Namespace) -> int:
    from xmr.train.eval import run_eval

    run_eval(args.checkpoint, args.out, data=args.data, split=args.split, nms=args.nms, workers=args.workers,
             address=args.address, endpoint_url=args.endpoint_url, runtime=args.runtime)
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint dir, a run dir or a sweep dir (its best checkpoint), local or s3://")
    parser.add_argument("--data", default=None, help="dataset root to score (default: the checkpoint's data.path)")
    parser.add_argument("--split", default=None, help="split to score (default: the checkpoint's data.test_split)")
    parser.add_argument("--out", required=True, help="folder for metrics.json and the family's files (local or s3://)")
    parser.add_argument("--nms", type=float, default=None, metavar="IOU",
                        help="VCMR: drop a moment overlapping a better one of the same video above this temporal IoU "
                             "(0.5 is XML's setting; default: none)")
    parser.add_argument("--workers", type=int, default=1,
                        help="Ray Train workers sharing the corpus and queries (default 1: in this process)")
    parser.add_argument("--address", default=None, help="Ray cluster for --workers > 1, or 'local' "
                                                        "(default: RAY_ADDRESS, a running local one, or embedded)")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: the AWS environment's)")


def register(subparsers: Any) -> None:
    ev = subparsers.add_parser("eval", help="score a checkpoint on a dataset split (metrics + TVR predictions / "
                                            "per-query ranks)",
                               description="Score a checkpoint (or a run's / sweep's best) on a split with the "
                                           "evaluation training uses; writes metrics.json and, for VCMR, "
                                           "predictions.json in the public TVR evaluation layout, for category / "
                                           "pair per_query.csv.")
    add_eval_arguments(ev)
    ev.set_defaults(func=_eval)
    parser = subparsers.add_parser("train", help="train a method on Ray Train (local Ray or a cluster)",
                                   description="Train a preset with Ray Train. Relaunching with the same "
                                               "--run-name resumes from the run's latest checkpoint.")
    add_config_arguments(parser)
    parser.add_argument("--run-name", default=None, help="run folder name (default: <method>-<timestamp>)")
    parser.add_argument("--storage", default=None, help="runs root, local dir or s3://bucket/prefix (storage.root)")
    parser.add_argument("--force", action="store_true",
                        help="resume a run whose saved config differs from this one (without it, the differing "
                             "fields are named and nothing runs)")
    parser.set_defaults(func=_train)
