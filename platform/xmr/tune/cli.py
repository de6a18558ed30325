"""``xmr tune``: sweep a method's λ weights and K (Optuna TPE + ASHA on Ray Tune), or
``--ablate`` to train the preset with each component switched off in turn."""

from __future__ import annotations

import argparse
import time
from typing import Any


def _tune(args: argparse.Namespace) -> int:
    from xmr.config import load_config
    from xmr.tune.space import load_space
    from xmr.tune.sweep import SweepSettings, run_ablation, run_sweep

    from xmr.train.cli import apply_common

    cfg = load_config(args.config, args.set)
    space_path = args.space or cfg.method  # a shipped space is named after its method
    apply_common(args, cfg)
    if args.storage:
        cfg.storage.root = args.storage
    space = load_space(space_path, base=cfg)  # a bad space fails here, before Ray starts
    name = args.name or f"{'ablate' if args.ablate else 'sweep'}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    settings = SweepSettings(name=name, trials=args.trials, concurrency=args.concurrency, seed=args.seed,
                             searcher=args.searcher, scheduler="none" if args.no_asha else "asha",
                             grace_period=args.grace_period, optuna_storage=args.optuna_storage,
                             multi_objective=args.multi_objective, confirm_top=args.confirm_top,
                             confirm_seeds=args.confirm_seeds)
    if args.ablate:
        seeds = [int(s) for s in args.seeds.split(",")]
        result = run_ablation(cfg, space.ablation_variants(cfg), settings, seeds, address=args.address,
                              runtime=args.runtime)
    else:
        result = run_sweep(cfg, space, settings, address=args.address, runtime=args.runtime)
    return 0 if len(result.table) and result.table["error"].isna().any() else 1


def register(subparsers: Any) -> None:
    from xmr.train.cli import add_config_arguments

    p = subparsers.add_parser("tune", help="sweep λ and K with Ray Tune + Optuna (or --ablate)",
                              description="Sweep a search space (search_spaces/<method>.yaml) with Optuna's TPE "
                                          "and ASHA early stopping; relaunching with the same --name resumes it.")
    add_config_arguments(p)
    p.add_argument("--space", default=None, help="search space: a YAML file or a shipped space's name (default: the method's, search_spaces/<method>.yaml)")
    p.add_argument("--trials", type=int, default=20, help="trials to sample")
    p.add_argument("--concurrency", type=int, default=0, help="trials at a time (default: as many as CPUs allow)")
    p.add_argument("--name", default=None, help="sweep name (relaunch with the same name to resume)")
    p.add_argument("--storage", default=None, help="root for sweeps and trial runs (storage.root), local or s3://")
    p.add_argument("--searcher", default="tpe", choices=["tpe", "random"], help="Optuna sampler: TPE (seeded) or random search")
    p.add_argument("--no-asha", action="store_true", help="no early stopping")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--optuna-storage", default=None, help="Optuna storage URL, e.g. sqlite:///sweeps.db")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--multi-objective", action="store_true",
                   help="Optuna over (metric, training seconds per epoch); writes the Pareto front (no ASHA)")
    p.add_argument("--confirm-top", type=int, default=2,
                   help="after the search, retrain the top K configurations with new seeds and pick the winner by "
                        "its mean (with --multi-objective: the Pareto front's members); 0: no confirmation (default 2)")
    p.add_argument("--confirm-seeds", type=int, default=3,
                   help="new seeds per confirmed configuration (the search's own seed is not among them; default 3)")
    p.add_argument("--ablate", action="store_true", help="train the preset with each ablation of the space file")
    p.add_argument("--seeds", default="0", help="--ablate: comma-separated training seeds (default 0)")
    p.set_defaults(func=_tune)
