"""The per-worker training loop that Ray Train runs on every data-parallel worker.

Read ``train_loop_per_worker`` top to bottom: set up the worker, resume from the latest
checkpoint (after a worker failure, or a relaunch with the same run name, the epochs
already checkpointed are not trained again), score the untrained model once, then per
epoch train on this rank's share of the shards and evaluate the whole validation split
jointly with the other workers, reporting one row and a checkpoint (model + optimiser +
scheduler + resolved config + metrics) from rank 0.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel

from xmr.checkpoint import (BEST, CHECKPOINT_FILES, META, CheckpointError, checkpoint_epoch, checkpoint_name,
                            fetch_checkpoint, load_checkpoint, load_train_state, save_checkpoint, save_train_state)
from xmr.config import Config, from_dict
from xmr.data.manifest import Manifest, load_manifest
from xmr.data.reader import Loader, loader_for, to_device
from xmr.distributed import all_gather_objects, all_reduce_sum, broadcast_object, world_info
from xmr.method import Method
from xmr.tasks.evaluate import evaluate
from xmr.train.pretrained import load_pretrained
from xmr.train.progress import EpochProgress, epoch_line, say
from xmr.train.runfs import RunDir
from xmr.train.step import EpochMeter, TrainStep, patience_exhausted, schedule
from xmr.train.tracking import Tracker

_P = 2_147_483_647  # prime modulus keeping Σ index² in int64 for any split size


@dataclass
class Worker:
    """What one worker holds for the whole run."""

    cfg: Config
    metric: str
    mode: str
    run_name: str
    rank: int
    world: int
    device: torch.device
    manifest: Manifest
    method: Method
    loader: Loader
    steps_per_epoch: int
    step: TrainStep
    run: RunDir  # the run folder (every rank reads it on resume; rank 0 writes it)
    num_nodes: int = 1
    tracker: Tracker = field(default_factory=Tracker)  # MLflow, rank 0 only


@dataclass
class RunState:
    """What a checkpoint carries besides weights, so a restart rebuilds the run from it."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    attempt: int = 1  # starts of the loop (restarts after failures count)


@dataclass
class EpochStats:
    losses: dict[str, float]
    n_samples: int
    exactly_once: bool | None
    train_s: float


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    quiet_ray_train()
    w = set_up(payload)
    state = resume(w)
    if state.epoch >= w.cfg.optim.epochs:  # nothing left: report the final row again so the run ends cleanly
        _report(w, state.history[-1] if state.history else {"epoch": state.epoch})
        return
    w.tracker = Tracker.for_run(w.cfg, w.run, w.rank, w.cfg.tracking.parent_run_id or None, say=say)
    if state.epoch == 0:
        score_untrained(w, state)
    first, started = state.epoch, time.perf_counter()
    for epoch in range(first, w.cfg.optim.epochs):
        if patience_exhausted(state.history, w.metric, w.mode, w.cfg.optim.patience):  # the same on every rank
            if w.rank == 0:
                say(f"[xmr] early stop after epoch {epoch}: no better {w.metric} for {w.cfg.optim.patience} epoch(s)")
            break
        stats = train_epoch(w, epoch)
        per_epoch = (time.perf_counter() - started) / (epoch + 1 - first)
        evaluate_and_report(w, state, epoch, stats, eta_s=per_epoch * (w.cfg.optim.epochs - epoch - 1))
    w.tracker.finish()


def set_up(payload: dict[str, Any]) -> Worker:
    """Config, model (identical initial weights on every rank), DDP, this rank's loader, the
    optimiser step."""
    import ray
    import ray.train.torch

    cfg: Config = from_dict(payload["config"])
    rank, world = world_info()
    device = ray.train.torch.get_device()
    manifest = load_manifest(cfg.data.path, endpoint_url=cfg.data.endpoint_url)
    torch.manual_seed(cfg.seed)  # DDP also broadcasts rank 0's weights; this keeps term parameters equal too
    method = Method(cfg).to(device)
    loader = loader_for(cfg, cfg.data.train_split, train=True, unit=method.family.train_unit, rank=rank,
                        world_size=world, manifest=manifest)
    steps, total = schedule(cfg, loader.steps)
    module = method
    if world > 1:
        # static_graph: terms switched off (λ = 0) or ablated branches leave the same parameters
        # without gradient every step, which DDP then handles without a per-step graph walk.
        # broadcast_buffers=False: the models have no running statistics, and a memory bank
        # (a buffer) is written by every rank itself (with the gathered keys, or its own).
        module = DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None,
                                         static_graph=True, broadcast_buffers=False)
    step = TrainStep(method, cfg, total_steps=total, device=device, module=module)
    run = RunDir(payload["storage_root"], payload["run_name"], cfg.data.endpoint_url)
    nodes = len(set(all_gather_objects(ray.get_runtime_context().get_node_id())))
    return Worker(cfg, payload["metric"], payload["mode"], payload["run_name"], rank, world, device, manifest,
                  method, loader, steps, step, run, nodes)


