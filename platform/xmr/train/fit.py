"""The one training loop, free of Ray: ``fit(cfg, hooks)``.

Read ``fit`` top to bottom: set up (config, model with the same initial weights on every
rank, DDP when there is more than one rank, this rank's loader, the optimiser step), resume
from the newest checkpoint that loads (the epochs already checkpointed are not trained
again), score the untrained model once, then per epoch train on this rank's share of the
shards, evaluate the whole validation split jointly with the other ranks, and record the
epoch: its row, the best so far, a checkpoint (model + optimiser + scheduler + resolved
config + metrics) and the run folder's ``metrics.csv`` and ``best.json``. Patience ends it
early.

Where the loop runs is the hooks' business, and nothing else differs:

- ``LocalHooks`` (here): this process alone. Checkpoints are copied into the run folder and
  kept as Ray Train keeps them (``keep_checkpoints``). Notebooks, tests, ``fit_in_process``.
- ``xmr.train.loop.RayTrainHooks``: a Ray Train worker. ``ray.train.report`` persists rank
  0's checkpoint; Ray's own record is one more candidate to resume from.
- ``xmr.tune.trials.TuneHooks``: a one-worker Tune trial training in its own process; the
  local hooks, plus ``tune.report`` of every epoch's row so a scheduler (ASHA) sees it.

Without a run folder (``run=None``) nothing is written: the history is returned, and with
``keep_best`` the best epoch's weights are kept in memory.
"""

from __future__ import annotations

import copy
import json
import os
import posixpath
import resource
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel

from xmr.checkpoint import (BEST, CHECKPOINT_FILES, CheckpointError, checkpoint_epoch, checkpoint_name,
                            fetch_checkpoint, load_checkpoint, load_train_state, save_checkpoint, save_train_state)
from xmr.config import Config
from xmr.data.manifest import Manifest, load_manifest
from xmr.data.reader import Loader, loader_for, to_device
from xmr.distributed import all_gather_objects, all_reduce_sum, broadcast_object, world_info
from xmr.method import Method
from xmr.progress_line import progress_every
from xmr.runtime import Runtime
from xmr.tasks import family_of
from xmr.tasks.evaluate import evaluate
from xmr.train.pretrained import load_pretrained
from xmr.train.progress import EpochProgress, epoch_line, say
from xmr.train.runfs import RunDir
from xmr.train.step import EpochMeter, TrainStep, patience_exhausted, schedule
from xmr.train.tracking import Tracker

_P = 2_147_483_647  # prime modulus keeping Σ index² in int64 for any split size


def _silent(message: str) -> None:
    pass


# --------------------------------------------------------------------------- where the loop runs


class LocalHooks:
    """This process alone. A checkpoint is copied into the run folder (under a temporary
    name, then renamed, on local disk) and the run keeps what Ray Train keeps: the best
    ``storage.keep_checkpoints`` by the checkpoint metric (ties to the later epoch) and the
    newest, so a run trained here resumes, serves and compares like a Ray Train run."""

    def __init__(self, verbose: bool = True) -> None:
        self.verbose = verbose

    def device(self, cfg: Config) -> torch.device:
        return torch.device("cuda", 0) if cfg.resources.use_gpu and torch.cuda.is_available() else torch.device("cpu")

    def nodes(self) -> int:
        return 1

    def restored(self):
        """A checkpoint the runner holds for this run besides its folder (none here)."""
        return None

    def report(self, w: "Worker", row: dict[str, Any], directory: str | None, name: str | None) -> None:
        """Called on every rank; ``directory`` (rank 0) is the epoch's checkpoint to persist."""
        if directory is not None and w.run is not None:
            persist_checkpoint(w.run, directory, name)
            prune_checkpoints(w.run, w.history_scores(), w.cfg.storage.keep_checkpoints, w.mode,
                              newest=checkpoint_epoch(name))

    def recorded(self, row: dict[str, Any]) -> None:
        """Rank 0, after ``metrics.csv`` and ``best.json`` name the epoch."""


def persist_checkpoint(run: RunDir, directory: str, name: str) -> None:
    import pyarrow.fs as pafs

    target = posixpath.join(run.path, name)
    if isinstance(run.fs, pafs.LocalFileSystem):
        staging = f"{target}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(directory, staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    else:
        pafs.copy_files(directory, target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=run.fs)


