"""Sweeps of λ weights and negative counts with Ray Tune + Optuna, and ablations.

Each Tune trial trains one sampled config with the one runner (``xmr.tune.trials.run_trial``:
in the trial's own process for one worker, a ``TorchTrainer`` for more) and reports every
epoch's row; ASHA stops poor trials early on that per-epoch validation metric. Every trial is a normal xmr run folder (config, metrics,
best checkpoint) under ``<sweep>/trials/``, so the best one is served like any run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd

from xmr.tasks import family_of
from xmr.config import Config, apply_overrides, from_dict, with_values
from xmr.data import storage
from xmr.train.driver import prepare
from xmr.tune.report import optuna_logging_quiet, write_ablation_report, write_sweep_report
from xmr.train.runfs import RunDir
from xmr.tune.trials import NOT_METRICS, SweepResult, make_tuner, per_trial_cpus, run_trial

@dataclass
class SweepSettings:
    name: str
    trials: int = 20
    concurrency: int = 0  # 0: as many as the cluster's CPUs hold
    seed: int = 0
    searcher: str = "tpe"  # tpe | random
    scheduler: str = "asha"  # asha | none
    grace_period: int = 1
    reduction_factor: int = 2
    optuna_storage: str | None = None  # default: sqlite in the sweep folder (local storage); a URL for another
    multi_objective: bool = False  # Optuna over (metric, training seconds per epoch): a Pareto front


def trial_driver(config: dict[str, Any], base: dict[str, Any], trials_root: str,
                 variants: dict[str, list[str]] | None = None) -> None:
    """One Tune trial: the sampled values (dotted config paths) or a named variant, trained
    by ``run_trial``; every epoch's row reaches Tune."""
    from ray import tune

    cfg = with_values(from_dict(base), {k: v for k, v in config.items() if "." in k})
    if variants is not None:
        cfg = from_dict(apply_overrides(cfg.to_dict(), variants[config["variant"]]))
    if "seed" in config:
        cfg.seed = int(config["seed"])
    cfg.storage.root = trials_root
    cfg.storage.run_name = f"trial_{tune.get_context().get_trial_id()}"
    run_trial(cfg)


