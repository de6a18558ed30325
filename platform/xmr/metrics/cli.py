"""``xmr metrics ...`` subcommands; ``register`` plugs them into the main ``xmr`` parser.

Heavy imports (numpy, torch via ``xmr.metrics.vcmr``) happen inside the handler, so
building the ``xmr`` parser stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Add ``metrics tvr`` to ``subparsers``; the chosen handler is ``args.func(args) -> int``."""
    metrics = subparsers.add_parser("metrics", help="compute evaluation metrics from prediction files")
    tasks = metrics.add_subparsers(dest="metrics_command", metavar="{tvr}", required=True)
    tvr = tasks.add_parser("tvr", help="TVR metrics (public standalone evaluation layout)")
    tvr.add_argument("--predictions", required=True, type=Path, help="prediction JSON (video2idx + VCMR/SVMR/VR)")
    tvr.add_argument("--ground-truth", required=True, type=Path, help="annotation jsonl, e.g. tvr_val_release.jsonl")
    tvr.add_argument("--out", required=True, type=Path, help="where to write the metrics JSON")
    tvr.set_defaults(func=run_tvr)
    return metrics


def run_tvr(args: argparse.Namespace, stdout: TextIO | None = None) -> int:
    """Evaluate, write ``args.out`` (JSON, indent 4) and print a compact table."""
    from xmr.metrics.tvr import evaluate_tvr, load_ground_truth

    try:
        with open(args.predictions, encoding="utf-8") as handle:
            submission = json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"{args.predictions}: not valid JSON ({err.msg} at line {err.lineno})") from err
    metrics = evaluate_tvr(submission, load_ground_truth(args.ground_truth))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(metrics, indent=4) + "\n", encoding="utf-8")
    print(format_table(metrics), file=stdout or sys.stdout)
    return 0


def format_table(metrics: dict[str, Any]) -> str:
    """One line per task: its recall keys and values (the *_by_type blocks are left to the JSON)."""
    lines = []
    for task, values in metrics.items():
        if task.endswith("_by_type"):
            continue
        width = max(len(key) for key in values)
        lines.append(task)
        lines.append("  " + " ".join(f"{key:>{width}}" for key in values))
        lines.append("  " + " ".join(f"{value:>{width}.2f}" for value in values.values()))
    return "\n".join(lines)
