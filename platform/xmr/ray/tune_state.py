"""Mend an interrupted Tune experiment's saved state before it is resumed.

Tune saves an experiment as separate files: the trial list (``experiment_state-*.json``),
the trial generator (``search_gen_state-*.json`` for a searcher such as Optuna,
``basic-variant-state-*.json`` for a grid) and the searcher (``searcher-state-*.pkl``). It
writes them to a local staging folder and copies that folder to storage in a background
thread, file by file, every few seconds. A driver killed in between leaves files from
different moments on storage. Seen in a sweep killed just after its second trial started:
the generator had counted the trial, the trial list had not, and the resumed sweep ended
with one trial of two, reporting success. The other ways the files can disagree:

- the generator (or a grid's list of remaining cells) has made a trial the list lacks: the
  trial is lost and its slot or cell is offered again; Optuna's record of it (still
  RUNNING) is closed as FAIL, so the study does not show it as live;
- the list holds an unfinished trial the searcher never recorded: it could not report to
  the searcher (Tune's OptunaSearch raises on it), so it is dropped and its slot offered
  again;
- the concurrency limiter counts a trial the list lacks as running: with a limit of one
  trial at a time nothing would ever start again.

Each mend is said in one line. The formats are those of the pinned Ray (``pyproject.toml``);
``tests/test_tune_ray.py`` kills a real sweep and a real grid mid-trial and resumes them.
"""

from __future__ import annotations

import io
import json
from typing import Any

FINISHED = ("TERMINATED", "ERROR")  # statuses of trials that will not run again


def mend_snapshot(fs, path: str) -> list[str]:
    """Make the files of the experiment at ``path`` (a pyarrow filesystem path) agree with
    its trial list; returns what was mended (empty when they already agreed)."""
    names = _listing(fs, path)
    state_name = _newest(names, "experiment_state-", ".json")
    if state_name is None:
        return []
    state = json.loads(_read(fs, f"{path}/{state_name}"))
    trials = [json.loads(entry[0]) for entry in state["trial_data"]]
    generator = _newest(names, "search_gen_state-", ".json")
    if generator is not None:
        notes, kept = _mend_search(fs, path, names, generator, trials)
    else:
        grid = _newest(names, "basic-variant-state-", ".json")
        notes, kept = (_mend_grid(fs, path, grid, trials), trials) if grid is not None else ([], trials)
    if len(kept) < len(trials):
        keep = {t["trial_id"] for t in kept}
        state["trial_data"] = [e for e, t in zip(state["trial_data"], trials) if t["trial_id"] in keep]
        _write(fs, f"{path}/{state_name}", json.dumps(state).encode())
    return notes


def _mend_search(fs, path: str, names: list[str], generator_name: str,
                 trials: list[dict]) -> tuple[list[str], list[dict]]:
    """A searcher's generator: the trial count it stops at, its concurrency limiter, and the
    searcher's own records (OptunaSearch's trials, by Tune trial id)."""
    generator = _unpickle(_read(fs, f"{path}/{generator_name}"))
    searcher_name = _newest(names, "searcher-state-", ".pkl")
    searcher = _unpickle(_read(fs, f"{path}/{searcher_name}")) if searcher_name else None
    recorded = searcher.get("_ot_trials") if isinstance(searcher, dict) else None
    notes: list[str] = []
    kept = trials
    if recorded is not None:
        orphans = [t for t in trials if t["status"] not in FINISHED and t["trial_id"] not in recorded]
        kept = [t for t in trials if t not in orphans]
        notes += [f"trial {t['trial_id']} was saved before the searcher recorded it: it is dropped and "
                  "its slot sampled again" for t in orphans]
    missing = generator["counter"] - len(kept)  # made by the generator, absent from the list
    live = {t["trial_id"] for t in kept if t["status"] not in FINISHED}
    limiter = generator.get("name:ConcurrencyLimiter")
    stale_live = set(limiter["live_trials"]) - live if limiter else set()
    closed = _close_abandoned(searcher, {recorded[tid] for tid in live if tid in recorded} if recorded else set())
    notes += closed
    if not (missing or stale_live or closed or len(kept) < len(trials)):
        return notes, kept
    if missing:
        generator["total_samples"] += missing  # so it makes exactly the trials the list still lacks
        if missing > 0:
            generator["finished"] = False
            notes.append(f"{missing} trial(s) started just before the interruption were not saved: "
                         f"their slots are sampled again")
    if limiter:
        limiter["live_trials"] = set(limiter["live_trials"]) & live
        limiter["num_unfinished_live_trials"] = len(limiter["live_trials"])
    _write(fs, f"{path}/{generator_name}", _pickle(generator))
    if searcher_name and closed:  # an in-memory study travels in this file
        _write(fs, f"{path}/{searcher_name}", _pickle(searcher))
    return notes, kept