def prune_checkpoints(run: RunDir, scores: dict[int, float], keep: int, mode: str, newest: int | None = None) -> list[int]:
    """Delete the run folder's checkpoints outside the best ``keep`` (by ``scores``, ties to
    the later epoch) and ``newest`` (the one just persisted; default the highest epoch
    present); returns the epochs deleted."""
    present = [epoch for epoch, _ in _complete_on_storage(run)]
    if not present:
        return []
    sign = 1 if mode == "max" else -1
    nan = float("-inf")
    ranked = sorted(present, key=lambda e: (sign * scores.get(e, nan) if scores.get(e) == scores.get(e) else nan, e),
                    reverse=True)
    kept = set(ranked[:keep]) | {max(present) if newest is None else newest}
    gone = [e for e in present if e not in kept]
    for epoch in gone:
        run.fs.delete_dir(posixpath.join(run.path, checkpoint_name(epoch)))
    return gone


# --------------------------------------------------------------------------- the run's state


@dataclass
class Worker:
    """What one rank holds for the whole run."""

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
    run: RunDir | None  # the run folder (every rank reads it on resume; rank 0 writes it); None: in memory
    num_nodes: int = 1
    say: Callable[[str], None] = _silent  # rank 0's progress lines
    tracker: Tracker = field(default_factory=Tracker)  # MLflow, rank 0 only
    history: list[dict[str, Any]] = field(default_factory=list)

    def history_scores(self) -> dict[int, float]:
        return {int(r["epoch"]): float(r[self.metric]) for r in self.history
                if r.get("epoch", 0) >= 1 and r.get(self.metric) is not None}


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


@dataclass
class FitResult:
    method: Method  # the last epoch's weights, or the best epoch's with keep_best (in memory)
    metric: str
    mode: str
    history: list[dict[str, Any]]  # one row per evaluation (epoch 0: untrained)
    best: dict[str, Any] | None  # metric, value, epoch, checkpoint (None in memory)
    run_uri: str | None = None

    @property
    def best_epoch(self) -> int | None:
        return int(self.best["epoch"]) if self.best else None


# --------------------------------------------------------------------------- the loop


def fit(cfg: Config, hooks=None, *, run: RunDir | None = None, metric: str | None = None, mode: str | None = None,
        score_untrained: bool = True, keep_best: bool = False, runtime: Runtime | None = None) -> FitResult:
    """Train a resolved, checked config (``xmr.train.driver.prepare``: it is not checked
    again here) with ``hooks`` (default ``LocalHooks``) for ``optim.epochs`` epochs, or fewer
    with ``optim.patience``; the checkpoint metric is ``metric`` (default
    ``storage.checkpoint_metric`` or the task's main metric). ``runtime``: the process's
    settings (MLflow's cache and verbosity, evaluation's progress interval)."""
    runtime = runtime or Runtime()
    with progress_every(runtime.progress_every_s):
        return _fit(cfg, hooks if hooks is not None else LocalHooks(), run, metric, mode, score_untrained,
                    keep_best, runtime)


def _fit(cfg: Config, hooks, run: RunDir | None, metric: str | None, mode: str | None, score_untrained: bool,
         keep_best: bool, runtime: Runtime) -> FitResult:
    w = set_up(cfg, hooks, run, metric or cfg.storage.checkpoint_metric or family_of(cfg).main_metric,
               mode or cfg.storage.checkpoint_mode)
    state = resume(w, hooks, runtime.cache)
    w.history = state.history  # one list, appended to by the loop: what pruning ranks checkpoints by
    if state.epoch >= cfg.optim.epochs:  # nothing left: report the final row again so the run ends cleanly
        last = state.history[-1] if state.history else {"epoch": state.epoch}
        hooks.report(w, last, None, None)
        if w.rank == 0:
            hooks.recorded(last)
        return FitResult(w.method, w.metric, w.mode, state.history, state.best, run.uri() if run else None)
    if run is not None:
        w.tracker = Tracker.for_run(cfg, run, w.rank, cfg.tracking.parent_run_id or None, say=w.say, runtime=runtime)
    if state.epoch == 0 and score_untrained:
        score_before_training(w, state)
    best_weights = None
    first, started = state.epoch, time.perf_counter()
    for epoch in range(first, cfg.optim.epochs):
        if patience_exhausted(state.history, w.metric, w.mode, cfg.optim.patience):  # the same on every rank
            w.say(f"[xmr] early stop after epoch {epoch}: no better {w.metric} for {cfg.optim.patience} epoch(s)")
            break
        stats = train_epoch(w, epoch)
        per_epoch = (time.perf_counter() - started) / (epoch + 1 - first)
        improved = record_epoch(w, hooks, state, epoch, stats, eta_s=per_epoch * (cfg.optim.epochs - epoch - 1))
        if keep_best and run is None and improved:
            best_weights = copy.deepcopy(w.method.state_dict())
    w.tracker.finish()
    if best_weights is not None:
        w.method.load_state_dict(best_weights)
    return FitResult(w.method, w.metric, w.mode, state.history, state.best, run.uri() if run else None)


