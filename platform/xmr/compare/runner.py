"""Run a comparison: tune every variant on the same candidates on validation, train every
(variant, seed) until validation stops improving (rerunning at a larger cap what peaked at
its cap), score each best-on-validation model on the test split, and judge every claimed
ordering by its paired differences (``run_comparison`` gives the protocol step by step).

Each run is a Ray Tune trial trained by the sweeps' runner (``xmr.tune.trials.run_trial``:
in the trial's process for one worker, a ``TorchTrainer`` for more), so a comparison
measures exactly what a sweep does. Every run is a run folder (checkpoints, ``best.json``)
with its result beside them, so a comparison rerun with the same storage keeps the runs
that finished.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from typing import Any

import pandas as pd

from xmr.compare.report import write_outputs
from xmr.compare.results import Comparison, metric_columns
from xmr.compare.spec import ComparisonSpec, Variant
from xmr.compare.stats import PairedDifference, holm, paired_difference, t_interval, verdict
from xmr.config import SpecError, from_dict, with_values
from xmr.tasks import family_of
from xmr.train.runfs import RunDir

RESULT = "result.json"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip("-") or "variant"


def ensure_dataset(dataset: dict[str, Any]) -> str:
    """The dataset's path; a missing synthetic dataset is generated from its ``synth`` recipe."""
    from xmr.data import storage

    path = dataset["path"]
    if storage.exists(storage.join(path, "manifest.json")):
        return path
    recipe = dict(dataset.get("synth") or {})
    if not recipe:
        raise FileNotFoundError(f"dataset {path!r} not found and the spec gives no synth recipe to build it")
    kind = recipe.pop("kind", "category")
    if kind == "category":
        from xmr.data.sources.synth_category import SynthCategoryConfig, write_synth_category

        write_synth_category(path, SynthCategoryConfig(**recipe), progress=False)
    elif kind == "vcmr":
        from xmr.data.sources.synth_vcmr import SynthVcmrConfig, write_synth_vcmr

        write_synth_vcmr(path, SynthVcmrConfig(**recipe), progress=False)
    else:
        raise ValueError(f"dataset.synth.kind = {kind!r}: use category or vcmr")
    return path


def _absolute(path: str) -> str:
    from xmr.data import storage

    return path if storage.is_s3(path) else os.path.abspath(path)


# --------------------------------------------------------------------------- one run


def train_and_score(cfg, pretrain, score_split: str) -> tuple[dict[str, Any], list[dict]]:
    """Train ``cfg`` (after ``pretrain``, if any) with the sweeps' runner (``run_trial``) and
    score its best-on-validation checkpoint on ``score_split``: (those metrics with the run's
    epochs and best epoch, its per-epoch history)."""
    import tempfile

    from xmr.checkpoint import fetch_checkpoint, save_checkpoint
    from xmr.method import evaluate_checkpoint
    from xmr.train.driver import prepare
    from xmr.train.fit import LocalHooks, fit
    from xmr.tune.trials import run_trial

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xmr-compare-") as tmp:
        extra: dict[str, Any] = {}
        if pretrain is not None:  # its own schedule; its best-on-validation weights start the run
            pre, _, _ = prepare(pretrain, run_name="pretrain")
            pre_run = fit(pre, LocalHooks(verbose=False), score_untrained=False, keep_best=True)
            # beside the run (a stable path: a resumed comparison relaunches the run with the same config)
            target = RunDir(cfg.storage.root, cfg.storage.run_name, cfg.data.endpoint_url).uri("pretrained")
            _store(save_checkpoint(f"{tmp}/pretrained", pre_run.method, pre), target)
            cfg.model.pretrained = target
            extra["pretrain_epochs"] = len(pre_run.history)
        result = run_trial(cfg, score_untrained=False, verbose=False, report=False)
        metrics = evaluate_checkpoint(str(fetch_checkpoint(result.run_uri, endpoint_url=cfg.data.endpoint_url)),
                                      score_split)
    trained = [row for row in result.history if row.get("epoch", 0) >= 1]
    return {**metrics, **extra, "best_epoch": (result.best or {}).get("epoch"), "epochs": len(trained),
            "wall_s": time.perf_counter() - t0, "finished_at": time.time()}, result.history


