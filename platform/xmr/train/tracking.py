"""Experiment tracking with MLflow, from rank 0 only (Ray Train V2 accepts no Tune logger
callbacks, so the training loop logs itself, as the Ray docs do).

On by default (``tracking.enabled``), to a local store inside the run folder: an SQLite
database ``mlflow.db`` (MLflow 3's local backend; its file store is retired) with the
artifacts under ``mlruns/``; or to ``tracking.uri`` / ``MLFLOW_TRACKING_URI`` (a server).
A run logs the resolved config as parameters, every epoch row's numbers as metrics (step =
epoch), the in-epoch progress figures (step = optimiser step), ``best.json`` as an artifact
and the best checkpoint's URI as a tag. Its MLflow run id is kept in the run folder
(``mlflow_run_id``), so a resumed run continues the same MLflow run. A sweep or a comparison
passes a parent run id: its trials become child runs of one parent.

Runs whose folder is on S3 have no local store to write: they track only with an explicit
``tracking.uri`` / ``MLFLOW_TRACKING_URI``, and say so once otherwise.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from xmr.config import Config
from xmr.data import storage
from xmr.runtime import Runtime, quiet_mlflow_uploads

RUN_ID_FILE = "mlflow_run_id"
EXPERIMENT = "xmr"


def tracking_uri(cfg: Config, folder: str) -> str | None:
    """Where a run in ``folder`` tracks, or None (no local store for an S3 folder, no URI)."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if storage.is_s3(folder):
        return None
    return f"sqlite:///{os.path.abspath(folder)}/mlflow.db"


def _client(uri: str, runtime: Runtime | None = None):
    """An MLflow client bound to ``uri``. Never ``mlflow.set_tracking_uri``: it also sets
    MLFLOW_TRACKING_URI in the environment, so every later run of the process (a sweep's
    reused trial actors, a comparison's in-process jobs) would track to the first one's store."""
    runtime = runtime or Runtime()
    quiet_mlflow_uploads()
    import logging

    from mlflow.tracking import MlflowClient

    if not runtime.verbose:  # "Creating initial MLflow database tables..." per store
        for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if uri.startswith("sqlite:///"):
        _seed_sqlite(uri[len("sqlite:///"):], str(runtime.mlflow))
    return MlflowClient(tracking_uri=uri)


def _seed_sqlite(path: str, cache: str) -> None:
    """A new store starts as a copy of an empty, migrated one (built once per machine and
    MLflow version in the xmr cache): MLflow's schema migrations take seconds per store,
    and every run folder has its own store. ``cache``: the runtime's ``mlflow`` folder."""
    if os.path.exists(path):
        return
    import shutil
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    template = os.path.join(cache, f"empty-{mlflow.__version__}.db")
    if not os.path.exists(template):
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".db")
        os.close(fd)
        os.remove(tmp)
        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments()  # creates and migrates the schema
        os.replace(tmp, template)  # atomic: concurrent runs never see a half-built template
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".db")
    os.close(fd)
    shutil.copyfile(template, tmp)
    try:
        os.link(tmp, path)  # only if still absent: a concurrent trial may have seeded it first
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links
        if not os.path.exists(path):
            os.replace(tmp, path)
            return
    os.remove(tmp)


def _experiment(client, uri: str, folder: str) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    artifacts = None if not uri.startswith("sqlite:///") else f"file://{os.path.abspath(folder)}/mlruns"
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=artifacts)
    except Exception:  # noqa: BLE001 - a concurrent trial created it first
        return client.get_experiment_by_name(EXPERIMENT).experiment_id


def flat_params(cfg: Config) -> dict[str, str]:
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node and not prefix.endswith(("dims", "lambdas")):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(node)[:500]

    walk("", cfg.to_dict())
    return out