def set_up(cfg: Config, hooks, run: RunDir | None, metric: str, mode: str) -> Worker:
    """Model (identical initial weights on every rank), DDP when there are several ranks,
    this rank's loader, the optimiser step."""
    rank, world = world_info()
    device = hooks.device(cfg)
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
        # torch 2.13 deprecates broadcast_buffers for forward_sync_buffers, whose False still
        # syncs buffers at init, and itself advises keeping broadcast_buffers=False for
        # rank-local buffers until init_sync_buffers exists: that one warning is silenced here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated", category=FutureWarning)
            module = DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None,
                                             static_graph=True, broadcast_buffers=False)
    step = TrainStep(method, cfg, total_steps=total, device=device, module=module)
    verbose = getattr(hooks, "verbose", True) and rank == 0
    return Worker(cfg, metric, mode, cfg.storage.run_name, rank, world, device, manifest, method, loader, steps, step,
                  run, hooks.nodes(), say if verbose else _silent)


def resume(w: Worker, hooks, cache_dir: str | None = None) -> RunState:
    """The newest checkpoint that loads: the run folder's complete checkpoints newest first,
    then the runner's own record (Ray Train's can lag one report behind a process killed
    right after a checkpoint was persisted; the folder is the truth, so that epoch is not
    trained again). A checkpoint that does not load (a truncated upload, a disk error) is
    skipped, with its reason, for the one before it, instead of failing every retry. A fresh
    run starts from ``model.pretrained`` when one is given. ``cache_dir``: the runtime's cache
    (where s3:// checkpoints are fetched to)."""
    loaded, skipped = (newest_loadable(w.run, hooks.restored(), w.cfg.data.endpoint_url, cache_dir)
                       if w.run is not None else (None, []))
    for note in skipped:
        w.say(f"[xmr] skipping checkpoint {note}")
    if loaded is None:
        if skipped:
            raise CheckpointError(f"{w.run_name}: no checkpoint loads ({'; '.join(skipped)}); relaunch with "
                                  f"another --run-name, or delete the damaged checkpoints")
        if w.cfg.model.pretrained:
            load_pretrained(w.method.model, str(fetch_checkpoint(w.cfg.model.pretrained, cache_dir=cache_dir,
                                                                 endpoint_url=w.cfg.data.endpoint_url)))
        return RunState()
    weights, meta, train_state = loaded
    w.method.load_state_dict(weights)
    w.step.load_state_dict({**train_state, "step": int(meta["step"])})
    torch.set_rng_state(train_state["rng"])
    state = RunState(int(meta["epoch"]), list(meta.get("history", [])), meta.get("best"),
                     int(meta.get("attempt", 1)) + 1)
    w.say(f"[xmr] resuming {w.run_name} after epoch {state.epoch} (step {w.step.step}, attempt {state.attempt})")
    return state


def newest_loadable(run: RunDir, restored, endpoint_url: str | None = None, cache_dir: str | None = None):
    """((weights, meta, training state) of the newest checkpoint that loads, or None; the
    ones skipped, each with why). Candidates: the run folder's complete checkpoints newest
    first, then the runner's own record (a Ray ``Checkpoint``; normally one of them)."""
    def read(directory):
        _, weights, meta = load_checkpoint(directory)
        return weights, meta, load_train_state(directory)

    skipped = []
    for epoch, uri in _complete_on_storage(run):
        try:
            return read(fetch_checkpoint(uri, endpoint_url=endpoint_url, cache_dir=cache_dir)), skipped
        except CheckpointError as exc:
            skipped.append(f"{checkpoint_name(epoch)}: {exc}")
    if restored is not None:
        try:
            with restored.as_directory() as d:
                return read(d), skipped
        except CheckpointError as exc:
            skipped.append(f"Ray's latest checkpoint: {exc}")
    return None, skipped


def score_before_training(w: Worker, state: RunState) -> None:
    """The metric before training, as the run's epoch-0 row."""
    before = evaluate(w.method, w.cfg, w.manifest, w.cfg.data.val_split)
    check_metric_name(w.metric, before)
    state.history.append({"epoch": 0, "step": 0, **before})
    w.tracker.log(before, step=0)
    w.say(f"[xmr] before training: {w.metric} {before[w.metric]:.4f}")