def _close_abandoned(searcher, resumed_trials) -> list[str]:
    """Optuna trials still RUNNING in the study that no resumed Tune trial will report to (the
    study may be SQLite, written by the killed driver after its state was last saved):
    closed as FAIL, so samplers and ``optuna-dashboard`` do not count them as live."""
    study = searcher.get("_ot_study") if isinstance(searcher, dict) else None
    if study is None or not hasattr(study, "get_trials"):
        return []
    from optuna.trial import TrialState

    keep = {t.number for t in resumed_trials}
    notes = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if frozen.number not in keep:
            study.tell(frozen.number, state=TrialState.FAIL)
            notes.append(f"Optuna trial {frozen.number} belonged to a trial the interruption lost: closed as FAIL")
    return notes


def _mend_grid(fs, path: str, grid_name: str, trials: list[dict]) -> list[str]:
    """A grid (``BasicVariantGenerator``): the cells still to run are every cell of the grid
    whose config no saved trial has, and its running set holds saved, unfinished trials."""
    from ray.tune.search.variant_generator import generate_variants

    grid = _unpickle(_read(fs, f"{path}/{grid_name}"))
    if not isinstance(grid, dict):  # Tune could not save it (a grid too large to list): nothing to mend
        return []
    live = {t["trial_id"] for t in trials if t["status"] not in FINISHED}
    saved = {_key(t["config"]) for t in trials}
    notes, changed = [], False
    if grid.get("_live_trials", set()) - live:
        grid["_live_trials"] = set(grid["_live_trials"]) & live
        changed = True
    for iterator in grid.get("_iterators", []):
        if iterator.lazy_eval or iterator.variants is None or iterator.num_samples_left:
            continue  # not listable, or not started (nothing can be lost), or sampled repeats
        cells = list(generate_variants(iterator.unresolved_spec, constant_grid_search=iterator.constant_grid_search))
        keys = [_key(spec.get("config", {})) for _, spec in cells]
        if not saved <= set(keys) or len(set(keys)) < len(keys):
            notes.append("the grid has sampled values: its remaining cells are left as Tune saved them")
            continue
        remaining = [cell for cell, key in zip(cells, keys) if key not in saved]
        if [_key(s.get("config", {})) for _, s in iterator.variants.iterable] != [_key(s.get("config", {}))
                                                                                     for _, s in remaining]:
            lost = len(remaining) - len(iterator.variants.iterable)
            if lost > 0:
                notes.append(f"{lost} grid cell(s) started just before the interruption were not saved: "
                             "they run again")
            iterator.variants.iterable, iterator.variants._has_next = remaining, bool(remaining)
            changed = True
    if changed:
        if any(it.variants is not None and it.variants.iterable for it in grid.get("_iterators", [])):
            grid["_finished"] = False
        _write(fs, f"{path}/{grid_name}", _pickle(grid))
    return notes


def _key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=repr)


def _listing(fs, path: str) -> list[str]:
    import pyarrow.fs as pafs

    return [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
            if i.type == pafs.FileType.File]


def _newest(names: list[str], prefix: str, suffix: str) -> str | None:
    """Tune's own choice among sessions' files: the greatest name (they end in a timestamp)."""
    matching = [n for n in names if n.startswith(prefix) and n.endswith(suffix)]
    return max(matching) if matching else None


def _read(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _write(fs, path: str, data: bytes) -> None:
    """Written beside and moved over (a rename on local disk), so a mend cut short leaves the old file."""
    tmp = f"{path}.mending"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def _unpickle(data: bytes):
    """Tune's own state files, written by this sweep's driver under this storage folder."""
    import ray.cloudpickle as cloudpickle

    return cloudpickle.load(io.BytesIO(data))


def _pickle(obj) -> bytes:
    import ray.cloudpickle as cloudpickle

    return cloudpickle.dumps(obj)
