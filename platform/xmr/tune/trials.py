"""The one runner of sweeps, ablations (``xmr.tune.sweep``) and comparisons
(``xmr.compare``): ``run_trial`` trains one config inside a Tune trial, what a trial
reserves, how many run at once, the ``Tuner`` (resumed when its folder exists), and what a
finished sweep's trial folders say.

A trial with one worker trains in the trial's own process: ``xmr.train.fit.fit`` with
``TuneHooks``. A Ray Train worker group (controller, workers, process group) costs seconds
to start, more than a small trial's training, and an ASHA-stopped trial would be almost
all start-up. A trial with more workers fits a ``TorchTrainer`` over the same loop and
forwards its rows with ``TuneReportCallback``. Either way the trial is an xmr run folder
(config, checkpoints, ``metrics.csv``, ``best.json``) named after the trial."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from xmr.checkpoint import BEST
from xmr.config import Config
from xmr.ray.compat import quiet_tune_output
from xmr.ray.tune_state import FINISHED, mend_snapshot
from xmr.runtime import DEFAULT_PROGRESS_EVERY_S, Runtime
from xmr.train.driver import TrainResult, open_run, prepare, read_run, run_training
from xmr.train.fit import LocalHooks, fit
from xmr.train.runfs import RunDir, filesystem
from xmr.train.step import patience_exhausted

TRIAL_DRIVER_CPUS = 0.25  # a multi-worker trial's driver function only waits on its trainer


class TuneHooks(LocalHooks):
    """A one-worker trial in its Tune trial's process: the local hooks (checkpoints in the
    trial's run folder, kept as Ray Train keeps them), then ``tune.report`` of each epoch's
    row once ``metrics.csv`` and ``best.json`` name it (ASHA may stop the trial right after
    a report). Checkpoints are not handed to Tune as well: the run folder holds them, and a
    retried trial (``FailureConfig``) or a resumed sweep keeps the trial's run name, so the
    loop resumes from that folder; a second copy in Tune's trial folder would buy nothing."""

    def recorded(self, row: dict[str, Any]) -> None:
        from ray import tune

        tune.report(row)


def run_trial(cfg: Config, *, score_untrained: bool = True, verbose: bool = True, report: bool = True,
              runtime: Runtime | None = None, hooks: LocalHooks | None = None) -> TrainResult:
    """Train ``cfg`` (built for this trial, typed, not yet checked) as (part of) a Tune trial:
    checked once here (``prepare``), then trained in this process for one worker, by a
    ``TorchTrainer`` for more; every epoch's row reaches Tune when ``report``. ``hooks``: a
    one-worker trial's own hooks instead (a comparison's rung pause, ``xmr.compare.jobs``)."""
    runtime = runtime or Runtime()
    cfg, metric, mode = prepare(cfg)
    if cfg.resources.num_workers > 1:
        if hooks is not None:
            raise ValueError("run_trial: hooks apply to a one-worker trial only")
        from ray.tune.integration.ray_train import TuneReportCallback

        return run_training(cfg, callbacks=[TuneReportCallback()] if report else None, start_ray=False,
                            verbose=False, score_untrained=score_untrained, runtime=runtime, prepared=True)
    import torch

    run = open_run(cfg, verbose=False)
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    fit(cfg, hooks or (TuneHooks(verbose) if report else LocalHooks(verbose)), run=run, metric=metric, mode=mode,
        score_untrained=score_untrained, runtime=runtime)
    return read_run(cfg, metric, mode)


def trial_resources(cfg: Config) -> dict[str, float]:
    """What a trial reserves itself: a one-worker trial trains in its own process (its CPUs,
    its loader workers' and its GPU); a multi-worker trial's driver only waits, and its
    trainer's workers reserve the rest."""
    res = cfg.resources
    if res.num_workers > 1:
        return {"CPU": TRIAL_DRIVER_CPUS}
    out = {"CPU": float(res.cpus_per_worker * (1 + cfg.data.num_workers))}
    if res.use_gpu:
        out["GPU"] = float(res.gpus_per_worker)
    return out