def _store(local, uri: str) -> None:
    import shutil

    from xmr.data import storage

    if storage.is_s3(uri):
        storage.upload_dir(str(local), uri, progress=False)
    else:
        shutil.copytree(local, uri, dirs_exist_ok=True)


def comparison_trial(config: dict[str, Any], jobs: dict[str, dict[str, Any]], runs_root: str) -> None:
    """One job of a comparison (a tuning trial or a seed run) as a Ray Tune trial; its
    metrics are reported once, at the end."""
    from ray import tune

    tune.report(_numbers(run_job(jobs[config["job"]], runs_root)))


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_job(job: dict[str, Any], runs_root: str) -> dict[str, Any]:
    """Train and score one job, or read its result when an earlier attempt finished it."""
    run = RunDir(runs_root, job["run"], job.get("endpoint_url"))
    done = run.read_text(RESULT)
    if done:  # finished in an earlier attempt of this comparison
        return json.loads(done)["metrics"]
    cfg = with_values(from_dict(job["config"]), job["values"])
    cfg.seed, cfg.storage.root, cfg.storage.run_name, cfg.storage.max_failures = job["seed"], runs_root, job["run"], 0
    pre = None
    if job.get("pretrain"):
        pre = from_dict(job["pretrain"])
        pre.seed, pre.storage.root = job["seed"], runs_root
    if job.get("tracking"):  # the job logs one MLflow run itself, under the spec's parent
        cfg.tracking.enabled = False
    metrics, history = train_and_score(cfg, pre, job["split"])
    if job.get("tracking"):
        from xmr.train.tracking import log_finished_run

        t = job["tracking"]
        log_finished_run(t["uri"], t["parent"], job["run"], {"variant": job["variant"], "seed": job["seed"],
                                                              "phase": job["phase"], "level": job["level"],
                                                              **job["values"]}, history, metrics, t["folder"])
    run.write_text(RESULT, json.dumps({"job": identity(job), "metrics": metrics}, indent=2, default=float))
    return metrics


def identity(job: dict[str, Any]) -> dict[str, Any]:
    """What makes a stored result this job's: its variant, seed, phase, level, tuned values,
    split and a digest of its configs (as JSON stores them)."""
    ident = {k: job[k] for k in ("variant", "seed", "phase", "level", "values", "split")}
    configs = json.dumps([job["config"], job.get("pretrain")], sort_keys=True, default=str)
    ident["config_sha256"] = hashlib.sha256(configs.encode()).hexdigest()
    return json.loads(json.dumps(ident, default=float))


def check_stored(jobs: dict[str, dict[str, Any]], runs_root: str) -> None:
    """A run folder's result is reused only if it is this job's: a comparison run again into
    the same storage with another tuning seed, ``--data`` or ``--set`` has jobs of the same
    names and other values, and would otherwise be handed the old runs' scores. Results
    written before the digest existed are compared on the fields they hold."""
    for job in jobs.values():
        done = RunDir(runs_root, job["run"], job.get("endpoint_url")).read_text(RESULT)
        if not done:
            continue
        stored, now = json.loads(done).get("job", {}), identity(job)
        differs = sorted(k for k in stored if k in now and stored[k] != now[k])
        if differs:
            raise SpecError(f"{runs_root}/{job['run']} holds a finished run of another comparison (it differs in "
                            f"{', '.join(differs)}: stored {[stored[k] for k in differs]}, now "
                            f"{[now[k] for k in differs if k != 'config_sha256'] or 'another config'}); "
                            "use another --storage, or delete that folder to train it again")


# --------------------------------------------------------------------------- the comparison


