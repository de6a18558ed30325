"""The training step the workers run (``xmr.train.step.TrainStep``), in this process, for
the "each preset learns" tests (no Ray)."""

import itertools

import torch

from xmr.config import load_config
from xmr.checks import resolve
from xmr.data.reader import make_loader
from xmr.method import Method
from xmr.train.step import TrainStep


def preset_cfg(name, data_path, *overrides):
    cfg = load_config(name, [f"data.path={data_path}", *overrides])
    cfg, _ = resolve(cfg)
    return cfg


def batches(cfg, split, epochs=1, shuffle=True, unit=None):
    for epoch in range(epochs):
        loader = make_loader(cfg.data.path, split, local_batch_size=cfg.data.batch_size if shuffle else 256,
                             seed=cfg.seed, epoch=epoch, shuffle=shuffle, unit=unit)
        yield from loader


def train(method: Method, cfg, steps: int, lr: float | None = None, unit=None, records=None) -> list[float]:
    """``steps`` batches through the worker's TrainStep (cosine schedule over them); returns
    the loss per step (and appends each step's record to ``records`` when given)."""
    torch.manual_seed(cfg.seed)
    if lr is not None:
        cfg.optim.lr = lr
    step = TrainStep(method, cfg, total_steps=steps)
    method.train()
    losses = []
    for batch in itertools.islice(batches(cfg, cfg.data.train_split, epochs=10_000, unit=unit), steps):
        record = step(batch)
        losses.append(record["loss"])
        if records is not None:
            records.append(record)
    return losses


def mean(xs):
    return sum(xs) / len(xs)


def mlflow_runs(uri: str) -> list:
    """``mlflow.search_runs`` over the "xmr" experiment of the store at ``uri``, leaving the
    process's tracking URI as it was (``mlflow.set_tracking_uri`` also sets
    MLFLOW_TRACKING_URI, which later runs in this process would follow)."""
    import os

    import mlflow

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        mlflow.set_tracking_uri(uri)
        return mlflow.search_runs(experiment_names=["xmr"], output_format="list")
    finally:
        mlflow.set_tracking_uri(saved or "")
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)


def processes_titled(prefix: str) -> list[int]:
    """PIDs of this machine's processes whose title starts with ``prefix`` (Ray names its
    workers ``ray::<Class>.<method>``): found without Ray's state API."""
    from pathlib import Path

    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(prefix.encode()):
                    out.append(int(entry.name))
            except OSError:
                pass
    return sorted(out)


def descends_from(pid: int, root: int) -> bool:
    """Whether process ``pid`` is ``root`` or one of its descendants (parent links in /proc):
    a Ray started by this test process has its raylet, and so its workers, below it."""
    from pathlib import Path

    seen = set()
    while pid > 1 and pid not in seen:
        if pid == root:
            return True
        seen.add(pid)
        try:
            stat = (Path("/proc") / str(pid) / "stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state: the parent's PID
    return pid == root


def kill_an_actor_after(metrics_glob, epoch: int, class_name: str, killed: list, pick: int = -1) -> None:
    """SIGKILL one live actor of ``class_name`` once a ``metrics.csv`` matched by
    ``metrics_glob`` (a Path glob: ``(folder, pattern)``) lists ``epoch``; what was killed (a
    PID) or the state API's error goes to ``killed``. Run in a thread. The actor is found by
    its process title (``ray::<class_name>``) among this test process's descendants (another
    Ray on the machine, a developer's or a bench's, is never touched), else through Ray's
    state API."""
    import os
    import signal
    import time

    import pandas as pd
    from ray.util.state import list_actors

    folder, pattern = metrics_glob
    deadline = time.time() + 240
    while time.time() < deadline and not killed:
        for csv in folder.glob(pattern):
            try:
                reached = pd.read_csv(csv)["epoch"].max() >= epoch
            except Exception:  # noqa: BLE001 - being written
                reached = False
            if not reached:
                continue
            titled = [pid for pid in processes_titled(f"ray::{class_name}") if descends_from(pid, os.getpid())]
            try:
                alive = [int(a.pid) for a in list_actors(filters=[("class_name", "=", class_name),
                                                                  ("state", "=", "ALIVE")])] if not titled else titled
            except Exception as exc:  # noqa: BLE001 - surfaced by the test's assertion
                killed.append(exc)
                return
            if alive:
                pid = int(alive[pick])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.05)


def wait_healthy(base: str, timeout: float = 120.0) -> None:
    """Until the endpoint at ``base`` answers ``/healthz`` with 200 (a deployment starting)."""
    import time

    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(f"{base}/healthz", timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{base} never became healthy")
