"""Tiny Tune experiments built by ``xmr.tune.trials.make_tuner`` (two Optuna sweeps and a
grid, one trial at a time), for ``test_tune_ray``'s interrupted-experiment test: run here in
a subprocess until each has its second trial running and saved to storage, then killed.

``python -c "import tune_interrupt_helpers as h; h.interrupt(address, root, markers)"`` with this
folder on ``PYTHONPATH``. This module is pickled by value (``register_pickle_by_value``), so
Ray's workers need not import it; the search space is xmr's, pickled by reference."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import ray.cloudpickle

import tune_interrupt_helpers as _self

ray.cloudpickle.register_pickle_by_value(_self)

SAMPLES = 3
EXPERIMENTS = {"search_behind": "search", "search_ahead": "search", "grid": "grid"}  # name -> kind


def trainable(config, markers: str, block: bool) -> None:
    """Leaves a marker per trial start; with ``block``, an experiment's second trial waits
    (for the kill) once it is running."""
    from ray import tune

    folder = Path(markers)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{tune.get_context().get_trial_id()}.{time.time_ns()}").write_text(json.dumps(config))
    if block and len(list(folder.iterdir())) >= 2:
        while True:
            time.sleep(1)
    tune.report({"m": float(config.get("optim.lr", config.get("cell", 0)))})


def tuner(name: str, root: str, markers: str, block: bool):
    """The experiment ``name`` as a sweep builds it; trials reuse their actor (a second a
    trial less here; what Tune saves, and so what is mended, is the same)."""
    kind = EXPERIMENTS[name]
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from xmr.config import load_config
    from xmr.tune.space import Param, SearchSpace
    from xmr.tune.trials import make_tuner

    cfg = load_config("sccmrl", [f"storage.root={root}"])
    fn = tune.with_parameters(trainable, markers=f"{markers}/{name}", block=block)
    if kind == "search":
        os.makedirs(root, exist_ok=True)
        storage = optuna.storages.RDBStorage(f"sqlite:///{root}/{name}.db")
        # the space is xmr's (pickled by reference in the searcher's state, as in a real sweep)
        space = SearchSpace(preset="sccmrl", params=[Param(path="optim.lr", kind="uniform", low=0.0, high=1.0)])
        search = OptunaSearch(space=space.suggest, metric="m", mode="max", study_name=name, storage=storage,
                              sampler=optuna.samplers.RandomSampler(seed=0))
        return make_tuner(fn, cfg, name, SAMPLES, metric="m", mode="max", max_concurrent=1, search_alg=search,
                          reuse_actors=True)
    return make_tuner(fn, cfg, name, SAMPLES, metric="m", mode="max", max_concurrent=1, reuse_actors=True,
                      param_space={"cell": tune.grid_search(list(range(SAMPLES)))})


def saved_trials(root: str, name: str) -> list[dict]:
    """The trial list in the experiment's newest state file on storage (what a resume reads)."""
    files = sorted(Path(root, name).glob("experiment_state-*.json"))
    if not files:
        return []
    try:
        return [json.loads(entry[0]) for entry in json.loads(files[-1].read_text())["trial_data"]]
    except (json.JSONDecodeError, KeyError):
        return []  # caught mid-copy


def interrupt(address: str, root: str, markers: str) -> None:
    """Every experiment, each until its second trial runs and storage lists it; then 'ready'
    and wait for SIGKILL. Attached to the Ray at ``address`` as a driver of its own (its
    trials die with it)."""
    import ray

    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "0.5"  # the state reaches storage soon after it changes
    ray.init(address=address)
    for name in EXPERIMENTS:  # one after another: started side by side, the Optuna ones stalled
        threading.Thread(target=lambda n=name: tuner(n, root, markers, block=True).fit(), daemon=True).start()
        deadline = time.time() + 120
        while time.time() < deadline:
            saved = saved_trials(root, name)
            if len(saved) == 2 and saved[1]["status"] == "RUNNING":
                break
            time.sleep(0.2)
        else:
            raise SystemExit(f"{name}: the second trial was not saved running within 120 s")
    print("ready", flush=True)
    while True:
        time.sleep(1)
