"""The sweep's Optuna study as the record of what happened: every epoch's validation value
is an intermediate value of its Optuna trial (step = epoch), a trial ASHA stops is told as
PRUNED, a failed one as FAIL, a finished one as COMPLETE with its best epoch's value (the
value its best checkpoint scores). TPE, the importance evaluator, the plots
(``xmr.tune.report``) and ``optuna-dashboard`` all read this one study.

Ray's ``OptunaSearch`` reports intermediate values by Tune's report count (a retried trial
starts counting again) and tells every trial that returned a value COMPLETE, a trial ASHA
stopped at its first rung included, with that epoch's value as if final. ``StudySearch``
keeps Ray's suggestion side and records the rest itself.

How a stop is told apart from a finish: Tune hands a result the scheduler stops on to
``on_trial_complete`` without ``on_trial_result`` first, and a trial that returns by itself
(all its epochs, or ``optim.patience``) completes on the result already seen. So a trial
completes PRUNED when its last result is new here and its epoch is short of
``optim.epochs``.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from xmr.ray.compat import optuna_search_records
from xmr.runtime import Runtime

log = logging.getLogger(__name__)

TRIAL_ATTR = "tune_trial_id"  # the Optuna trial's user attribute: its Tune trial's id


class StudySearch(OptunaSearch):
    """``OptunaSearch`` whose study records pruned, failed and finished trials as they were,
    with one intermediate value per epoch. ``max_epochs``: a trial's full length."""

    def __init__(self, *args: Any, max_epochs: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.xmr_max_epochs = int(max_epochs)
        self.xmr_epochs: dict[str, dict[int, float]] = {}  # Tune trial id -> epoch -> value (saved with the searcher)

    @property
    def _multi(self) -> bool:
        return isinstance(self.metric, list)

    def _record(self, ot_trial, trial_id: str, result: dict[str, Any]) -> bool:
        """This result's epoch as an intermediate value; False when that epoch was seen already."""
        epochs = self.xmr_epochs.setdefault(trial_id, {})
        epoch = result.get("epoch")
        if epoch is None or int(epoch) in epochs:
            return False
        metric = self.metric[0] if self._multi else self.metric
        value = result.get(metric)
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        epochs[int(epoch)] = float(value) if finite else math.nan
        if finite and not self._multi:  # Optuna keeps no intermediate values for several objectives
            ot_trial.report(float(value), int(epoch))
        return True

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        _, ot_trials, _ = optuna_search_records(self)
        if trial_id in ot_trials:  # the study's trial names its Tune trial (joined in trials.csv)
            ot_trials[trial_id].set_user_attr(TRIAL_ATTR, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        study, ot_trials, told = optuna_search_records(self)
        if trial_id in told or trial_id not in ot_trials:
            return
        self._record(ot_trials[trial_id], trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        study, ot_trials, told = optuna_search_records(self)
        if trial_id in told or trial_id not in ot_trials:
            return super().on_trial_complete(trial_id, result, error)  # Ray's own warning
        ot_trial = ot_trials[trial_id]
        stopped_here = bool(result) and self._record(ot_trial, trial_id, result)
        epochs = self.xmr_epochs.get(trial_id, {})
        values = None
        if error or not result or not epochs:
            state = TrialState.FAIL  # failed, or ended (the sweep stopped) before any epoch
        elif stopped_here and int(result.get("epoch", 0)) < self.xmr_max_epochs:
            state = TrialState.PRUNED  # the last intermediate value stands as its value
        else:
            state = TrialState.COMPLETE
            values = self._final(epochs, result)
            if values is None:
                state = TrialState.FAIL
        try:
            study.tell(ot_trial, values, state=state)
        except Exception as exc:  # e.g. a value Optuna refuses
            log.warning("Optuna trial of %s not told (%s): %s", trial_id, state.name, exc)
        told.add(trial_id)

    def _final(self, epochs: dict[int, float], result: dict[str, Any]) -> float | list[float] | None:
        """A finished trial's value: its best epoch (what its best checkpoint scores); with
        several objectives, that and the last result's other objectives."""
        seen = [v for v in epochs.values() if not math.isnan(v)]
        if not seen:
            return None
        mode = self.mode[0] if self._multi else self.mode
        best = max(seen) if mode == "max" else min(seen)
        if not self._multi:
            return best
        rest = [result.get(m) for m in self.metric[1:]]
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in rest):
            return None
        return [best, *[float(v) for v in rest]]


def default_storage(root: str, name: str, studies: str | os.PathLike | None = None) -> str:
    """The study's database: ``<root>/<name>/optuna.db`` for a local storage root; for an S3
    root a local SQLite file under ``studies`` (the runtime's ``studies``: ``XMR_STUDY_CACHE``,
    default ``~/.cache/xmr/studies``) kept during
    the sweep, fetched from ``<sweep>/optuna.db`` when a relaunch resumes and written back
    there at the end (``sync_study``)."""
    from xmr.data import storage

    if storage.is_s3(root):
        folder = os.path.join(studies or Runtime().studies, root.replace("://", "_").replace("/", "_").strip("_"),
                              name)
    else:
        folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    return f"sqlite:///{os.path.abspath(folder)}/optuna.db"


def local_file(url: str) -> str | None:
    """The path of a SQLite storage URL, else None."""
    return url[len("sqlite:///"):] if url.startswith("sqlite:///") else None


def fetch_study(url: str, sweep) -> None:
    """An S3 sweep resumed on a machine without its local study: the copy beside the results."""
    path = local_file(url)
    if path and not os.path.exists(path):
        import posixpath

        import pyarrow.fs as pafs

        remote = posixpath.join(sweep.path, "optuna.db")
        if sweep.fs.get_file_info(remote).type == pafs.FileType.File:
            with sweep.fs.open_input_stream(remote) as src, open(path, "wb") as f:
                f.write(src.read())


def sync_study(url: str, sweep) -> str | None:
    """The local study file written beside the results (an S3 sweep's ``optuna.db``)."""
    path = local_file(url)
    if path and os.path.exists(path):
        with open(path, "rb") as f:
            sweep.write_bytes("optuna.db", f.read())
        return sweep.uri("optuna.db")
    return None


def load(url: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=url)


def by_tune_id(study) -> dict[str, Any]:
    """Tune trial id -> its Optuna trial (FrozenTrial)."""
    return {t.user_attrs[TRIAL_ATTR]: t for t in study.trials if TRIAL_ATTR in t.user_attrs}