@dataclass
class SweepResult:
    sweep_uri: str
    metric: str
    mode: str
    table: pd.DataFrame
    best: dict[str, Any] | None
    files: dict[str, str] = field(default_factory=dict)
    confirmation: Any = None  # a sweep's xmr.tune.confirm.Confirmation, when it confirmed its top trials


def per_trial_cpus(cfg: Config) -> float:
    """What one trial holds in all: itself, and a trainer's workers with their loader workers."""
    workers = cfg.resources.num_workers * cfg.resources.cpus_per_worker * (1 + cfg.data.num_workers)
    return workers + (TRIAL_DRIVER_CPUS if cfg.resources.num_workers > 1 else 0)


def concurrency(cfg: Config, requested: int, n_trials: int) -> int:
    """``requested`` (0: as many as the cluster's CPUs hold), never more than the trials."""
    import ray

    if requested:
        return min(requested, n_trials)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    return max(1, min(n_trials, int(cpus // per_trial_cpus(cfg))))


def experiment_trial(config: dict[str, Any], plan: Any) -> None:
    """The one trainable of every experiment xmr runs on Tune. ``plan`` says what a trial with
    ``config`` trains: a sweep's sampled values, an ablation's variant, a confirmation's seed
    (``xmr.tune.sweep.trial_driver`` with its fixed arguments bound), or a comparison's job
    (``xmr.compare.jobs.comparison_trial``). Every one of them trains through ``run_trial``."""
    plan(config)


def fit_trials(plan: Any, cfg: Config, name: str, n_trials: int, **tuner: Any):
    """Run ``n_trials`` trials of ``plan`` (a picklable callable of the trial's config, e.g. a
    ``functools.partial`` of a module-level function) and return Tune's ``ResultGrid``: the
    one place an experiment is handed to Tune (``make_tuner``'s keywords pass through)."""
    from ray import tune

    return make_tuner(tune.with_parameters(experiment_trial, plan=plan), cfg, name, n_trials, **tuner).fit()


def make_tuner(trainable, cfg: Config, name: str, n_trials: int, *, metric: str | None = None,
               mode: str | None = None, max_concurrent: int = 0, search_alg=None, param_space=None,
               scheduler=None, root: str | None = None, resume: bool = True, what: str = "sweep",
               resources=None, reuse_actors: bool = True, verbose: bool = False,
               progress_metric: str | None = None, max_failures: int | None = None,
               status: bool = False, max_epochs: int | None = None, patience: int = 0,
               short_trial_dirs: bool = False, progress_every_s: float = DEFAULT_PROGRESS_EVERY_S):
    """A ``Tuner`` whose trials each reserve ``resources`` (a dict, or a function of the
    trial's config; default ``trial_resources(cfg)``), resumed from ``<root>/<name>`` when it
    exists there (finished trials kept; the saved state mended first, ``xmr.ray.tune_state``).

    A failed one-worker trial is retried by Tune ``max_failures`` times (default
    ``storage.max_failures``) and resumes from its run folder; a multi-worker trial's
    ``TorchTrainer`` already retries its worker group that often, so Tune does not again
    (default 0 there): one level of retries, not their product.

    ``status``: a live status line beside the per-trial lines (``progress_callback``);
    ``max_epochs``: a trial's full length, given where a scheduler may stop trials (ASHA): a
    trial stopped short of it counts as pruned, unless ``optim.patience`` (``patience``, or the
    trial's own ``optim.patience``) ended it;
    ``progress_every_s``: the status line's interval in a log (the runtime's);
    ``short_trial_dirs``: Tune's trial folders (and trial names) ``trial_<number>_<short id>``
    (``trial_dirname``) instead of Ray's ~150 characters of parameters and a timestamp."""
    from ray import tune

    fs, base = filesystem(root or cfg.storage.root, cfg.data.endpoint_url)
    path = f"{base}/{name}"
    trainable = tune.with_resources(trainable, resources or trial_resources(cfg))
    if max_failures is None:
        max_failures = cfg.storage.max_failures if cfg.resources.num_workers == 1 else 0
    if not verbose:
        quiet_tune_output()
    if resume and tune.Tuner.can_restore(path, storage_filesystem=fs):
        print(f"[xmr] resuming {what} {name}: finished trials are kept, unfinished ones resume", flush=True)
        for note in mend_snapshot(fs, path):  # files an interruption left from different moments
            print(f"[xmr] {note}", flush=True)
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=fs)
    quiet = {} if verbose else {"verbose": 0, "callbacks": [progress_callback(
        n_trials, progress_metric or metric, what, mode=mode, status=status, max_epochs=max_epochs,
        patience=patience, every_s=progress_every_s)]}
    names = {"trial_dirname_creator": trial_dirname, "trial_name_creator": trial_dirname} if short_trial_dirs else {}
    return tune.Tuner(
        trainable,
        param_space=param_space or {},
        tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=n_trials if search_alg else 1,
                                    search_alg=search_alg, scheduler=scheduler, reuse_actors=reuse_actors,
                                    max_concurrent_trials=concurrency(cfg, max_concurrent, n_trials), **names),
        run_config=tune.RunConfig(name=name, storage_path=base, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=max_failures), **quiet),
    )