def resume(w: Worker) -> RunState:
    """The newest checkpoint that loads: the run folder's complete checkpoints newest first,
    then Ray Train's record (a process killed right after a checkpoint was persisted can leave
    Ray's record one report behind; the folder is the truth, so that epoch is not trained
    again). A checkpoint that does not load (a truncated upload, a disk error) is skipped,
    with its reason, for the one before it, instead of failing every retry. A fresh run
    starts from ``model.pretrained`` when one is given."""
    import ray.train

    loaded, skipped = newest_loadable(w.run, ray.train.get_checkpoint(), w.cfg.data.endpoint_url)
    if w.rank == 0:
        for note in skipped:
            say(f"[xmr] skipping checkpoint {note}")
    if loaded is None:
        if skipped:
            raise CheckpointError(f"{w.run_name}: no checkpoint loads ({'; '.join(skipped)}); relaunch with "
                                  f"another --run-name, or delete the damaged checkpoints")
        if w.cfg.model.pretrained:
            load_pretrained(w.method.model, str(fetch_checkpoint(w.cfg.model.pretrained,
                                                                 endpoint_url=w.cfg.data.endpoint_url)))
        return RunState()
    weights, meta, train_state = loaded
    w.method.load_state_dict(weights)
    w.step.load_state_dict({**train_state, "step": int(meta["step"])})
    torch.set_rng_state(train_state["rng"])
    state = RunState(int(meta["epoch"]), list(meta.get("history", [])), meta.get("best"),
                     int(meta.get("attempt", 1)) + 1)
    if w.rank == 0:
        say(f"[xmr] resuming {w.run_name} after epoch {state.epoch} (step {w.step.step}, attempt {state.attempt})")
    return state


def newest_loadable(run: RunDir, ray_checkpoint, endpoint_url: str | None = None):
    """((weights, meta, training state) of the newest checkpoint that loads, or None; the
    ones skipped, each with why). Candidates: the run folder's complete checkpoints newest
    first, then Ray's own record (normally one of them)."""
    def read(directory):
        _, weights, meta = load_checkpoint(directory)
        return weights, meta, load_train_state(directory)

    skipped = []
    for epoch, uri in _complete_on_storage(run):
        try:
            return read(fetch_checkpoint(uri, endpoint_url=endpoint_url)), skipped
        except CheckpointError as exc:
            skipped.append(f"{checkpoint_name(epoch)}: {exc}")
    if ray_checkpoint is not None:
        try:
            with ray_checkpoint.as_directory() as d:
                return read(d), skipped
        except CheckpointError as exc:
            skipped.append(f"Ray's latest checkpoint: {exc}")
    return None, skipped


def score_untrained(w: Worker, state: RunState) -> None:
    """The metric before training, as the run's epoch-0 row."""
    before = evaluate(w.method, w.cfg, w.manifest, w.cfg.data.val_split)
    check_metric_name(w.metric, before)
    state.history.append({"epoch": 0, "step": 0, **before})
    w.tracker.log(before, step=0)
    if w.rank == 0:
        say(f"[xmr] before training: {w.metric} {before[w.metric]:.4f}")


