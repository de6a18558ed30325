"""The training job's driver: resolve the config, attach to (or start) Ray, run a
``TorchTrainer`` over ``train_loop_per_worker`` and summarise the run.

``xmr train``, ``jobs/train.py`` (``ray job submit``) and every Tune trial call
``run_training``; only where Ray runs differs (``RAY_ADDRESS`` / ``--address``, or a local
Ray started in-process, the embedded default).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from xmr.checkpoint import BEST
from xmr.checks import check, resolve
from xmr.config import Config, ConfigError
from xmr.data.storage import is_s3
from xmr.raycompat import check_version, process_env, quiet_failure_handler, set_driver_env, started_cluster_address
from xmr.tasks import family_of
from xmr.train.progress import summary_table
from xmr.train.runfs import RunDir, s3_endpoint

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # platform/xmr


@dataclass
class TrainResult:
    run_uri: str
    metric: str
    mode: str
    best: dict[str, Any] | None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best_checkpoint(self) -> str | None:
        return self.best["checkpoint"] if self.best else None


def code_runtime_env(extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Ship the xmr package to every worker (``py_modules``), so a cluster runs this checkout's
    code whether or not the package is installed there; with it the environment its processes
    need (``xmr.raycompat.process_env``, the S3 endpoint)."""
    env = process_env()
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "XMR_CACHE",
                 "XMR_VERBOSE", "MLFLOW_TRACKING_URI"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    env.update(extra_env or {})
    return {"py_modules": [str(PACKAGE_DIR)], "excludes": ["__pycache__", "*.pyc"], "env_vars": env}


def local_cpus(cfg: Config) -> int:
    """Logical CPUs for an embedded Ray: more than the cores, so a trainer's controller, its
    workers and their data loading never wait on each other on a small machine."""
    need = cfg.resources.num_workers * cfg.resources.cpus_per_worker * (1 + cfg.data.num_workers) + 2
    return int(max(default_cpus(), need))


def cluster_address(cfg: Config, address: str | None = None) -> str | None:
    """Where to run: ``--address``, else ``resources.address``, else ``RAY_ADDRESS`` (None: local)."""
    return address or cfg.resources.address or os.environ.get("RAY_ADDRESS")


LOCAL = "local"  # Ray's own convention (ray.init(address="local")): start a new local Ray here


def is_local(address: str | None) -> bool:
    """``--address local`` / ``RAY_ADDRESS=local``: a new local Ray, never an address to attach to."""
    return (address or "").strip().lower() == LOCAL