def trial_dirname(trial) -> str:
    """A Tune trial's folder and name, ``trial_<number>_<short id>`` (``trial_004_3fa2c1d9``):
    the number Tune counts trials by (its experiment tag's first part; from 1 for a search,
    0 for a grid), the id's first part. ``trial_driver`` names the trial's run folder the same."""
    number = str(trial.experiment_tag or "").split("_", 1)[0]
    short = str(trial.trial_id).split("_", 1)[0]
    return f"trial_{int(number):03d}_{short}" if number.isdigit() else f"trial_{trial.trial_id}"


class TrialProgress:
    """What ``progress_callback``'s Tune callback does (``progress_callback`` for the
    settings). Counts finished trials from Tune's list, so a resumed sweep goes on from where
    it was (its own trials already finished are in the list); the clock and the ETA are this
    process's."""

    def __init__(self, total: int, metric: str | None, what: str, *, mode: str | None = None, status: bool = False,
                 max_epochs: int | None = None, patience: int = 0,
                 every_s: float = DEFAULT_PROGRESS_EVERY_S) -> None:
        self.total, self.metric, self.what, self.mode, self.status = total, metric, what, mode, status
        self.max_epochs, self.patience, self.every_s = max_epochs, patience, every_s
        self.ran_here, self.t0, self.shown, self.drawn = 0, time.perf_counter(), time.perf_counter(), False
        self.seen: dict[str, dict[int, float]] = {}  # trial id -> epoch -> metric (for optim.patience)

    def setup(self, **info) -> None:  # also when resumed: this instance was unpickled
        self.ran_here, self.t0, self.shown, self.drawn = 0, time.perf_counter(), time.perf_counter(), False

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        epoch, value = result.get("epoch"), result.get(self.metric) if self.metric else None
        if self.max_epochs and isinstance(epoch, (int, float)) and isinstance(value, (int, float)):
            self.seen.setdefault(trial.trial_id, {})[int(epoch)] = float(value)

    def _pruned(self, trial, ending: bool = False) -> bool:
        """Stopped short of its epochs by the scheduler (``ending``: the trial being
        completed, still RUNNING in Tune's list); not a trial ``optim.patience`` ended."""
        epoch = (trial.last_result or {}).get("epoch")
        if not (self.max_epochs and (ending or trial.status == "TERMINATED") and isinstance(epoch, (int, float))
                and epoch < self.max_epochs):
            return False
        own = int((trial.config or {}).get("optim.patience", self.patience) or 0)
        history = [{"epoch": e, self.metric: v} for e, v in sorted(self.seen.get(trial.trial_id, {}).items())]
        return not (self.metric and self.mode in ("max", "min")
                    and patience_exhausted(history, self.metric, self.mode, own))

    def _eta(self, done: int) -> float:
        return (time.perf_counter() - self.t0) / self.ran_here * (self.total - done) if self.ran_here else float("nan")

    def _clear(self) -> None:
        if self.drawn:
            sys.stdout.write("\r\033[K")
            self.drawn = False

    def _line(self, trials, trial, outcome: str) -> None:
        self.ran_here += 1
        done = 1 + sum(t is not trial and t.status in FINISHED for t in trials)
        elapsed = time.perf_counter() - self.t0
        eta = self._eta(done)
        config = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in (trial.config or {}).items())
        self._clear()
        print(f"[xmr] {self.what} {done}/{self.total} {outcome}: {config}  "
              f"({elapsed / 60:.1f} min, ETA {eta / 60:.1f} min)", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        value = result.get(self.metric) if self.metric else None
        shown = f"{self.metric} {value:.4f}" if isinstance(value, float) else "done"
        if self._pruned(trial, ending=True):
            shown = f"pruned at epoch {int(result['epoch'])} ({shown})"
        self._line(trials, trial, shown)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trials, trial, "FAILED")

    def status_line(self, trials) -> str:
        running = sum(t.status == "RUNNING" for t in trials)
        done = sum(t.status in FINISHED for t in trials)
        pruned = sum(self._pruned(t) for t in trials)
        failed = sum(t.status == "ERROR" for t in trials)
        best = None
        if self.metric and self.mode in ("max", "min"):
            seen = [t.metric_analysis.get(self.metric, {}).get(self.mode) for t in trials]
            seen = [v for v in seen if isinstance(v, (int, float))]
            best = (max(seen) if self.mode == "max" else min(seen)) if seen else None
        elapsed = time.perf_counter() - self.t0
        eta = self._eta(done)
        parts = [f"{running} running", f"{done}/{self.total} done", f"{pruned} pruned"]
        if failed:
            parts.append(f"{failed} failed")
        if best is not None:
            parts.append(f"best {self.metric} {best:.4f}")
        parts.append(f"{elapsed / 60:.1f} min" + ("" if eta != eta else f", ETA {eta / 60:.1f} min"))
        return f"[xmr] {self.what}: " + ", ".join(parts)

    def on_step_end(self, iteration, trials, **info) -> None:
        if not self.status:
            return
        tty = sys.stdout.isatty()
        period = 1.0 if tty else self.every_s
        now = time.perf_counter()
        if period <= 0 or now - self.shown < period:
            return
        self.shown = now
        if tty:
            sys.stdout.write("\r\033[K" + self.status_line(trials))
            sys.stdout.flush()
            self.drawn = True
        else:
            print(self.status_line(trials), flush=True)

    def on_experiment_end(self, trials, **info) -> None:
        self._clear()
        sys.stdout.flush()


