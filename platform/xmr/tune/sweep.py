"""Sweeps of λ weights and negative counts with Ray Tune + Optuna, and ablations.

Each Tune trial trains one sampled config with the one runner (``xmr.tune.trials.run_trial``:
in the trial's own process for one worker, a ``TorchTrainer`` for more) and reports every
epoch's row; ASHA stops poor trials early on that per-epoch validation metric. Every trial is a normal xmr run folder (config, metrics,
best checkpoint) under ``<sweep>/trials/``, so the best one is served like any run.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import pandas as pd

from xmr.tasks import family_of
from xmr.config import Config, apply_overrides, from_dict, set_values
from xmr.data import storage
from xmr.ray.session import ensure_ray
from xmr.runtime import Runtime
from xmr.train.driver import prepare, train_cpus
from xmr.tune.report import optuna_logging_quiet, write_ablation_report, write_sweep_report
from xmr.train.runfs import RunDir
from xmr.tune.trials import NOT_METRICS, SweepResult, fit_trials, per_trial_cpus, run_trial

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
    confirm_top: int = 0  # after the search: retrain the top K configurations (the Pareto front's members
    confirm_seeds: int = 0  # with --multi-objective) with this many new seeds each; 0: no confirmation


def trial_config(config: dict[str, Any], base: dict[str, Any], variants: dict[str, list[str]] | None = None,
                 candidates: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A trial's raw config: the sweep's ``base`` (a prepared config's dict) with the sampled
    values (dotted config paths), a named variant's overrides or a named candidate's values
    (a confirmation run), and the trial's seed. Built as a mapping and typed once."""
    values = {k: v for k, v in config.items() if "." in k}
    if candidates is not None:
        values = {k: v for k, v in candidates[config["candidate"]].items() if v is not None}
    data = set_values(base, values)
    if variants is not None:
        data = apply_overrides(data, variants[config["variant"]])
    if "seed" in config:
        data["seed"] = int(config["seed"])
    return data


def trial_driver(config: dict[str, Any], base: dict[str, Any], trials_root: str,
                 variants: dict[str, list[str]] | None = None,
                 candidates: dict[str, dict[str, Any]] | None = None, verbose: bool = True,
                 runtime: dict[str, Any] | None = None) -> None:
    """One Tune trial: its config (``trial_config``), typed once and checked once (by
    ``run_trial``), trained by ``run_trial``; every epoch's row reaches Tune. The run folder
    is named after the Tune trial (``trial_<number>_<id>``). ``runtime``: the sweep's
    ``Runtime.to_dict()`` (a trial's process reads no settings of its own)."""
    from ray import tune

    cfg = from_dict(trial_config(config, base, variants, candidates))
    cfg.storage.root = trials_root
    context = tune.get_context()
    name = context.get_trial_name() or ""
    short = re.fullmatch(r"trial_\d+_\w+", name) is not None  # trial_dirname's, not Tune's default name
    cfg.storage.run_name = name if short else f"trial_{context.get_trial_id()}"
    run_trial(cfg, verbose=verbose, runtime=Runtime.from_dict(runtime))


def start_ray(cfg: Config, address: str | None, runtime: Runtime, multi: bool) -> None:
    """The sweep's Ray, sized for two trials at once (``per_trial_cpus``) and a trial's trainer.
    Ray Train's trials need the state API (the dashboard): on whenever a trial may have
    workers (``multi``); the trials' epoch lines (and Ray's notices) only with ``--verbose``."""
    ensure_ray(address, runtime=runtime, need_cpus=max(train_cpus(cfg), 2 * per_trial_cpus(cfg)), dashboard=multi,
               driver_logs=runtime.verbose)