def default_cpus() -> int:
    """The one sizing policy of a local Ray xmr starts (embedded, or ``--address local``) when
    the command names no need of its own: logical CPUs beyond the cores."""
    return max(4, 2 * (os.cpu_count() or 1))


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = False,
               extra_env: dict[str, str] | None = None, dashboard: bool = True, driver_logs: bool = True) -> str:
    """Attach to whatever Ray is there, or start one (idempotent); returns how.

    ``address`` / ``RAY_ADDRESS`` -> that cluster, except ``local`` (Ray's convention: a new
    local Ray here, sized and set up as the embedded default, and said so); else a cluster
    already running on this machine (``ray start``) -> attach to it; else start an embedded
    local Ray with ``num_cpus``. Start-only arguments are never passed when attaching (Ray
    refuses them). ``driver_logs=False``: the Ray processes' own lines (workers, raylet, GCS)
    stay in Ray's log files instead of streaming to this console (``log_to_driver``).
    """
    set_driver_env()  # before Ray is imported: it reads the auth mode then
    import ray

    check_version()
    if ray.is_initialized():
        return "already connected"
    env = code_runtime_env(extra_env)
    address = address or os.environ.get("RAY_ADDRESS")
    local = is_local(address)
    if local:  # not an address: nothing started from here may read it as one
        os.environ.pop("RAY_ADDRESS", None)
        address = None
    # A Ray started from here inherits this process's environment: the endpoint's key (read
    # by ``xmr serve`` before it gets here) must not reach the raylet, workers or replicas.
    os.environ.pop("XMR_API_KEY", None)
    if address:
        with quiet_failure_handler():
            ray.init(address=address, runtime_env=env, logging_level=_ray_log_level(), log_to_driver=driver_logs)
        how = f"attached to the Ray cluster at {address}"
    else:
        how = ""
        started = None if local else started_cluster_address()
        if started:
            try:
                with quiet_failure_handler():
                    ray.init(address=started, runtime_env=env, logging_level=_ray_log_level(),
                             log_to_driver=driver_logs)
                how = "attached to the Ray cluster running on this machine (set RAY_ADDRESS or --address for another)"
            except ConnectionError:  # it went between the check and here
                pass
        if not how:
            # The dashboard (bound to 127.0.0.1) serves Ray's state API, which Ray Train uses to
            # release a stopped run's placement group (e.g. a trial ASHA ends early); work with
            # no Ray Train in it (a sweep of one-worker trials) goes without: the dashboard's
            # start-up and agent cost a 6-trial sweep on 2 cores ~7 s (57 -> 50 s, measured
            # twice, interleaved). A local Ray is never preempted: Ray Train's preemption
            # watcher (for spot nodes) only adds an error line about its constructor
            # arguments, so it is off here.
            local_env = {**env, "env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", **env["env_vars"]}}
            cpus = num_cpus or default_cpus()
            # address="local": a new Ray whatever address file `ray start` left on the machine
            with quiet_failure_handler():
                ray.init(address="local", num_cpus=cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                         runtime_env=local_env, configure_logging=False, log_to_driver=driver_logs)
            how = (f"started a new local Ray (--address local) with {cpus} logical CPUs" if local
                   else "started an embedded local Ray")
    if not quiet and (local or not how.startswith("started")):
        print(f"[xmr] {how}", flush=True)
    return how


def _ray_log_level() -> int:
    """Ray's own driver lines ("Connecting to existing Ray cluster", "Pushing file package")
    only with ``--verbose``: xmr says in one line where it runs."""
    import logging

    return logging.INFO if os.environ.get("XMR_VERBOSE") == "1" else logging.WARNING


def prepare(cfg: Config, run_name: str | None = None) -> tuple[Config, str, str]:
    """Resolve the config for a run: absolute local paths (workers run elsewhere), the S3
    endpoint pinned, dims filled from the manifest, a run name. Returns (cfg, metric, mode)."""
    if run_name:
        cfg.storage.run_name = run_name
    if not cfg.storage.run_name:
        cfg.storage.run_name = f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not is_s3(cfg.data.path):
        cfg.data.path = os.path.abspath(cfg.data.path)
    if not is_s3(cfg.storage.root):
        cfg.storage.root = os.path.abspath(os.path.expanduser(cfg.storage.root))
    if cfg.model.pretrained and not is_s3(cfg.model.pretrained):
        cfg.model.pretrained = os.path.abspath(cfg.model.pretrained)
    if is_s3(cfg.data.path) or is_s3(cfg.storage.root):
        cfg.data.endpoint_url = s3_endpoint(cfg.data.endpoint_url)
    cfg, _ = resolve(cfg)
    check(cfg)
    metric = cfg.storage.checkpoint_metric or family_of(cfg).main_metric
    return cfg, metric, cfg.storage.checkpoint_mode