def progress_callback(total: int, metric: str | None, what: str, *, mode: str | None = None, status: bool = False,
                      max_epochs: int | None = None, patience: int = 0,
                      every_s: float = DEFAULT_PROGRESS_EVERY_S):
    """Tune's own trial tables replaced by one line per finished trial (``--verbose`` brings
    them back) and, with ``status``, a status line: trials running / done / pruned / failed,
    the best so far and an ETA. On a terminal the status line is redrawn in place every
    second; in a log (not a terminal) it is printed every ``every_s`` seconds (the runtime's
    ``progress_every_s``, ``XMR_PROGRESS_EVERY_S``; default 30; 0: never), so a long sweep
    says where it is without a line per epoch."""
    from ray.tune import Callback

    class Progress(TrialProgress, Callback):
        """Tune calls a ``Callback``; what it does is ``TrialProgress``'s (Ray imported only here)."""

    return Progress(total, metric, what, mode=mode, status=status, max_epochs=max_epochs, patience=patience,
                    every_s=every_s)


NOT_METRICS = {"epoch", "step", "samples_per_s", "train_s", "eval_s", "lr", "attempt", "num_workers", "num_nodes",
                "max_rss_mb", "n_no_relevant", "training_iteration", "time_this_iter_s", "time_total_s", "timestamp",
                "pid", "done", "iterations_since_restore", "time_since_restore"}


def read_trial_best(trials_root: str, endpoint_url: str | None = None) -> dict[str, dict[str, Any]]:
    """trial run name -> its best.json (checkpoint, metric, value, epoch)."""
    import pyarrow.fs as pafs

    fs, base = filesystem(trials_root, endpoint_url)
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        if info.type == pafs.FileType.Directory:
            name = info.base_name
            text = RunDir(trials_root, name, endpoint_url).read_text(BEST)
            if text:
                out[name] = json.loads(text)
    return out