def run_sweep(cfg: Config, space, settings: SweepSettings, address: str | None = None) -> SweepResult:
    """Sample ``settings.trials`` configs from ``space`` with Optuna (TPE, seeded), prune with
    ASHA, and write the trials table, best config, best-checkpoint pointer and plots."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from xmr.train.driver import ensure_ray, local_cpus

    cfg, _, _ = prepare(cfg, run_name=settings.name)
    metric = space.metric or cfg.storage.checkpoint_metric or family_of(cfg).main_metric
    mode = space.mode
    cfg.storage.checkpoint_metric, cfg.storage.checkpoint_mode = metric, mode
    if settings.searcher not in ("tpe", "random"):
        raise ValueError(f"searcher = {settings.searcher!r}: use tpe or random")
    sampler = (optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=max(2, min(10, settings.trials // 3)))
               if settings.searcher == "tpe" else optuna.samplers.RandomSampler(seed=settings.seed))
    optuna_logging_quiet()  # Optuna's "A new study created" INFO line: xmr says it in its own
    storage_url = settings.optuna_storage or default_study_storage(cfg, settings.name)
    study_storage = optuna.storages.RDBStorage(storage_url) if storage_url else None
    if storage_url:
        print(f"[xmr] Optuna study {settings.name!r} in {storage_url} (watch it: optuna-dashboard {storage_url})",
              flush=True)
    track_under_parent(cfg, settings.name, {"trials": settings.trials, "searcher": settings.searcher,
                                            "space": [p.path for p in space.params]})
    if settings.multi_objective:  # ASHA needs one metric; TPE handles several (Pareto-based)
        settings.scheduler = "none"
        search = OptunaSearch(space=space.suggest, metric=[metric, "train_s"], mode=[mode, "min"], sampler=sampler,
                              study_name=settings.name, storage=study_storage)
    else:
        search = OptunaSearch(space=space.suggest, metric=metric, mode=mode, sampler=sampler,
                              study_name=settings.name, storage=study_storage)
    # "epoch", not Tune's report count: a trial retried from its run folder goes on at the epoch
    # it reached, and ASHA must judge it there, beside its peers' same epoch
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=cfg.optim.epochs,
                               grace_period=settings.grace_period, reduction_factor=settings.reduction_factor)
                 if settings.scheduler == "asha" else None)
    # Ray Train's trials need the state API (the dashboard): on whenever a trial may have workers
    multi = cfg.resources.num_workers > 1 or any(p.path.startswith("resources.") for p in space.params)
    ensure_ray(address, num_cpus=max(local_cpus(cfg), int(2 * per_trial_cpus(cfg)) + 2), dashboard=multi)
    trials_root = storage.join(cfg.storage.root, settings.name, "trials")
    trainable = tune.with_parameters(trial_driver, base=cfg.to_dict(), trials_root=trials_root)
    t0 = time.perf_counter()
    grid = make_tuner(trainable, cfg, settings.name, settings.trials, metric=None if settings.multi_objective else metric,
                      mode=None if settings.multi_objective else mode, max_concurrent=settings.concurrency,
                      search_alg=search, scheduler=scheduler).fit()
    table = trials_table(grid, cfg, metric, mode, [p.path for p in space.params])
    return write_sweep_report(cfg, settings, space, table, metric, mode, wall_s=time.perf_counter() - t0)


def default_study_storage(cfg: Config, name: str) -> str | None:
    """A SQLite file in the sweep folder for a local storage root (the study survives the
    sweep, ``optuna-dashboard`` can open it while it runs, and a resumed sweep resumes it);
    in memory for an S3 root (pass --optuna-storage to keep it)."""
    if storage.is_s3(cfg.storage.root):
        return None
    folder = os.path.join(cfg.storage.root, name)
    os.makedirs(folder, exist_ok=True)
    return f"sqlite:///{os.path.abspath(folder)}/optuna.db"


def track_under_parent(cfg: Config, name: str, params: dict[str, Any]) -> None:
    """One MLflow parent run for the sweep (kept in its folder, so a resumed sweep reuses it);
    the trials' runs are its children, in the sweep's store."""
    from xmr.train.tracking import RUN_ID_FILE, start_parent

    folder = storage.join(cfg.storage.root, name)
    sweep = RunDir(cfg.storage.root, name, cfg.data.endpoint_url)
    parent = sweep.read_text(RUN_ID_FILE)
    if not parent:
        parent, _ = start_parent(cfg, folder, name, params)
        if parent:
            sweep.write_text(RUN_ID_FILE, parent)
    if parent:
        cfg.tracking.folder, cfg.tracking.parent_run_id = cfg.tracking.folder or folder, parent.strip()


def run_ablation(cfg: Config, variants: dict[str, list[str]], settings: SweepSettings, seeds: list[int],
                 address: str | None = None) -> SweepResult:
    """Every named variant (``{"full": [], "w/o X": [...]}``) x every seed, same data and
    schedule, no early stopping; the table compares their final metrics."""
    from ray import tune

    from xmr.train.driver import ensure_ray, local_cpus

    cfg, metric, mode = prepare(cfg, run_name=settings.name)
    for name, overrides in variants.items():  # every variant must be a valid config before anything runs
        from_dict(apply_overrides(cfg.to_dict(), overrides))
    track_under_parent(cfg, settings.name, {"variants": list(variants), "seeds": seeds})
    multi = any(from_dict(apply_overrides(cfg.to_dict(), o)).resources.num_workers > 1 for o in variants.values()) \
        or cfg.resources.num_workers > 1
    ensure_ray(address, num_cpus=max(local_cpus(cfg), int(2 * per_trial_cpus(cfg)) + 2), dashboard=multi)
    trials_root = storage.join(cfg.storage.root, settings.name, "trials")
    trainable = tune.with_parameters(trial_driver, base=cfg.to_dict(), trials_root=trials_root, variants=variants)
    t0 = time.perf_counter()
    n = len(variants) * len(seeds)
    grid = make_tuner(trainable, cfg, settings.name, n, metric=metric, mode=mode, max_concurrent=settings.concurrency,
                      param_space={"variant": tune.grid_search(list(variants)), "seed": tune.grid_search(seeds)}).fit()
    table = trials_table(grid, cfg, metric, mode, ["variant", "seed"])
    return write_ablation_report(cfg, settings, table, metric, mode, variants, wall_s=time.perf_counter() - t0)


def trials_table(grid, cfg: Config, metric: str, mode: str, param_names: list[str]) -> pd.DataFrame:
    """One row per trial: its parameters, best and last metric, epochs run, pruned or not,
    error, and its run folder / best checkpoint."""
    rows = []
    for result in grid:
        conf = result.config or {}
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        epochs = int(history["epoch"].max()) if "epoch" in history and len(history) else 0
        values = history[metric].dropna() if metric in history else pd.Series(dtype=float)
        best_value = (values.max() if mode == "max" else values.min()) if len(values) else float("nan")
        run = str(history["run"].dropna().iloc[-1]) if "run" in history and history["run"].notna().any() else ""
        row: dict[str, Any] = {"trial": run or os.path.basename(str(result.path))}
        row.update({name: conf.get(name) for name in param_names})
        epoch_s = history["train_s"].dropna() if "train_s" in history else pd.Series(dtype=float)
        row.update({metric: best_value, f"last_{metric}": float(values.iloc[-1]) if len(values) else float("nan"),
                    "train_s_per_epoch": float(epoch_s.mean()) if len(epoch_s) else float("nan"),
                    "epochs": epochs, "pruned": bool(result.error is None and 0 < epochs < cfg.optim.epochs),
                    "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}"[:300]})
        if len(history):  # the final epoch's validation metrics, for comparisons across variants
            last = history.iloc[-1]
            row.update({f"final_{k}": float(last[k]) for k in history.columns
                        if k not in NOT_METRICS and not k.startswith("train_") and pd.api.types.is_number(last[k])})
        rows.append(row)
    return pd.DataFrame(rows)


