"""What a sweep records, without starting Ray: ``StudySearch`` fed the calls Tune makes
(``tune_controller``: a result the scheduler stops on goes to ``on_trial_complete`` without
``on_trial_result`` first; a trial that returns by itself completes on the result already
seen), and the console's "pruned" (only a scheduler prunes; ``optim.patience`` does not)."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from xmr.tune.study import StudySearch


def _space(trial):
    trial.suggest_float("x", 0.0, 1.0)


@pytest.fixture
def search(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path}/optuna.db"
    s = StudySearch(space=_space, metric="map_mean", mode="max", sampler=optuna.samplers.RandomSampler(seed=0),
                    study_name="s", storage=optuna.storages.RDBStorage(url), max_epochs=4)
    s.xmr_url = url
    return s


def _drive(search: StudySearch, tid: str, epochs: list[int], end: str) -> None:
    """Tune's calls for one trial: ``end`` = natural (it returned: all epochs or patience),
    asha (the scheduler stopped it on its last result) or error."""
    search.suggest(tid)
    last = None
    for i, epoch in enumerate(epochs):
        result = {"epoch": epoch, "map_mean": 0.1 * epoch}
        if end == "asha" and i == len(epochs) - 1:
            search.on_trial_complete(tid, dict(result))
            return
        search.on_trial_result(tid, dict(result))
        last = result
    if end == "error":
        search.on_trial_complete(tid, None, error=True)
    else:
        search.on_trial_complete(tid, dict(last, done=True))


def test_study_states_follow_what_ended_each_trial(search):
    _drive(search, "all", [1, 2, 3, 4], "natural")
    _drive(search, "asha", [1, 2], "asha")
    _drive(search, "patience", [1, 2], "natural")  # optim.patience ended it at epoch 2: not pruned
    _drive(search, "failed", [1, 2], "error")
    _drive(search, "asha_at_max_t", [1, 2, 3, 4], "asha")  # ASHA's stop at max_t is a finish
    _drive(search, "retried", [1, 2, 2, 3], "natural")  # epoch 2 reported again after a retry
    study = optuna.load_study(study_name="s", storage=search.xmr_url)
    got = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert [t.user_attrs["tune_trial_id"] for t in sorted(study.trials, key=lambda t: t.number)] == \
        ["all", "asha", "patience", "failed", "asha_at_max_t", "retried"]
    states = {k: t.state for k, t in got.items()}
    assert states == {"all": TrialState.COMPLETE, "asha": TrialState.PRUNED, "patience": TrialState.COMPLETE,
                      "failed": TrialState.FAIL, "asha_at_max_t": TrialState.COMPLETE, "retried": TrialState.COMPLETE}
    assert got["asha"].intermediate_values == pytest.approx({1: 0.1, 2: 0.2})
    assert got["asha"].value == pytest.approx(0.2)
    assert got["retried"].intermediate_values == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3})  # one value per epoch
    assert got["all"].value == pytest.approx(0.4)


def _trial(tid: str, epochs: list[int], values: list[float], patience: int | None = None):
    config = {"optim.lr": 0.01} if patience is None else {"optim.patience": patience}
    return SimpleNamespace(trial_id=tid, status="TERMINATED", config=config,
                           last_result={"epoch": epochs[-1], "map_mean": values[-1]})


def _progress(max_epochs, patience=0):
    from xmr.tune.trials import progress_callback

    return progress_callback(3, "map_mean", "sweep", mode="max", max_epochs=max_epochs, patience=patience)


def _feed(progress, trial, epochs, values):
    for e, v in zip(epochs, values):
        progress.on_trial_result(0, [trial], trial, {"epoch": e, "map_mean": v})


def test_console_calls_pruned_only_what_the_scheduler_stopped():
    # early stopped by optim.patience = 2: best at epoch 1, stopped after epoch 3 of 6
    epochs, values = [1, 2, 3], [0.5, 0.4, 0.45]
    with_asha = _progress(max_epochs=6, patience=2)
    patient = _trial("p", epochs, values)
    _feed(with_asha, patient, epochs, values)
    assert not with_asha._pruned(patient)
    # the same short run, no patience to explain it: ASHA stopped it
    stopped = _trial("a", epochs, values, patience=0)
    _feed(with_asha, stopped, epochs, values)
    assert with_asha._pruned(stopped)
    # no scheduler (confirmation runs, --no-asha, --multi-objective): nothing is pruned
    no_scheduler = _progress(max_epochs=None, patience=2)
    _feed(no_scheduler, stopped, epochs, values)
    assert not no_scheduler._pruned(stopped)