def run_sweep(cfg: Config, space, settings: SweepSettings, address: str | None = None,
              runtime: Runtime | None = None) -> SweepResult:
    """Sample ``settings.trials`` configs from ``space`` with Optuna (TPE, seeded), prune with
    ASHA, confirm the top ones with new seeds (``settings.confirm_top``), and write the trials
    table, best config, best-checkpoint pointer and plots (from the sweep's own study)."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler

    from xmr.tune import study as studies

    runtime = runtime or Runtime()
    cfg, _, _ = prepare(cfg, run_name=settings.name)
    metric = space.metric or cfg.storage.checkpoint_metric or family_of(cfg).main_metric
    mode = space.mode
    cfg.storage.checkpoint_metric, cfg.storage.checkpoint_mode = metric, mode
    if settings.searcher not in ("tpe", "random"):
        raise ValueError(f"searcher = {settings.searcher!r}: use tpe or random")
    sampler = (optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=max(2, min(10, settings.trials // 3)))
               if settings.searcher == "tpe" else optuna.samplers.RandomSampler(seed=settings.seed))
    optuna_logging_quiet()  # Optuna's "A new study created" INFO line: xmr says it in its own
    sweep = RunDir(cfg.storage.root, settings.name, cfg.data.endpoint_url)
    storage_url = settings.optuna_storage or studies.default_storage(cfg.storage.root, settings.name,
                                                                     runtime.studies)
    if not settings.optuna_storage and storage.is_s3(cfg.storage.root):
        studies.fetch_study(storage_url, sweep)  # a resumed S3 sweep: its study as last written there
    study_storage = optuna.storages.RDBStorage(storage_url)
    print(f"[xmr] Optuna study {settings.name!r} in {storage_url} (watch it: optuna-dashboard {storage_url})",
          flush=True)
    track_under_parent(cfg, settings.name, {"trials": settings.trials, "searcher": settings.searcher,
                                            "space": [p.path for p in space.params]}, runtime)
    if settings.multi_objective:  # ASHA needs one metric; TPE handles several (Pareto-based)
        settings.scheduler = "none"
        search = studies.StudySearch(space=space.suggest, metric=[metric, "train_s"], mode=[mode, "min"],
                                     sampler=sampler, study_name=settings.name, storage=study_storage,
                                     max_epochs=cfg.optim.epochs)
    else:
        search = studies.StudySearch(space=space.suggest, metric=metric, mode=mode, sampler=sampler,
                                     study_name=settings.name, storage=study_storage, max_epochs=cfg.optim.epochs)
    # "epoch", not Tune's report count: a trial retried from its run folder goes on at the epoch
    # it reached, and ASHA must judge it there, beside its peers' same epoch
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=cfg.optim.epochs,
                               grace_period=settings.grace_period, reduction_factor=settings.reduction_factor)
                 if settings.scheduler == "asha" else None)
    multi = cfg.resources.num_workers > 1 or any(p.path.startswith("resources.") for p in space.params)
    start_ray(cfg, address, runtime, multi)
    trials_root = storage.join(cfg.storage.root, settings.name, "trials")
    plan = partial(trial_driver, base=cfg.to_dict(), trials_root=trials_root, verbose=runtime.verbose,
                   runtime=runtime.to_dict())
    t0 = time.perf_counter()
    grid = fit_trials(plan, cfg, settings.name, settings.trials, metric=None if settings.multi_objective else metric,
                      mode=None if settings.multi_objective else mode, max_concurrent=settings.concurrency,
                      search_alg=search, scheduler=scheduler, status=True, progress_metric=metric,
                      max_epochs=cfg.optim.epochs if scheduler is not None else None,  # only ASHA prunes
                      patience=cfg.optim.patience, short_trial_dirs=True,
                      progress_every_s=runtime.progress_every_s)
    search_s = time.perf_counter() - t0
    study = studies.load(storage_url, settings.name)
    table = with_study(trials_table(grid, cfg, metric, mode, [p.path for p in space.params]), study)
    confirmation = None
    if settings.confirm_top > 0 and settings.confirm_seeds > 0:
        confirmation = run_confirmation(cfg, space, settings, table, metric, mode, runtime)
    if not settings.optuna_storage and storage.is_s3(cfg.storage.root):
        studies.sync_study(storage_url, sweep)  # the study beside the results
    return write_sweep_report(cfg, settings, space, table, metric, mode, wall_s=search_s, study=study,
                              confirmation=confirmation)


def with_study(table: pd.DataFrame, study) -> pd.DataFrame:
    """The trials table joined with the study: each trial's Optuna number and state; a trial is
    ``pruned`` when the study says so (ASHA stopped it), not merely short of its epochs."""
    from xmr.tune.study import by_tune_id

    if not len(table):
        return table
    trials = by_tune_id(study)
    table = table.copy()
    found = [trials.get(t) for t in table["trial_id"]] if "trial_id" in table else [None] * len(table)
    table.insert(1, "number", [t.number if t is not None else None for t in found])
    table["state"] = [t.state.name if t is not None else None for t in found]
    known = table["state"].notna()
    table.loc[known, "pruned"] = table.loc[known, "state"] == "PRUNED"
    table["pruned"] = table["pruned"].astype(bool)
    return table


def run_confirmation(cfg: Config, space, settings: SweepSettings, table: pd.DataFrame, metric: str,
                     mode: str, runtime: Runtime | None = None) -> dict[str, Any] | None:
    """The search's top ``confirm_top`` configurations (its finished trials; with
    ``--multi-objective`` the Pareto front's members) trained again with ``confirm_seeds`` new
    seeds each (cfg.seed + 1, + 2, ...: the search's own score, the one the winner's curse
    inflates, is not among them), by the same runner and trial driver, one grid of
    (candidate, seed) under ``<sweep>/confirm``. Resumed with the sweep."""
    from ray import tune

    from xmr.tune.confirm import candidates as pick_candidates

    names = pick_candidates(table, metric, mode, settings.confirm_top, settings.multi_objective)
    if not names:
        print("[xmr] confirmation: no finished trial to confirm", flush=True)
        return None
    seeds = [cfg.seed + i for i in range(1, settings.confirm_seeds + 1)]
    rows = table.set_index("trial")
    params = {name: space.typed(rows.loc[name].to_dict()) for name in names}
    n, t0 = len(names) * len(seeds), time.perf_counter()
    print(f"[xmr] confirming the top {len(names)} configuration(s) with {len(seeds)} new seed(s) each "
          f"(seeds {', '.join(map(str, seeds))}; {n} runs of {cfg.optim.epochs} epochs)", flush=True)
    sweep_root = storage.join(cfg.storage.root, settings.name)
    trials_root = storage.join(sweep_root, "confirm", "trials")
    runtime = runtime or Runtime()
    plan = partial(trial_driver, base=cfg.to_dict(), trials_root=trials_root, candidates=params,
                   verbose=runtime.verbose, runtime=runtime.to_dict())
    grid = fit_trials(plan, cfg, "confirm", n, metric=metric, mode=mode, max_concurrent=settings.concurrency,
                      param_space={"candidate": tune.grid_search(names), "seed": tune.grid_search(seeds)},
                      root=sweep_root, what="confirm", status=True,  # no scheduler: nothing is pruned
                      progress_metric=metric, short_trial_dirs=True, progress_every_s=runtime.progress_every_s)
    runs = trials_table(grid, cfg, metric, mode, ["candidate", "seed"]).assign(pruned=False)  # no scheduler here
    return {"runs": runs, "names": names, "seeds": seeds, "params": params, "trials_root": trials_root,
            "wall_s": time.perf_counter() - t0}


def track_under_parent(cfg: Config, name: str, params: dict[str, Any], runtime: Runtime | None = None) -> None:
    """One MLflow parent run for the sweep (kept in its folder, so a resumed sweep reuses it);
    the trials' runs are its children, in the sweep's store."""
    from xmr.train.tracking import RUN_ID_FILE, start_parent

    folder = storage.join(cfg.storage.root, name)
    sweep = RunDir(cfg.storage.root, name, cfg.data.endpoint_url)
    parent = sweep.read_text(RUN_ID_FILE)
    if not parent:
        parent, _ = start_parent(cfg, folder, name, params, runtime)
        if parent:
            sweep.write_text(RUN_ID_FILE, parent)
    if parent:
        cfg.tracking.folder, cfg.tracking.parent_run_id = cfg.tracking.folder or folder, parent.strip()


def run_ablation(cfg: Config, variants: dict[str, list[str]], settings: SweepSettings, seeds: list[int],
                 address: str | None = None, runtime: Runtime | None = None) -> SweepResult:
    """Every named variant (``{"full": [], "w/o X": [...]}``) x every seed, same data and
    schedule, no early stopping; the table compares their final metrics."""
    from ray import tune

    runtime = runtime or Runtime()
    cfg, metric, mode = prepare(cfg, run_name=settings.name)
    base = cfg.to_dict()
    # every variant must be a valid config before anything runs (its trial checks it again, once)
    typed = [from_dict(apply_overrides(base, overrides)) for overrides in variants.values()]
    track_under_parent(cfg, settings.name, {"variants": list(variants), "seeds": seeds}, runtime)
    multi = any(v.resources.num_workers > 1 for v in typed) or cfg.resources.num_workers > 1
    start_ray(cfg, address, runtime, multi)
    trials_root = storage.join(cfg.storage.root, settings.name, "trials")
    plan = partial(trial_driver, base=base, trials_root=trials_root, variants=variants, verbose=runtime.verbose,
                   runtime=runtime.to_dict())
    t0 = time.perf_counter()
    n = len(variants) * len(seeds)
    grid = fit_trials(plan, cfg, settings.name, n, metric=metric, mode=mode, max_concurrent=settings.concurrency,
                      param_space={"variant": tune.grid_search(list(variants)), "seed": tune.grid_search(seeds)},
                      short_trial_dirs=True)
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
        folder = os.path.basename(str(result.path))
        row: dict[str, Any] = {"trial": run or folder,  # a trial that failed before any row: its Tune folder's id
                               "trial_id": (result.metrics or {}).get("trial_id") or folder.rsplit("_", 1)[-1]}
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