def train_epoch(w: Worker, epoch: int) -> EpochStats:
    """One pass over this rank's share (the same number of steps on every rank), counting
    which samples were trained on so the row can say whether each was seen exactly once."""
    w.loader.set_epoch(epoch)
    w.method.train()
    meter = EpochMeter()
    progress = EpochProgress.for_run(w.cfg, w.steps_per_epoch, epoch, enabled=w.say is not _silent)
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


def record_epoch(w: Worker, hooks, state: RunState, epoch: int, stats: EpochStats, eta_s: float) -> bool:
    """Validation over the whole split, the epoch row, the best so far, and rank 0's
    checkpoint, metrics.csv, best.json and epoch line. Returns whether the epoch is the new best."""
    t1 = time.perf_counter()
    val = evaluate(w.method, w.cfg, w.manifest, w.cfg.data.val_split)
    if epoch == 0 and not state.history:
        check_metric_name(w.metric, val)
    row: dict[str, Any] = {"epoch": epoch + 1, "step": w.step.step, **{f"train_{k}": v for k, v in stats.losses.items()},
                           **val, "train_samples": stats.n_samples,
                           "samples_per_s": stats.n_samples / max(stats.train_s, 1e-9), "train_s": stats.train_s,
                           "eval_s": time.perf_counter() - t1, "lr": w.step.scheduler.get_last_lr()[0]}
    if stats.exactly_once is not None:
        row["train_exactly_once"] = stats.exactly_once
    row.update(attempt=state.attempt, num_workers=w.world, num_nodes=w.num_nodes, run=w.run_name,
               max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # this process's peak
    state.history.append(row)
    state.epoch = epoch + 1
    improved = is_new_best(row.get(w.metric), state.best, w.mode)
    if improved:
        state.best = {"metric": w.metric, "value": row[w.metric], "epoch": epoch + 1,
                      "checkpoint": w.run.uri(checkpoint_name(epoch + 1)) if w.run is not None else None}
    if w.run is None:
        hooks.report(w, row, None, None)
        if w.rank == 0:
            hooks.recorded(row)
    elif w.rank == 0:
        # MLflow gets the row before the runner does: once the report is in, Tune may stop the
        # trial (ASHA) and kill this process, and an epoch Tune saw must be in MLflow.
        # metrics.csv lists checkpointed epochs and best.json names a checkpoint, so they
        # follow the report that persists it.
        w.tracker.log(row, step=epoch + 1)
        with tempfile.TemporaryDirectory(prefix="xmr-ckpt-") as tmp:
            save_checkpoint(tmp, w.method, w.cfg, metrics=row, epoch=epoch + 1, step=w.step.step,
                            history=state.history, best=state.best, attempt=state.attempt)
            save_train_state(tmp, {**w.step.state_dict(), "rng": torch.get_rng_state()})
            hooks.report(w, row, tmp, checkpoint_name(epoch + 1))
        w.run.write_text("metrics.csv", pd.DataFrame(state.history).to_csv(index=False))
        if state.best is not None:
            w.run.write_text(BEST, json.dumps(state.best, indent=2, default=float) + "\n")
        w.tracker.log_best(state.best)
        hooks.recorded(row)
    else:
        hooks.report(w, row, None, None)
    w.say(epoch_line(row, w.cfg.optim.epochs, w.metric, eta_s=eta_s))
    state.best = broadcast_object(state.best)
    return improved


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
    ``best.json`` names is always one that is kept."""
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


def fit_in_process(cfg: Config, *, epochs: int | None = None, max_steps_per_epoch: int | None = None,
                   evaluate_untrained: bool = True, keep_best: bool = False,
                   runtime: Runtime | None = None) -> FitResult:
    """``fit`` in this process with nothing written (notebooks, tests, benchmarks): a
    resolved config for ``epochs`` (default ``optim.epochs``) with the cosine schedule over
    that cap. With ``keep_best`` the returned method holds the best epoch's weights (by the
    checkpoint metric, ties to the later epoch), as a run's best checkpoint would. ``runtime``:
    the caller's (a ``model.pretrained`` on S3 is fetched into its cache)."""
    if epochs is not None:
        cfg.optim.epochs = epochs
    if max_steps_per_epoch is not None:
        cfg.optim.max_steps_per_epoch = max_steps_per_epoch
    return fit(cfg, LocalHooks(verbose=False), score_untrained=evaluate_untrained, keep_best=keep_best,
               runtime=runtime)
