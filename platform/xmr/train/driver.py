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
from typing import Any

import pandas as pd

from xmr.checkpoint import BEST
from xmr.checks import check, resolve
from xmr.config import Config, ConfigError
from xmr.data.storage import is_s3
from xmr.ray.session import ensure_ray
from xmr.runtime import Runtime
from xmr.tasks import family_of
from xmr.train.progress import summary_table
from xmr.train.runfs import RunDir, s3_endpoint


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


def cluster_address(cfg: Config, address: str | None = None, runtime: Runtime | None = None) -> str | None:
    """Where to run: ``--address``, else ``resources.address``, else ``RAY_ADDRESS`` (the
    runtime's ``ray_address``); None: a running local Ray or an embedded one."""
    return address or cfg.resources.address or (runtime or Runtime()).ray_address


def train_cpus(cfg: Config) -> float:
    """What a run's trainer reserves at once: its workers with their loader workers."""
    return cfg.resources.num_workers * cfg.resources.cpus_per_worker * (1 + cfg.data.num_workers)


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
    check(cfg)  # the one check of a run's config: what runs from here on takes it as checked
    return (cfg, *run_metric(cfg))


def run_metric(cfg: Config) -> tuple[str, str]:
    """The metric a run keeps its best checkpoint by, and its mode."""
    return cfg.storage.checkpoint_metric or family_of(cfg).main_metric, cfg.storage.checkpoint_mode


def build_trainer(cfg: Config, metric: str, mode: str, callbacks: list | None = None, score_untrained: bool = True,
                  runtime: Runtime | None = None):
    """The ``TorchTrainer`` for a prepared config; its workers get the runtime in their payload."""
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
               "run_name": cfg.storage.run_name, "score_untrained": score_untrained,
               "runtime": (runtime or Runtime()).to_dict()}
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
            logging_config=LoggingConfig(log_level="INFO" if runtime and runtime.verbose else "WARNING")),
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
                 score_untrained: bool = True, force: bool = False, runtime: Runtime | None = None,
                 prepared: bool = False) -> TrainResult:
    """Train ``cfg`` on Ray Train and return the run's history and best checkpoint.

    Relaunching with the same ``storage.root`` and run name resumes the run from its latest
    checkpoint (Ray Train restores its checkpoint manager from the run folder); with another
    config only when ``force`` (``open_run``). ``prepared``: ``cfg`` has been through
    ``prepare`` already (a trial's), so it is not resolved and checked again.
    """
    runtime = runtime or Runtime()
    cfg, metric, mode = (cfg, *run_metric(cfg)) if prepared else prepare(cfg, run_name)
    run = open_run(cfg, verbose, force)
    if start_ray:
        ensure_ray(cluster_address(cfg, address, runtime), runtime=runtime, need_cpus=train_cpus(cfg))
    if verbose:
        r = cfg.resources
        print(f"[xmr] training {cfg.method} ({cfg.task}) on {cfg.data.path}: {r.num_workers} worker(s) x "
              f"{r.cpus_per_worker} CPU{f' + {r.gpus_per_worker} GPU' if r.use_gpu else ''}, global batch "
              f"{cfg.data.batch_size}, {cfg.optim.epochs} epochs -> {run.uri()}", flush=True)
    trainer = build_trainer(cfg, metric, mode, callbacks, score_untrained, runtime)
    trainer.fit()
    result = read_run(cfg, metric, mode)
    if verbose:
        print(summary_table(result.history, metric, mode))
        if result.best:
            print(f"[xmr] best {metric} = {result.best['value']:.4f} at epoch {result.best['epoch']}: "
                  f"{result.best['checkpoint']}")
    return result