def build_trainer(cfg: Config, metric: str, mode: str, callbacks: list | None = None, score_untrained: bool = True):
    """The ``TorchTrainer`` for a prepared config."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from xmr.train.loop import train_loop_per_worker
    from xmr.train.runfs import filesystem

    res = cfg.resources
    per_worker = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    fs, base = filesystem(cfg.storage.root, cfg.data.endpoint_url)
    payload = {"config": cfg.to_dict(), "metric": metric, "mode": mode, "storage_root": cfg.storage.root,
               "run_name": cfg.storage.run_name, "score_untrained": score_untrained}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker=per_worker, placement_strategy=res.placement_strategy),
        run_config=RunConfig(
            name=cfg.storage.run_name, storage_path=base, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.storage.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.storage.keep_checkpoints,
                                               checkpoint_score_attribute=metric, checkpoint_score_order=mode),
            callbacks=callbacks or None,
            # xmr prints one line per epoch itself; Ray Train's per-report INFO lines would bury it
            logging_config=LoggingConfig(log_level="INFO" if os.environ.get("XMR_VERBOSE") == "1" else "WARNING")),
    )


def read_run(cfg: Config, metric: str, mode: str) -> TrainResult:
    """What a run directory says: per-epoch history and the best checkpoint."""
    run = RunDir(cfg.storage.root, cfg.storage.run_name, cfg.data.endpoint_url)
    csv, best = run.read_text("metrics.csv"), run.read_text(BEST)
    history = pd.read_csv(pd.io.common.StringIO(csv)).to_dict("records") if csv else []
    return TrainResult(run_uri=run.uri(), metric=metric, mode=mode, best=json.loads(best) if best else None,
                       history=history)


# What a relaunch may change and still resume: how long and where the run goes, not what it
# trains (a longer run is the usual reason to relaunch; the cosine schedule follows the cap).
RELAUNCH_MAY_CHANGE = ("optim.epochs", "resources.", "storage.root", "storage.max_failures",
                       "storage.keep_checkpoints", "tracking.", "data.num_workers", "data.endpoint_url")


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``field: old -> new`` for every field that differs, except those a relaunch may change
    and those the saved config lacks (fields added to xmr since, at their defaults)."""
    out = []
    for key in sorted(set(old) & set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{path}.")
        elif a != b and not any(path == f or (f.endswith(".") and path.startswith(f)) for f in RELAUNCH_MAY_CHANGE):
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


def open_run(cfg: Config, verbose: bool = True, force: bool = False) -> RunDir:
    """The run folder of a prepared config, with the resolved config saved in it. A run
    folder that holds another config is not resumed with this one unless ``force``: the
    error names every differing field."""
    import yaml

    run = RunDir(cfg.storage.root, cfg.storage.run_name, cfg.data.endpoint_url)
    previous = run.read_text("config.yaml")
    if previous is not None:
        changes = config_changes(yaml.safe_load(previous) or {}, cfg.to_dict())
        if changes and not force:
            raise ConfigError(f"run {run.uri()} was started with another config ({'; '.join(changes)}): relaunch "
                              f"with its settings to resume it, pick another --run-name for a new run, or pass "
                              f"--force to resume it with these")
        if verbose:
            print(f"[xmr] run {run.uri()} exists: resuming from its latest checkpoint"
                  + (f" with changed settings ({'; '.join(changes)})" if changes else ""), flush=True)
    run.write_text("config.yaml", cfg.to_yaml())
    return run


def run_training(cfg: Config, *, address: str | None = None, run_name: str | None = None,
                 callbacks: list | None = None, start_ray: bool = True, verbose: bool = True,
                 score_untrained: bool = True, force: bool = False) -> TrainResult:
    """Train ``cfg`` on Ray Train and return the run's history and best checkpoint.

    Relaunching with the same ``storage.root`` and run name resumes the run from its latest
    checkpoint (Ray Train restores its checkpoint manager from the run folder); with another
    config only when ``force`` (``open_run``).
    """
    cfg, metric, mode = prepare(cfg, run_name)
    run = open_run(cfg, verbose, force)
    if start_ray:
        ensure_ray(cluster_address(cfg, address), num_cpus=local_cpus(cfg))
    if verbose:
        r = cfg.resources
        print(f"[xmr] training {cfg.method} ({cfg.task}) on {cfg.data.path}: {r.num_workers} worker(s) x "
              f"{r.cpus_per_worker} CPU{f' + {r.gpus_per_worker} GPU' if r.use_gpu else ''}, global batch "
              f"{cfg.data.batch_size}, {cfg.optim.epochs} epochs -> {run.uri()}", flush=True)
    trainer = build_trainer(cfg, metric, mode, callbacks, score_untrained)
    trainer.fit()
    result = read_run(cfg, metric, mode)
    if verbose:
        print(summary_table(result.history, metric, mode))
        if result.best:
            print(f"[xmr] best {metric} = {result.best['value']:.4f} at epoch {result.best['epoch']}: "
                  f"{result.best['checkpoint']}")
    return result

