"""Run a comparison: in every replicate r, every variant tunes on its own fresh draw of
candidates (the same draw for every variant of the claim), each candidate trained with
training seed r until validation stops improving; the candidate with the best validation
score is replicate r's run, and its best-on-validation checkpoint is scored on the test
split. The paired difference of replicate r then carries both sources of variation a rerun
would change, the training seed and the tuning draw, and the interval over replicates
covers them (``run_comparison`` gives the protocol step by step).

Why not tune once and reuse the choice for every seed: the seeds then share one tuning
choice, the interval measures training-seed noise only, and another tuning draw moved 9 of
27 estimates outside their own intervals (``git show 4f95c13:bench/results/compare_reseed.json``,
stop 32).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from xmr.compare.draws import candidates, edge_side, widened
from xmr.compare.halving import Halving, successive_halving
from xmr.compare.jobs import busy_seconds, run_jobs, slug
from xmr.compare.judge import judge, summarise, trends
from xmr.compare.report import write_outputs
from xmr.compare.results import Comparison
from xmr.compare.spec import ComparisonSpec, Variant
from xmr.config import ConfigError, with_values
from xmr.checks import check
from xmr.runtime import Runtime
from xmr.tasks import family_of
from xmr.train.runfs import RunDir
from xmr.tune.space import Param


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
    elif kind == "digits_views":  # real images (sklearn's digits), cut into two views: nothing generated
        from xmr.data.sources.digits_views import DigitsViewsConfig, write_digits_views

        write_digits_views(path, DigitsViewsConfig(**recipe), progress=False)
    else:
        raise ValueError(f"dataset.synth.kind = {kind!r}: use category, vcmr or digits_views")
    return path


def _absolute(path: str) -> str:
    from xmr.data import storage

    return path if storage.is_s3(path) else os.path.abspath(path)


def peaked_at_cap(metrics: dict[str, Any], cap: int, min_gain: float = 0.0) -> bool:
    """A finished run whose best validation epoch is the last its cap allowed *and* whose
    last epoch beat every earlier one by at least ``min_gain``: it was still improving, so
    its score says more about the cap than about the variant. A tie at a flat end of
    training is not "still improving"."""
    best, epochs = metrics.get("best_epoch"), metrics.get("epochs")
    if "error" in metrics or best is None or epochs is None or math.isnan(float(best)):
        return False
    gain = float(metrics.get("last_gain", math.inf))
    return int(best) >= int(epochs) >= cap and gain >= min_gain


@dataclass
class LevelPlan:
    """One level's state across rounds: the epoch cap every early-stopped variant shares,
    the tuned ranges (widened where the winners sat at an edge), and what was done."""

    level: Any
    cap: int | None
    ranges: dict[str, Param]
    round: int = 0
    doubled: int = 0
    widened: dict[str, list[str]] = field(default_factory=dict)  # path -> sides widened, in order
    flags: list[str] = field(default_factory=list)  # what could not be fixed, for the page

    @property
    def key(self) -> str:
        return str(self.level)


def _level_prefix(level: Any) -> str:
    return f"{slug(level)}-" if level is not None else ""


def _epochs(spec: ComparisonSpec, v: Variant, plan: LevelPlan) -> int:
    """The epoch cap of ``v`` at this level: the level's shared cap for every early-stopped
    variant; a fixed-budget control (``optim.patience = 0``, e.g. equal compute) keeps its
    own budget, grown by as many epochs as the shared cap has grown (its budget is stated
    as the others' cap plus something)."""
    own = v.config.optim.epochs
    if plan.cap is None:
        return own
    if v.config.optim.patience > 0:
        return plan.cap
    return own + (plan.cap - (spec.max_epochs or plan.cap))


def _job(spec: ComparisonSpec, v: Variant, plan: LevelPlan, *, r: int, i: int, values: dict, data: str,
         tracking: dict | None) -> tuple[str, dict[str, Any]]:
    cfg = v.config.to_dict()
    cfg["data"]["path"] = data
    cfg["optim"]["epochs"] = _epochs(spec, v, plan)
    pre = None
    if v.pretrain is not None:
        pre = v.pretrain.to_dict()
        pre["data"]["path"] = data
    run = f"{_level_prefix(plan.level)}{slug(v.name)}-r{r}-c{i}" + (f"-round{plan.round}" if plan.round else "")
    return run, {"variant": v.name, "phase": "tune", "seed": r, "candidate": i, "values": values,
                 "level": plan.level, "split": v.config.data.val_split, "config": cfg, "pretrain": pre, "run": run,
                 "endpoint_url": v.config.data.endpoint_url, "tracking": tracking, "round": plan.round}


def round_jobs(spec: ComparisonSpec, plan: LevelPlan, data: str, tracking: dict | None) -> dict[str, dict]:
    """Every (replicate, variant, candidate) of one level's round. Candidates come from the
    variant's tuning seed (the spec's unless the variant names its own) and the level's
    current ranges; a variant's own parameters are drawn on top of the shared ones."""
    jobs = {}
    for r in spec.seeds:
        for v in spec.variants.values():
            params = [plan.ranges.get(p.path, p) for p in v.tune]
            for i, values in enumerate(candidates(params, v.paper, spec.tuning_trials, spec.tuning_seed_of(v.name), r)):
                run, job = _job(spec, v, plan, r=r, i=i, values=values, data=data, tracking=tracking)
                jobs[run] = job
    return jobs


def trained_epochs(jobs: dict[str, dict], results: dict[str, dict]) -> int:
    """Epochs the tuning trained, every candidate run counted once at the furthest epoch it
    reached (a run resumed at a later rung counts its earlier epochs once; pre-training apart)."""
    reached: dict[str, int] = {}
    for job_id, job in jobs.items():
        epochs = results.get(job_id, {}).get("epochs")
        if isinstance(epochs, (int, float)) and not math.isnan(epochs):
            reached[job["run"]] = max(reached.get(job["run"], 0), int(epochs))
    return sum(reached.values())


def _sign(v: Variant) -> float:
    return -1.0 if v.config.storage.checkpoint_mode == "min" else 1.0


def halving_of(spec: ComparisonSpec, quiet: bool = False) -> Halving | None:
    """The spec's successive halving, or None where a variant trains on several workers (a
    rung pauses a run in its trial's process; a Ray Train worker group is not paused there):
    then every candidate of every variant trains to the cap, alike."""
    if spec.halving is not None and any(v.config.resources.num_workers > 1 for v in spec.variants.values()):
        if not quiet:
            print(f"[xmr] {spec.name}: a variant trains on several workers: no successive halving, every candidate "
                  "trains to the cap", flush=True)
        return None
    return spec.halving


def winners(spec: ComparisonSpec, jobs: dict[str, dict], results: dict[str, dict]) -> dict[tuple[int, str], str]:
    """(replicate, variant) -> the job of its best validation score (the first of equals, in
    candidate order); a (replicate, variant) whose candidates all failed has none."""
    best: dict[tuple[int, str], tuple[float, str]] = {}
    for run, job in jobs.items():
        sign = _sign(spec.variants[job["variant"]])
        value = float(results.get(run, {}).get("val_score", math.nan))
        key = (job["seed"], job["variant"])
        if not math.isnan(value) and (key not in best or sign * value > sign * best[key][0]):
            best[key] = (value, run)
    return {key: run for key, (_, run) in best.items()}


def _valid_everywhere(spec: ComparisonSpec, p: Param) -> bool:
    """Every variant that tunes ``p`` accepts both of its bounds."""
    for v in spec.variants.values():
        if any(q.path == p.path for q in v.tune):
            for value in (p.low, p.high):
                try:
                    check(with_values(v.config, {p.path: int(value) if p.kind == "int" else value}))
                except ConfigError:
                    return False
    return True


def _widen_edges(spec: ComparisonSpec, plan: LevelPlan, jobs: dict, chosen: dict) -> bool:
    """Widen every range whose winners (pooled over the variants that tune it) chose its
    extreme candidate in most replicates; True when a range changed. Where it may not widen
    again, or the wider range is not a valid config, the page is told instead."""
    changed = False
    tuned = {p.path: p for v in spec.variants.values() for p in v.tune if p.kind != "categorical"}
    for path, p in tuned.items():
        pool = []
        for (r, name), run in chosen.items():
            offered = [j["values"][path] for j in jobs.values()
                       if j["seed"] == r and j["variant"] == name and path in j["values"]]
            if path in jobs[run]["values"] and len(offered) > 1:
                pool.append((jobs[run]["values"][path], offered))
        side = edge_side(pool)
        if not side:
            continue
        current = plan.ranges.get(path, p)
        wider = widened(current, side)
        if len(plan.widened.get(path, [])) < spec.widen and _valid_everywhere(spec, wider):
            plan.ranges[path] = wider
            plan.widened.setdefault(path, []).append(side)
            changed = True
            print(f"[xmr] {spec.name}{_at(spec, plan)}: {path} chosen at the {side} edge of "
                  f"[{current.low:.4g}, {current.high:.4g}] in most replicates: tuning again over "
                  f"[{wider.low:.4g}, {wider.high:.4g}]", flush=True)
        else:
            plan.flags.append(f"`{path}` at the {side} edge of its range [{current.low:.4g}, {current.high:.4g}]")
    return changed


def _at(spec: ComparisonSpec, plan: LevelPlan) -> str:
    return f" at {spec.map.label} = {plan.level}" if spec.map is not None else ""


def _extend_cap(spec: ComparisonSpec, plan: LevelPlan, chosen: dict, results: dict) -> bool:
    """Double the level's shared cap (every early-stopped variant, retuned: the schedule
    decays over the cap) when a chosen run was still improving at it; True when it did."""
    if plan.cap is None:
        return False
    still = sorted({name for (_, name), run in chosen.items() if spec.variants[name].config.optim.patience > 0
                    and peaked_at_cap(results.get(run, {}), plan.cap, spec.min_gain)})
    if not still:
        return False
    if plan.doubled >= spec.extend:
        plan.flags.append(f"not converged at the {plan.cap}-epoch cap: {', '.join(still)}")
        return False
    print(f"[xmr] {spec.name}{_at(spec, plan)}: {', '.join(still)} still improving at the {plan.cap}-epoch cap: "
          f"every variant tuned again at {2 * plan.cap}", flush=True)
    plan.cap *= 2
    plan.doubled += 1
    return True


def _setup(spec: ComparisonSpec, root: str, concurrency: int, address: str | None, runtime: Runtime):
    """Datasets (built where missing), the Ray session, how many jobs run at once, and the
    comparison's folders."""
    from xmr.ray.session import ensure_ray
    from xmr.tune.trials import trial_resources

    # absolute local paths: trials run in working directories of their own
    data = {str(level): _absolute(ensure_dataset(spec.dataset_at(level))) for level in spec.levels}
    in_process = all(v.config.resources.num_workers == 1 for v in spec.variants.values())
    # In-process runs take their own cores (compute-bound: one logical CPU per core, never
    # fewer than the largest run reserves)
    largest = max(trial_resources(v.config)["CPU"] for v in spec.variants.values())
    ensure_ray(address, runtime=runtime, need_cpus=largest, compute_bound=in_process,
               dashboard=not in_process)  # Ray Train's runs need the state API; in-process runs do not
    import ray

    limit = concurrency or max(1, int(float(ray.cluster_resources().get("CPU", 1))))
    return data, limit, _absolute(root)


def run_comparison(spec: ComparisonSpec, root: str, concurrency: int = 0, address: str | None = None,
                   runtime: Runtime | None = None) -> Comparison:
    """Tune in every replicate, equalise budgets, bracket the ranges, score, judge:

    1. **Rounds** (validation split): at every level, for every replicate r and variant, the
       candidates of draw r (``xmr.compare.draws``) each train with seed r, by successive
       halving inside the (level, replicate, variant) group (``xmr.compare.halving``: all to
       the first rung, the best 1/eta on validation on to the next, the survivors to the
       cap); the best validation score among the survivors picks replicate r's run
       (``winners``). A round's halving finishes before anything below looks at it.
    2. **Budgets**: every early-stopped variant at a level shares one epoch cap; when a chosen
       run was still improving at it (its last epoch better by ``min_gain``), the whole level
       is tuned again at twice the cap (at most ``extend`` times), so both sides of every
       claim always ran the same cap and a schedule tuned for it. The new round's runs are new
       runs (a cosine over the new cap), halved again over the same rungs (those below the
       new cap); only a chosen run, which reached the cap, is judged "still improving".
    3. **Ranges**: a tuned parameter whose winners chose its extreme candidate in most
       replicates is widened on that side, for every variant, and the level tuned again (at
       most ``widen`` times); what stays at an edge or unconverged is said beside the verdicts.
       Both look at the same finished round (cap first, then ranges): a level rerun for either
       reruns with both changes, as one new round.
    4. **Scoring**: each replicate's chosen run is scored on ``split`` (test data touch
       nothing else); 5. **verdicts** (``xmr.compare.judge``).
    """
    from xmr.train.tracking import start_parent

    runtime = runtime or Runtime()
    data, limit, root = _setup(spec, root, concurrency, address, runtime)
    first = next(iter(spec.variants.values())).config
    out = RunDir(root, spec.name)
    runs_root, experiments = out.uri("runs"), out.uri()
    parent, uri = start_parent(first, out.uri(), spec.name, {"claim": spec.claim, "seeds": len(spec.seeds),
                                                            "tuning_trials": spec.tuning_trials}, runtime)
    tracking = {"uri": uri, "parent": parent, "folder": out.uri()} if parent else None
    t0 = time.perf_counter()
    plans = {str(lv): LevelPlan(lv, spec.max_epochs, {}) for lv in spec.levels}
    jobs, results, final = _tune_rounds(spec, plans, data, tracking, experiments, runs_root, limit, runtime)
    scored = _score(spec, final, jobs, experiments, runs_root, limit, runtime)
    wall = busy_seconds([*results.values(), *scored.values()], fallback=time.perf_counter() - t0)
    runs = _run_rows(spec, plans, final, jobs, results, scored)
    tuning = _tuning_rows(spec, jobs, results, final)
    chosen = {n: {key: [jobs[final[key][(r, n)]]["values"] if (r, n) in final[key] else None for r in spec.seeds]
                  for key in plans} for n in spec.variants}
    if spec.map is None:
        chosen = {n: by_level["None"] for n, by_level in chosen.items()}
    notes = _notes(spec, data)
    notes["levels"] = {key: {"cap": p.cap, "doubled": p.doubled, "widened": p.widened, "flags": p.flags,
                             "ranges": {k: [q.low, q.high] for k, q in p.ranges.items()}} for key, p in plans.items()}
    halving = halving_of(spec, quiet=True)
    notes["halving"] = vars(halving) if halving else "off"
    notes["tuning_epochs"] = trained_epochs(jobs, results)
    c = Comparison(spec, runs, tuning, chosen, summarise(spec, runs), judge(spec, runs), wall, out.uri(),
                   notes=notes, trends=trends(spec, runs))
    write_outputs(c, out)
    return c


def _tune_rounds(spec, plans, data, tracking, experiments, runs_root, limit, runtime):
    """Rounds until no level changes its cap or ranges: (every job, every result, the final
    winners per level)."""
    all_jobs: dict[str, dict] = {}
    results: dict[str, dict] = {}
    final: dict[str, dict[tuple[int, str], str]] = {}
    todo = set(plans)
    first = next(iter(spec.variants.values())).config
    metric = "val_score"
    halving = halving_of(spec)
    while todo:
        jobs = {}
        for key in sorted(todo):
            level_jobs = round_jobs(spec, plans[key], data[key], tracking)
            jobs.update(level_jobs)
        rounds = sorted({plans[k].round for k in todo})
        name = f"{spec.name}-tuning" + "".join(f"-round{r}" for r in rounds if r)

        def stage(stage_jobs: dict, k: int, name: str = name) -> dict:
            return run_jobs(stage_jobs, name + (f"-stage{k}" if k else ""), experiments, runs_root, limit, first,
                            metric, runtime)

        ran, out = successive_halving(jobs, halving, stage, lambda job: _sign(spec.variants[job["variant"]]))
        results.update(out)
        all_jobs.update(ran)
        for key in sorted(todo):
            plan = plans[key]
            mine = {run: job for run, job in ran.items() if str(job["level"]) == key}
            # the chosen run is the best on validation among the candidates that reached the end
            final[key] = winners(spec, {run: job for run, job in mine.items() if not job.get("until")}, results)
            plan.flags = []  # what this round leaves unfixed (a later round decides again)
            longer = _extend_cap(spec, plan, final[key], results)
            wider = _widen_edges(spec, plan, mine, final[key])
            if longer or wider:
                plan.round += 1
            else:
                todo.discard(key)
    return all_jobs, results, final


def _score(spec, final, jobs, experiments, runs_root, limit, runtime) -> dict[str, dict]:
    """Each replicate's chosen run scored on the spec's split; {chosen run: test metrics}."""
    score_jobs = {}
    for chosen in final.values():
        for run in chosen.values():
            job = jobs[run]
            score_jobs[f"{run}-{spec.split}"] = {**job, "phase": "score", "split": spec.split, "of": run,
                                                 "run": f"{run}-{spec.split}", "tracking": None}
    first = next(iter(spec.variants.values())).config
    scored = run_jobs(score_jobs, f"{spec.name}-scoring", experiments, runs_root, limit, first, spec.metric, runtime)
    return {job["of"]: scored.get(sid, {"error": "not run"}) for sid, job in score_jobs.items()}


def _run_rows(spec, plans, final, jobs, results, scored) -> pd.DataFrame:
    """One row per (level, variant, replicate): the chosen candidate, its training, its test metrics."""
    rows = []
    for key, plan in plans.items():
        for name, v in spec.variants.items():
            for r in spec.seeds:
                run = final[key].get((r, name))
                m = results.get(run, {}) if run else {}
                test = scored.get(run, {"error": "every candidate failed"}) if run else {
                    "error": _first_error(jobs, results, key, name, r)}
                row = {"level": plan.level, "variant": name, "seed": r, "status": "failed" if "error" in test else "ok",
                       "error": test.get("error"), "cap": _epochs(spec, v, plan), "extended": plan.doubled,
                       "round": plan.round, "candidate": jobs[run]["candidate"] if run else None,
                       "val_score": m.get("val_score"), "best_epoch": m.get("best_epoch"), "epochs": m.get("epochs"),
                       "peaked_at_cap": bool(run) and v.config.optim.patience > 0
                       and peaked_at_cap(m, _epochs(spec, v, plan), spec.min_gain)}
                if "error" not in test:
                    row.update({k: val for k, val in test.items() if k not in ("wall_s", "finished_at")})
                    row["wall_s"] = float(m.get("wall_s", 0.0)) + float(test.get("wall_s", 0.0))
                rows.append(row)
    return pd.DataFrame(rows)


def _first_error(jobs, results, key, name, r) -> str:
    for run, job in jobs.items():
        if str(job["level"]) == key and job["variant"] == name and job["seed"] == r and "error" in results.get(run, {}):
            return results[run]["error"]
    return "not run"


def _tuning_rows(spec, jobs, results, final) -> pd.DataFrame:
    """One row per candidate run: its replicate, values, validation score, epochs, whether
    chosen, and ``dropped_at``: the rung of successive halving after which it stopped (its
    scores are then those at that rung; empty for a candidate that reached the end)."""
    picked = {run for chosen in final.values() for run in chosen.values()}
    furthest: dict[str, str] = {}  # run folder -> its last job: the one to the cap, else its latest rung
    for job_id, job in jobs.items():
        now = furthest.get(job["run"])
        if now is None or (jobs[now].get("until") or math.inf) < (job.get("until") or math.inf):
            furthest[job["run"]] = job_id
    rows = []
    for job_id in furthest.values():
        job, m = jobs[job_id], results.get(job_id, {})
        rows.append({"level": job["level"], "variant": job["variant"], "replicate": job["seed"],
                     "candidate": job["candidate"], "round": job["round"], "cap": job["config"]["optim"]["epochs"],
                     **job["values"], "val_score": m.get("val_score", math.nan), "epochs": m.get("epochs"),
                     "best_epoch": m.get("best_epoch"), "last_gain": m.get("last_gain"), "chosen": job_id in picked,
                     "dropped_at": job.get("until"), "error": m.get("error")})
    return pd.DataFrame(rows)


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