def busy_seconds(metrics: list[dict[str, Any]], fallback: float) -> float:
    """How long the comparison's runs took on the wall clock: the length of the union of the
    runs' [finished_at - wall_s, finished_at] intervals (concurrent runs count once). This is
    what the spec cost, however many invocations (resumes after an interruption) it took;
    the time of an invocation that only read finished results back would say nothing.
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



def _param_draws(p, n: int, seed: int) -> list[Any]:
    """``n`` draws of one parameter from Optuna's random sampler, seeded by the spec's tuning
    seed and the parameter itself (path and distribution), never by a variant's position: a
    parameter two variants share gets the same draws in both, whatever order the spec lists
    them in."""
    import hashlib

    import optuna

    key = f"{seed}|{p.path}|{p.kind}|{p.low}|{p.high}|{p.log}|{p.step}|{p.choices}"
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(
        seed=int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(p.suggest(trial))
        study.tell(trial, 0.0)
    return out


def tuning_candidates(spec: ComparisonSpec) -> dict[str, list[dict[str, Any]]]:
    """Each variant's ``tuning_trials`` candidates: candidate i takes draw i of every
    parameter the variant tunes (conditional parameters only where their condition holds).
    Variants that tune the same parameter are offered the same values of it, and a variant's
    own extra parameters are drawn on top, independently of where it stands in the spec
    (random search: with a budget this small a model-based sampler has nothing to model)."""
    from xmr.tune.report import optuna_logging_quiet

    optuna_logging_quiet()
    out: dict[str, list[dict[str, Any]]] = {}
    for name, v in spec.variants.items():
        if not v.tune or spec.tuning_trials == 0:
            out[name] = []
            continue
        columns = {p.path: _param_draws(p, spec.tuning_trials, spec.tuning_seed) for p in v.tune}
        candidates = []
        for i in range(spec.tuning_trials):
            sampled: dict[str, Any] = {}
            for p in v.tune:
                if p.active(sampled):
                    sampled[p.path] = columns[p.path][i]
            candidates.append(sampled)
        out[name] = candidates
    return out


def _job(spec: ComparisonSpec, v: Variant, *, phase: str, seed: int, values: dict, level: Any, data: str,
         split: str, run: str, tracking: dict | None = None, epochs: int | None = None) -> dict[str, Any]:
    cfg = v.config.to_dict()
    cfg["data"]["path"] = data
    if epochs is not None:
        cfg["optim"]["epochs"] = epochs
    pre = None
    if v.pretrain is not None:
        pre = v.pretrain.to_dict()
        pre["data"]["path"] = data
    return {"variant": v.name, "phase": phase, "seed": seed, "values": values, "level": level, "split": split,
            "config": cfg, "pretrain": pre, "run": run, "endpoint_url": v.config.data.endpoint_url,
            "tracking": tracking}


def _run_jobs(jobs: dict[str, dict[str, Any]], name: str, root: str, runs_root: str, concurrency: int,
              cfg, metric: str | None = None, verbose: bool = False) -> dict[str, dict[str, Any]]:
    """Every job as a Tune trial; {job id: metrics or {"error": ...}}."""
    from ray import tune

    from xmr.tune.trials import make_tuner

    if not jobs:
        return {}
    check_stored(jobs, runs_root)
    from xmr.tune.trials import trial_resources

    trainable = tune.with_parameters(comparison_trial, jobs=jobs, runs_root=runs_root)
    needs = {job_id: trial_resources(from_dict(job["config"])) for job_id, job in jobs.items()}
    grid = make_tuner(trainable, cfg, name, len(jobs), max_concurrent=concurrency, root=root, resume=False,
                      param_space={"job": tune.grid_search(sorted(jobs))}, what=name, max_failures=0,
                      resources=lambda config: needs[config["job"]],  # each job what its own variant needs
                      reuse_actors=True,  # one process per slot: no start-up (imports) per trial
                      verbose=verbose, progress_metric=metric).fit()
    out = {}
    for result in grid:
        job = result.config["job"]
        out[job] = ({"error": _error_text(result.error)} if result.error is not None
                    else {k: v for k, v in (result.metrics or {}).items() if not k.startswith(("time_", "training_"))})
    return out


def peaked_at_cap(metrics: dict[str, Any], cap: int) -> bool:
    """A finished run whose best validation epoch is the last one its cap allowed: it may
    still have been improving, so its score says more about the cap than about the variant."""
    best, epochs = metrics.get("best_epoch"), metrics.get("epochs")
    if "error" in metrics or best is None or epochs is None or math.isnan(float(best)):
        return False
    return int(best) >= int(epochs) >= cap


def _level_prefix(level: Any) -> str:
    return f"{slug(level)}-" if level is not None else ""


def run_comparison(spec: ComparisonSpec, root: str, concurrency: int = 0, address: str | None = None,
                   verbose: bool = False) -> Comparison:
    """Tune, train every seed, extend what peaked at its cap, judge. The protocol, step by step:

    1. **Tuning** (validation split, seed ``tuning_seed``): every variant trains each of its
       candidates (``tuning_candidates``: shared parameters offered the same values), at every
       level of a claim map (or only the middle one, ``tuning.at``); its chosen values at a
       level are its candidate with the best validation metric (the first of equals).
    2. **Seeds**: every (level, variant) trains each seed with its chosen values, early-stopped
       by validation, and its best-on-validation checkpoint is scored on ``split``.
    3. **Convergence**: a (level, variant) with early stopping any of whose seeds peaked at
       the epoch cap is rerun, every seed, at twice the cap, at most ``extend`` times; what
       still peaks there is reported "not converged", beside every verdict it enters.
       Variants without early stopping (``optim.patience = 0``, e.g. an equal-compute
       control) have a fixed budget by design and are never extended.
    4. **Verdicts**: paired differences by seed, Holm-adjusted across the spec's tests
       (``xmr.compare.stats``).
    """
    from xmr.data import storage
    from xmr.train.driver import ensure_ray

    levels = spec.map.levels if spec.map is not None else [None]
    # absolute local paths: trials run in working directories of their own
    data = {str(level): _absolute(ensure_dataset(spec.dataset_at(level))) for level in levels}
    first = next(iter(spec.variants.values())).config
    in_process = all(v.config.resources.num_workers == 1 for v in spec.variants.values())
    # In-process runs take their own cores: an embedded Ray gets as many CPUs as there are
    # cores, and never fewer than the largest run reserves (or it would never start).
    from xmr.tune.trials import trial_resources

    largest = max(trial_resources(v.config)["CPU"] for v in spec.variants.values())
    ensure_ray(address, num_cpus=int(max(os.cpu_count() or 1, math.ceil(largest))) if in_process else None,
               dashboard=not in_process)  # Ray Train's runs need the state API; in-process runs do not
    import ray

    limit = concurrency or max(1, int(float(ray.cluster_resources().get("CPU", 1))))
    root = _absolute(root)
    out = RunDir(root, spec.name)
    runs_root = out.uri("runs")
    experiments = storage.join(root, spec.name)
    t0 = time.perf_counter()
    from xmr.train.tracking import start_parent

    parent, uri = start_parent(first, out.uri(), spec.name, {"claim": spec.claim, "seeds": len(spec.seeds),
                                                            "tuning_trials": spec.tuning_trials})
    tracking = {"uri": uri, "parent": parent, "folder": out.uri()} if parent else None

    # 1. tuning
    candidates = tuning_candidates(spec)
    tune_jobs = {}
    for level in spec.tuning_levels():
        for n, cands in candidates.items():
            for i, values in enumerate(cands):
                run = f"tune-{_level_prefix(level)}{slug(n)}-{i:02d}"
                tune_jobs[run] = _job(spec, spec.variants[n], phase="tune", seed=spec.tuning_seed, values=values,
                                      level=level, data=data[str(level)], split=first.data.val_split, run=run,
                                      tracking=tracking)
    val_metric = first.storage.checkpoint_metric or family_of(first).main_metric
    tuned = _run_jobs(tune_jobs, f"{spec.name}-tuning", experiments, runs_root, limit, first, val_metric, verbose)
    tuning_rows, chosen_at = [], {}
    for level in spec.tuning_levels():
        for name, v in spec.variants.items():
            metric = v.config.storage.checkpoint_metric or family_of(v.config).main_metric
            sign = -1 if v.config.storage.checkpoint_mode == "min" else 1
            best = None
            for job_id, job in tune_jobs.items():
                if job["variant"] != name or str(job["level"]) != str(level):
                    continue
                m = tuned.get(job_id, {})
                value = m.get(metric, math.nan)  # the validation metric of the best epoch
                tuning_rows.append({"level": level, "variant": name, "trial": job_id, **job["values"],
                                    f"val_{metric}": value, "epochs": m.get("epochs"), "best_epoch": m.get("best_epoch"),
                                    "peaked_at_cap": peaked_at_cap(m, v.config.optim.epochs), "error": m.get("error")})
                if not math.isnan(value) and (best is None or sign * value > sign * best[0]):
                    best = (value, job["values"])
            chosen_at[(str(level), name)] = best[1] if best else {}

    def chosen(level: Any, name: str) -> dict[str, Any]:
        return chosen_at.get((str(level), name), chosen_at.get((str(spec.middle_level), name), {}))

    # 2. seeds, 3. extended while they peak at their cap
    caps = {(str(level), n): v.config.optim.epochs for level in levels for n, v in spec.variants.items()}
    extended = {key: 0 for key in caps}
    final: dict[tuple[str, str, int], tuple[str, dict[str, Any]]] = {}  # (level, variant, seed) -> its job
    results: dict[str, dict[str, Any]] = {}
    todo = set(caps)
    for round_ in range(spec.extend + 1):
        jobs = {}
        for level in levels:
            for n, v in spec.variants.items():
                key = (str(level), n)
                if key not in todo:
                    continue
                cap, base = caps[key], v.config.optim.epochs
                for s in spec.seeds:
                    run = f"{_level_prefix(level)}{slug(n)}-seed{s}" + (f"-cap{cap}" if cap != base else "")
                    jobs[run] = _job(spec, v, phase="seed", seed=s, values=chosen(level, n), level=level,
                                     data=data[str(level)], split=spec.split, run=run, tracking=tracking, epochs=cap)
                    final[(str(level), n, s)] = (run, jobs[run])
        results.update(_run_jobs(jobs, f"{spec.name}-seeds" + (f"-extended{round_}" if round_ else ""), experiments,
                                 runs_root, limit, first, spec.metric, verbose))
        todo = {key for key in todo if spec.variants[key[1]].config.optim.patience > 0
                and any(peaked_at_cap(results.get(final[(*key, s)][0], {}), caps[key]) for s in spec.seeds)}
        if not todo or round_ == spec.extend:
            break
        for key in todo:
            print(f"[xmr] {spec.name}: {key[1]}" + (f" at {key[0]}" if spec.map else "")
                  + f" peaked at its {caps[key]}-epoch cap: every seed again at {2 * caps[key]}", flush=True)
            caps[key] *= 2
            extended[key] += 1
    wall = busy_seconds([*tuned.values(), *results.values()], fallback=time.perf_counter() - t0)
    rows = []
    for (level_key, name, s), (job_id, job) in final.items():
        m = results.get(job_id, {"error": "not run"})
        cap = caps[(level_key, name)]
        row = {"level": job["level"], "variant": name, "seed": s, "status": "failed" if "error" in m else "ok",
               "error": m.get("error"), "cap": cap, "extended": extended[(level_key, name)],
               "peaked_at_cap": peaked_at_cap(m, cap) and spec.variants[name].config.optim.patience > 0}
        if "error" not in m:
            row.update(m)
        rows.append(row)
    runs = pd.DataFrame(rows)
    summary = summarise(spec, runs)
    claims = judge(spec, runs)
    chosen_by_level = {n: {str(lv): chosen(lv, n) for lv in levels} if spec.map else chosen(None, n)
                       for n in spec.variants}
    c = Comparison(spec, runs, pd.DataFrame(tuning_rows), chosen_by_level, summary, claims, wall, out.uri(),
                   notes=_notes(spec, data))
    write_outputs(c, out)
    return c


def _notes(spec: ComparisonSpec, data: dict[str, str]) -> dict[str, Any]:
    """Facts a reader needs to read the claims: how many in-batch negatives an anchor really
    has (category data), the sizes of the splits."""
    from xmr.data.manifest import load_manifest

    notes: dict[str, Any] = {}
    path = next(iter(data.values()))
    manifest = load_manifest(path)
    notes["splits"] = {s: (info.num_queries if info.num_queries is not None else info.num_samples)
                       for s, info in manifest.splits.items()}
    first = next(iter(spec.variants.values())).config
    if manifest.task == "category" and first.task == "category":
        notes["in_batch_negatives"] = in_batch_negatives(first, path)
    return notes


def in_batch_negatives(cfg, path: str, batches: int = 20) -> dict[str, float]:
    """Mean number of in-batch candidates per anchor (both modalities, all ranks' batch) that
    are negatives (another class) and positives (same class, not itself)."""
    import torch

    from xmr.data.reader import make_loader
    from xmr.tasks.category import CategoryFamily
    from xmr.losses._pairs import relevant

    loader = make_loader(path, cfg.data.train_split, local_batch_size=cfg.data.batch_size, seed=0)
    negs, poss = [], []
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        y = CategoryFamily().targets(batch)
        yy = torch.cat([y, y])
        rel = relevant(yy, yy)
        negs.append(float((~rel).sum(dim=1).float().mean()))
        poss.append(float(rel.sum(dim=1).float().mean()) - 1)
    return {"batch": cfg.data.batch_size, "candidates": 2 * cfg.data.batch_size - 1,
            "negatives": sum(negs) / len(negs), "positives": sum(poss) / len(poss)}


def _error_text(error: BaseException) -> str:
    """The root cause's last line (Tune wraps the trial's exception)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if "Error" in line or "Exception" in line), lines[-1] if lines else "")
    return f"{type(error).__name__}: {cause.strip()}"[:400]