def train_epoch(w: Worker, epoch: int) -> EpochStats:
    """One pass over this rank's share (the same number of steps on every rank), counting
    which samples were trained on so the row can say whether each was seen exactly once."""
    w.loader.set_epoch(epoch)
    w.method.train()
    meter = EpochMeter()
    progress = EpochProgress.for_run(w.cfg, w.steps_per_epoch, epoch, enabled=w.rank == 0)
    seen = torch.zeros(3, dtype=torch.int64)  # count, Σ index, Σ index² mod P of the samples trained on
    n_steps, t0 = 0, time.perf_counter()
    for batch in to_device(w.loader, w.device):
        if n_steps >= w.steps_per_epoch:
            break
        record = w.step(batch)
        meter.add(record)
        n_steps += 1
        index = batch["index"].detach().to("cpu", torch.int64)
        seen += torch.stack([torch.tensor(len(index)), index.sum(), (index * index % _P).sum() % _P])
        figures = progress.update(n_steps, len(index) * w.world, record["loss"])
        if figures:
            w.tracker.log({f"progress_{k}": v for k, v in figures.items()}, step=w.step.step)
    train_s = time.perf_counter() - t0
    seen = all_reduce_sum(seen.to(w.device))
    names = sorted(set().union(*all_gather_objects(sorted(meter.sums))))  # a share may appear on some steps only
    n, n_samples = w.loader.num_samples, int(seen[0].item())
    exactly_once = None
    if w.method.family.indexed_units:  # indices 0..N-1: count and power sums pin down "each exactly once"
        exactly_once = bool(n_samples == n and int(seen[1]) == n * (n - 1) // 2
                            and int(seen[2]) % _P == (n - 1) * n * (2 * n - 1) // 6 % _P)
    return EpochStats(meter.means(w.device, names), n_samples, exactly_once, train_s)


def evaluate_and_report(w: Worker, state: RunState, epoch: int, stats: EpochStats, eta_s: float) -> None:
    """Validation over the whole split, the epoch row, the best-so-far, and rank 0's
    checkpoint, metrics.csv, best.json and epoch line."""
    t1 = time.perf_counter()
    val = evaluate(w.method, w.cfg, w.manifest, w.cfg.data.val_split)
    row: dict[str, Any] = {"epoch": epoch + 1, "step": w.step.step, **{f"train_{k}": v for k, v in stats.losses.items()},
                           **val, "train_samples": stats.n_samples,
                           "samples_per_s": stats.n_samples / max(stats.train_s, 1e-9), "train_s": stats.train_s,
                           "eval_s": time.perf_counter() - t1, "lr": w.step.scheduler.get_last_lr()[0]}
    if stats.exactly_once is not None:
        row["train_exactly_once"] = stats.exactly_once
    row.update(attempt=state.attempt, num_workers=w.world, num_nodes=w.num_nodes, run=w.run_name,
               max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # this worker's peak
    state.history.append(row)
    state.epoch = epoch + 1
    if is_new_best(row.get(w.metric), state.best, w.mode):
        state.best = {"metric": w.metric, "value": row[w.metric], "epoch": epoch + 1,
                      "checkpoint": w.run.uri(checkpoint_name(epoch + 1))}
    if w.rank == 0:
        # MLflow gets the row before Ray does: once the report is in, Tune may stop the trial
        # (ASHA) and kill this worker within one controller poll, and an epoch Tune saw must
        # be in MLflow. metrics.csv lists checkpointed epochs and best.json names a
        # checkpoint, so they follow the report that persists it.
        w.tracker.log(row, step=epoch + 1)
        with tempfile.TemporaryDirectory(prefix="xmr-ckpt-") as tmp:
            save_checkpoint(tmp, w.method, w.cfg, metrics=row, epoch=epoch + 1, step=w.step.step,
                            history=state.history, best=state.best, attempt=state.attempt)
            save_train_state(tmp, {**w.step.state_dict(), "rng": torch.get_rng_state()})
            _report(w, row, tmp, checkpoint_name(epoch + 1))
        w.run.write_text("metrics.csv", pd.DataFrame(state.history).to_csv(index=False))
        if state.best is not None:
            w.run.write_text(BEST, json.dumps(state.best, indent=2, default=float) + "\n")
        w.tracker.log_best(state.best)
        say(epoch_line(row, w.cfg.optim.epochs, w.metric, eta_s=eta_s))
    else:
        _report(w, row)
    state.best = broadcast_object(state.best)


def quiet_ray_train() -> None:
    """xmr prints its own epoch lines; Ray Train V2 also logs every report (a full metrics dict)
    through a logger named by its file path, which LoggingConfig does not reach. Quieted
    unless XMR_VERBOSE=1 (``--verbose``)."""
    if os.environ.get("XMR_VERBOSE") == "1":
        return
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray version: its logs stay
        pass


def _report(w: Worker, row: dict[str, Any], checkpoint_dir: str | None = None, name: str | None = None) -> None:
    import ray.train

    if checkpoint_dir is None:
        ray.train.report(row)
    else:
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir), checkpoint_dir_name=name)


def _complete_on_storage(run: RunDir) -> list[tuple[int, str]]:
    """(epoch, URI) of every complete training checkpoint in the run folder, newest first."""
    import pyarrow.fs as pafs

    found = []
    for info in run.fs.get_file_info(pafs.FileSelector(run.path, allow_not_found=True)):
        epoch = checkpoint_epoch(info.base_name)
        if info.type != pafs.FileType.Directory or epoch is None:
            continue
        files = {f.base_name for f in run.fs.get_file_info(pafs.FileSelector(info.path))}
        if set(CHECKPOINT_FILES) <= files:
            found.append((epoch, run.uri(info.base_name)))
    return sorted(found, reverse=True)


def is_new_best(value: float | None, best: dict[str, Any] | None, mode: str) -> bool:
    """Ties go to the later epoch, as in Ray Train's keep-best-k ordering, so the checkpoint
    ``best.json`` names is always one Ray keeps."""
    if value is None or value != value:  # missing or NaN
        return False
    if best is None:
        return True
    return value >= best["value"] if mode == "max" else value <= best["value"]


def check_metric_name(metric: str, row: dict[str, Any]) -> None:
    """A checkpoint / sweep metric that the task never reports fails on the first evaluation."""
    if metric not in row:
        raise ValueError(f"storage.checkpoint_metric = {metric!r}: not a metric of this task "
                         f"(metrics: {sorted(row)})")
