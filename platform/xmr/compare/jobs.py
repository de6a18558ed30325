"""The jobs of a comparison and how they run: a **tune** job trains one candidate of one
variant in one replicate (training seed r) and reports its best validation score; a
**score** job scores a replicate's chosen run (its best-on-validation checkpoint) on the
test split. Test data are read by score jobs only, and only for chosen runs.

Each job is a Ray Tune trial trained by the sweeps' runner (``xmr.tune.trials.run_trial``:
in the trial's process for one worker, a ``TorchTrainer`` for more), so a comparison
measures exactly what a sweep does. Every job is a run folder with its ``result.json``, so
a comparison rerun with the same storage keeps the jobs that finished (and refuses a stored
result that is another job's: ``check_stored``). With successive halving
(``xmr.compare.halving``) a candidate's run folder also holds a ``rung-<epochs>.json`` per
rung it paused at: a **rung** job trains the run up to that epoch (resuming it from its
folder after the first rung), so a rerun keeps the rungs that finished too.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from typing import Any

from xmr.config import SpecError, from_dict, set_values
from xmr.progress_line import progress_every
from xmr.runtime import Runtime
from xmr.train.runfs import RunDir

RESULT = "result.json"
PRETRAINED = "pretrain.json"  # a run's finished pre-training: (its epochs) a later rung reuses it


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip("-") or "variant"


def last_gain(history: list[dict[str, Any]], metric: str, mode: str) -> float:
    """How much the last trained epoch's validation ``metric`` beat every earlier epoch's (in
    the metric's direction; negative when it did not); +inf with one epoch (nothing to
    compare: it may still be improving)."""
    values = [float(r[metric]) for r in history if r.get("epoch", 0) >= 1 and isinstance(r.get(metric), (int, float))]
    values = [v for v in values if not math.isnan(v)]
    if len(values) < 2:
        return math.inf
    sign = -1.0 if mode == "min" else 1.0
    return sign * (values[-1] - (min(values[:-1]) if mode == "min" else max(values[:-1])))


def train_candidate(cfg, pretrain, runtime: Runtime | None = None,
                    until: int | None = None) -> tuple[dict[str, Any], list[dict]]:
    """Train ``cfg`` (after ``pretrain``, if any) with the sweeps' runner: (its best validation
    score, epochs run, best epoch and the last epoch's gain (``last_gain``); its history).

    ``until``: a rung of successive halving (``xmr.compare.halving``): the run pauses after
    that epoch, its checkpoint kept in its run folder, and is scored on the epochs up to it;
    a later rung, or the run to the cap, resumes it there (same config, so the same schedule,
    decaying over the cap). Its pre-training runs once, before its first epoch."""
    from xmr.tasks import family_of
    from xmr.train.driver import read_run
    from xmr.train.step import best_epoch
    from xmr.tune.trials import run_trial

    t0 = time.perf_counter()
    extra = _pretrained(cfg, pretrain, runtime) if pretrain is not None else {}
    metric = cfg.storage.checkpoint_metric or family_of(cfg).main_metric
    mode = cfg.storage.checkpoint_mode
    try:
        result = run_trial(cfg, score_untrained=False, verbose=False, report=False, runtime=runtime,
                           hooks=_rung_hooks(until) if until else None)
    except RungReached:
        result = read_run(cfg, metric, mode)
    best = result.best or {}
    history = result.history
    if until:  # only what the rung allows, also where an earlier attempt trained past it
        history = [row for row in history if row.get("epoch", 0) <= until]
        epoch = best_epoch(history, metric, mode)
        best = {"value": next(r[metric] for r in history if r.get("epoch") == epoch), "epoch": epoch} if epoch else {}
    trained = [row for row in history if row.get("epoch", 0) >= 1]
    return {"val_score": float(best.get("value", math.nan)), **extra, "best_epoch": best.get("epoch"),
            "epochs": len(trained), "last_gain": last_gain(history, metric, mode),
            "wall_s": time.perf_counter() - t0, "finished_at": time.time()}, history


class RungReached(Exception):
    """A candidate paused at its rung (``train_candidate``'s ``until``): the epoch's checkpoint,
    ``metrics.csv`` and ``best.json`` are in its run folder, for the next rung to resume."""


def _rung_hooks(until: int):
    """The local hooks of a one-worker trial, pausing the run once epoch ``until`` is recorded
    (its MLflow run, if any, is closed first; a resumed run continues it)."""
    from xmr.train.fit import LocalHooks

    class RungHooks(LocalHooks):
        worker = None

        def report(self, w, row, directory, name) -> None:
            super().report(w, row, directory, name)
            self.worker = w

        def recorded(self, row: dict[str, Any]) -> None:
            if int(row.get("epoch", 0)) >= until:
                if self.worker is not None:
                    self.worker.tracker.finish()
                raise RungReached(f"paused after epoch {row.get('epoch')} (rung {until})")

    return RungHooks(verbose=False)


def _pretrained(cfg, pretrain, runtime: Runtime | None) -> dict[str, Any]:
    """Pre-train once, beside the run (a stable path: a resumed comparison, or a later rung,
    relaunches the run with the same config) and start the run from its best-on-validation
    weights; a run whose pre-training finished (``PRETRAINED`` in its folder) reuses it."""
    import tempfile

    from xmr.checkpoint import save_checkpoint
    from xmr.train.driver import prepare
    from xmr.train.fit import LocalHooks, fit

    run = RunDir(cfg.storage.root, cfg.storage.run_name, cfg.data.endpoint_url)
    target = run.uri("pretrained")
    done = run.read_text(PRETRAINED)
    if not done:
        with tempfile.TemporaryDirectory(prefix="xmr-compare-") as tmp:
            pre, _, _ = prepare(pretrain, run_name="pretrain")
            pre_run = fit(pre, LocalHooks(verbose=False), score_untrained=False, keep_best=True, runtime=runtime)
            _store(save_checkpoint(f"{tmp}/pretrained", pre_run.method, pre), target)
        done = json.dumps({"pretrain_epochs": len(pre_run.history)})
        run.write_text(PRETRAINED, done)
    cfg.model.pretrained = target
    return json.loads(done)


def score_chosen(job: dict[str, Any], runs_root: str, runtime: Runtime | None = None) -> dict[str, Any]:
    """The test metrics of a chosen run's best-on-validation checkpoint."""
    from xmr.checkpoint import fetch_checkpoint
    from xmr.method import evaluate_checkpoint

    t0 = time.perf_counter()
    uri = RunDir(runs_root, job["of"], job.get("endpoint_url")).uri()
    local = fetch_checkpoint(uri, endpoint_url=job.get("endpoint_url"), cache_dir=(runtime or Runtime()).cache)
    with progress_every((runtime or Runtime()).progress_every_s):
        metrics = evaluate_checkpoint(str(local), job["split"])
    return {**metrics, "wall_s": time.perf_counter() - t0, "finished_at": time.time()}


def _store(local, uri: str) -> None:
    import shutil

    from xmr.data import storage

    if storage.is_s3(uri):
        storage.upload_dir(str(local), uri, progress=False)
    else:
        shutil.copytree(local, uri, dirs_exist_ok=True)


def comparison_trial(config: dict[str, Any], jobs: dict[str, dict[str, Any]], runs_root: str,
                     runtime: dict[str, Any] | None = None) -> None:
    """One job of a comparison as a Ray Tune trial; its metrics are reported once, at the end.
    ``runtime``: the comparison's ``Runtime.to_dict()``."""
    from ray import tune

    tune.report(_numbers(run_job(jobs[config["job"]], runs_root, Runtime.from_dict(runtime))))


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_job(job: dict[str, Any], runs_root: str, runtime: Runtime | None = None) -> dict[str, Any]:
    """Run one job, or read its result when an earlier attempt finished it."""
    run = RunDir(runs_root, job["run"], job.get("endpoint_url"))
    done = run.read_text(result_file(job))
    if done:  # finished in an earlier attempt of this comparison
        return json.loads(done)["metrics"]
    if job["phase"] == "score":
        metrics = score_chosen(job, runs_root, runtime)
    else:
        cfg = from_dict(set_values(job["config"], job["values"]))  # typed once; checked once, by run_trial
        cfg.seed, cfg.storage.root, cfg.storage.run_name, cfg.storage.max_failures = job["seed"], runs_root, job["run"], 0
        pre = None
        if job.get("pretrain"):
            pre = from_dict(job["pretrain"])
            pre.seed, pre.storage.root = job["seed"], runs_root
        if job.get("tracking"):  # the job logs one MLflow run itself, under the spec's parent
            cfg.tracking.enabled = False
        metrics, history = train_candidate(cfg, pre, runtime, job.get("until"))
        if job.get("tracking"):
            from xmr.train.tracking import log_finished_run

            t = job["tracking"]
            name = job["run"] + (f"@e{job['until']}" if job.get("until") else "")  # each rung its own entry
            log_finished_run(t["uri"], t["parent"], name, {"variant": job["variant"], "seed": job["seed"],
                                                                  "phase": job["phase"], "level": job["level"],
                                                                  **job["values"]}, history, metrics, t["folder"],
                             runtime)
    run.write_text(result_file(job), json.dumps({"job": identity(job), "metrics": metrics}, indent=2, default=float))
    return metrics


def result_file(job: dict[str, Any]) -> str:
    """Where a job's finished result is kept in its run folder: ``result.json``, or for a rung
    of successive halving (a paused run the next rung resumes) ``rung-<epochs>.json``."""
    return f"rung-{job['until']}.json" if job.get("until") else RESULT


def identity(job: dict[str, Any]) -> dict[str, Any]:
    """What makes a stored result this job's: its variant, seed, phase, level, tuned values,
    split, the run it scores, the rung it paused at (none for a run to its cap, so results
    stored before halving still match) and a digest of its configs (as JSON stores them)."""
    ident = {k: job[k] for k in ("variant", "seed", "phase", "level", "values", "split")}
    for key in ("of", "until"):
        if job.get(key):
            ident[key] = job[key]
    configs = json.dumps([job["config"], job.get("pretrain")], sort_keys=True, default=str)
    ident["config_sha256"] = hashlib.sha256(configs.encode()).hexdigest()
    return json.loads(json.dumps(ident, default=float))


def check_stored(jobs: dict[str, dict[str, Any]], runs_root: str) -> None:
    """A run folder's result is reused only if it is this job's: a comparison run again into
    the same storage with another tuning seed, ``--data`` or ``--set`` has jobs of the same
    names and other values, and would otherwise be handed the old runs' scores."""
    for job in jobs.values():
        done = RunDir(runs_root, job["run"], job.get("endpoint_url")).read_text(result_file(job))
        if not done:
            continue
        stored, now = json.loads(done).get("job", {}), identity(job)
        differs = sorted(k for k in stored if k in now and stored[k] != now[k])
        if differs:
            raise SpecError(f"{runs_root}/{job['run']} holds a finished run of another comparison (it differs in "
                            f"{', '.join(differs)}: stored {[stored[k] for k in differs]}, now "
                            f"{[now[k] for k in differs if k != 'config_sha256'] or 'another config'}); "
                            "use another --storage, or delete that folder to train it again")


def run_jobs(jobs: dict[str, dict[str, Any]], name: str, root: str, runs_root: str, concurrency: int,
             cfg, metric: str | None = None, runtime: Runtime | None = None) -> dict[str, dict[str, Any]]:
    """Every job as a Tune trial; {job id: metrics or {"error": ...}}."""
    from functools import partial

    from ray import tune

    from xmr.tune.trials import fit_trials, trial_resources

    if not jobs:
        return {}
    check_stored(jobs, runs_root)
    needs = {job_id: trial_resources(from_dict(job["config"])) for job_id, job in jobs.items()}
    runtime = runtime or Runtime()
    grid = fit_trials(partial(comparison_trial, jobs=jobs, runs_root=runs_root, runtime=runtime.to_dict()), cfg, name,
                      len(jobs),
                      max_concurrent=concurrency, root=root, resume=False,
                      param_space={"job": tune.grid_search(sorted(jobs))}, what=name, max_failures=0,
                      resources=lambda config: needs[config["job"]],  # each job what its own variant needs
                      reuse_actors=True,  # one process per slot: no start-up (imports) per trial
                      verbose=runtime.verbose, progress_metric=metric, progress_every_s=runtime.progress_every_s)
    out = {}
    for result in grid:
        job = result.config["job"]
        out[job] = ({"error": _error_text(result.error)} if result.error is not None
                    else {k: v for k, v in (result.metrics or {}).items() if not k.startswith(("time_", "training_"))})
    return out


def _error_text(error: BaseException) -> str:
    """The root cause's last line (Tune wraps the trial's exception)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if "Error" in line or "Exception" in line), lines[-1] if lines else "")
    return f"{type(error).__name__}: {cause.strip()}"[:400]


def busy_seconds(metrics: list[dict[str, Any]], fallback: float) -> float:
    """How long the comparison's runs took on the wall clock: the length of the union of the
    runs' [finished_at - wall_s, finished_at] intervals (concurrent runs count once). This is
    what the spec cost, however many invocations (resumes after an interruption) it took;
    ``fallback`` (this invocation's time) when a run lacks its interval."""
    spans = []
    for m in metrics:
        end, wall = m.get("finished_at"), m.get("wall_s")
        if end is None or wall is None:
            if "error" in m:
                continue  # a failed run has no interval; it does not make the others unknown
            return fallback
        spans.append((float(end) - float(wall), float(end)))
    total, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total if spans else fallback