def _never_fatal(method):
    """Tracking is a side channel: a failing store (a server down, a locked database) turns
    tracking off for the run with one warning; the training itself carries on."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not self.active:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any store error, reported once
            print(f"[xmr] warning: MLflow tracking failed ({type(exc).__name__}: {str(exc)[:200]}); "
                  f"tracking is off for the rest of this run", flush=True)
            self.run_id = None
            return None

    return wrapper


class Tracker:
    """A run's MLflow logging (every method a no-op when tracking is off)."""

    def __init__(self, client=None, run_id: str | None = None) -> None:
        self.client, self.run_id = client, run_id

    @property
    def active(self) -> bool:
        return self.run_id is not None

    @classmethod
    def for_run(cls, cfg: Config, run, rank: int = 0, parent_run_id: str | None = None,
                say=print, runtime: Runtime | None = None) -> "Tracker":
        """``run`` is the run folder (``xmr.train.runfs.RunDir``); rank 0 tracks, others not."""
        if rank != 0 or not cfg.tracking.enabled:
            return cls()
        folder = cfg.tracking.folder or run.uri()
        uri = tracking_uri(cfg, folder)
        if uri is None:
            say(f"[xmr] tracking off: the run folder {run.uri()} is on S3; set tracking.uri or MLFLOW_TRACKING_URI")
            return cls()
        try:
            return cls._open(cfg, run, uri, folder, parent_run_id, say, runtime)
        except Exception as exc:  # noqa: BLE001 - a store that cannot be reached never stops training
            say(f"[xmr] warning: MLflow tracking at {uri} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                f"training without tracking")
            return cls()

    @classmethod
    def _open(cls, cfg: Config, run, uri: str, folder: str, parent_run_id: str | None, say,
              runtime: Runtime | None) -> "Tracker":
        client = _client(uri, runtime)
        existing = (run.read_text(RUN_ID_FILE) or "").strip()
        if existing:  # a resumed run continues its MLflow run (if this store has it)
            try:
                client.update_run(existing, status="RUNNING")
                say(f"[xmr] tracking: continuing MLflow run {existing} at {uri}")
                return cls(client, existing)
            except Exception:  # noqa: BLE001 - e.g. the store moved: a new run, said below
                pass
        tags = {"xmr.run_folder": run.uri(), "xmr.method": cfg.method, "xmr.task": cfg.task}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        created = client.create_run(_experiment(client, uri, folder), run_name=run.name, tags=tags)
        tracker = cls(client, created.info.run_id)
        log_params(client, tracker.run_id, flat_params(cfg))
        run.write_text(RUN_ID_FILE, tracker.run_id)
        say(f"[xmr] tracking to MLflow at {uri} (run {tracker.run_id})")
        return tracker

    def _client(self):
        return self.client

    @_never_fatal
    def log(self, values: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_key(k), float(v), now, step) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
        if metrics:
            self._client().log_batch(self.run_id, metrics=metrics)

    @_never_fatal
    def log_best(self, best: dict[str, Any] | None) -> None:
        if not best:
            return
        client = self._client()
        client.set_tag(self.run_id, "xmr.best_checkpoint", str(best.get("checkpoint")))
        client.log_dict(self.run_id, best, "best.json")

    @_never_fatal
    def finish(self, status: str = "FINISHED") -> None:
        self._client().set_terminated(self.run_id, status=status)


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    """MLflow takes at most 100 parameters a batch; a config has more."""
    from mlflow.entities import Param

    items = sorted(params.items())
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]])


def _key(name: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and spaces."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def start_parent(cfg: Config, folder: str, name: str, params: dict[str, Any] | None = None,
                 runtime: Runtime | None = None) -> tuple[str | None, str | None]:
    """A parent run for a sweep or a comparison (in the driver): (run id, tracking URI) or
    (None, None) when tracking is off."""
    if not cfg.tracking.enabled:
        return None, None
    uri = tracking_uri(cfg, folder)
    if uri is None:
        return None, None
    if not storage.is_s3(folder):
        os.makedirs(folder, exist_ok=True)
    client = _client(uri, runtime)
    run = client.create_run(_experiment(client, uri, folder), run_name=name, tags={"xmr.parent": "true"})
    if params:
        log_params(client, run.info.run_id, {str(k): json.dumps(v, default=str)[:500] for k, v in params.items()})
    return run.info.run_id, uri


def log_finished_run(uri: str, parent_run_id: str | None, name: str, params: dict[str, Any],
                     history: list[dict[str, Any]], final: dict[str, Any], folder: str,
                     runtime: Runtime | None = None) -> None:
    """A finished in-process run as one MLflow run (a comparison's job under its spec's parent):
    its parameters, every epoch's row (step = epoch) and its final metrics."""
    client = _client(uri, runtime)
    tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
    run = client.create_run(_experiment(client, uri, folder), run_name=name, tags=tags)
    tracker = Tracker(client, run.info.run_id)
    log_params(client, run.info.run_id, {str(k): str(v)[:500] for k, v in params.items()})
    for row in history:
        tracker.log(row, step=int(row.get("epoch", 0)))
    tracker.log({f"final_{k}": v for k, v in final.items()}, step=len(history))
    tracker.finish()