def summarise(spec: ComparisonSpec, runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    levels = spec.map.levels if spec.map is not None else [None]
    for level in levels:
        at = runs[runs["level"].astype(str) == str(level)] if level is not None else runs
        for name in spec.variants:
            mine = at[at["variant"] == name]
            sub, failed = mine[mine["status"] == "ok"], mine[mine["status"] == "failed"]
            row: dict[str, Any] = {"level": level, "variant": name, "n_ok": len(sub), "n_failed": len(failed),
                                   "error": failed["error"].iloc[0] if len(failed) else None,
                                   "cap": int(mine["cap"].max()) if len(mine) else None,
                                   "extended": int(mine["extended"].max()) if len(mine) else 0,
                                   "n_peaked_at_cap": int(mine["peaked_at_cap"].sum()) if len(mine) else 0}
            for col in ("epochs", "best_epoch"):
                vals = sub[col].dropna() if col in sub else pd.Series([], dtype=float)
                row[f"{col}_min"] = int(vals.min()) if len(vals) else None
                row[f"{col}_max"] = int(vals.max()) if len(vals) else None
            for col in metric_columns(runs):
                mean, std, low, high = t_interval(sub[col].tolist()) if col in sub else (math.nan,) * 4
                row.update({f"{col}_mean": mean, f"{col}_std": std, f"{col}_ci_low": low, f"{col}_ci_high": high})
            rows.append(row)
    return pd.DataFrame(rows)


def judge(spec: ComparisonSpec, runs: pd.DataFrame) -> list[dict[str, Any]]:
    """Every claim at every level: the mean paired (by seed) difference of the main metric,
    its 95% interval, its p-value raw and Holm-adjusted across the spec's tests, the verdict,
    and whether both sides' runs converged (none peaked at its cap)."""
    out = []
    levels = spec.map.levels if spec.map is not None else [None]
    m = spec.metric
    for level in levels:
        here = runs if level is None else runs[runs["level"].astype(str) == str(level)]
        at = here[here["status"] == "ok"]
        for left, op, right in spec.claims:
            values = {}
            for name in (left, right):
                sub = at[at["variant"] == name]
                values[name] = dict(zip(sub["seed"].astype(int), sub[m].astype(float))) if m in sub else {}
            diff = paired_difference(values[left], values[right])
            capped = sorted(n for n in (left, right) if here[here["variant"] == n]["peaked_at_cap"].any())
            out.append({"claim": f"{left} {op} {right}", "level": level, "metric": m, **diff.to_dict(),
                        "left": float(pd.Series(values[left]).mean()) if values[left] else math.nan,
                        "right": float(pd.Series(values[right]).mean()) if values[right] else math.nan,
                        "not_converged": ", ".join(capped)})
    adjusted = holm([cl["p"] for cl in out])
    for cl, p_holm in zip(out, adjusted):
        op = ">" if " > " in cl["claim"] else "<"
        cl["p_holm"] = p_holm
        cl["margin"] = spec.equivalence_margin
        cl["verdict"] = verdict(PairedDifference(cl["n"], cl["mean"], cl["sd"], cl["low"], cl["high"], cl["p"],
                                                 cl["seeds"]), op, p_holm, spec.equivalence_margin)
    return out
