"""Training in this process, without Ray: the worker's own step and evaluation, for
notebooks, tests, benchmarks and comparison trials that must measure exactly what a Ray
Train run does (``xmr.train.step.TrainStep``, ``xmr.tasks.evaluate.evaluate``) on one process."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from xmr.config import Config
from xmr.data.manifest import load_manifest
from xmr.data.reader import loader_for
from xmr.method import Method
from xmr.tasks import family_of
from xmr.tasks.evaluate import evaluate
from xmr.train.pretrained import load_pretrained
from xmr.train.step import EpochMeter, TrainStep, best_epoch, patience_exhausted, schedule


@dataclass
class LocalRun:
    method: Method  # the last epoch's weights, or the best epoch's with keep_best
    metric: str
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per evaluation (epoch 0: untrained)
    best_epoch: int | None = None


def fit_in_process(cfg: Config, *, epochs: int | None = None, max_steps_per_epoch: int | None = None,
                   eval_split: str | None = None, evaluate_untrained: bool = True, keep_best: bool = False,
                   on_epoch: Callable[[dict[str, Any]], None] | None = None) -> LocalRun:
    """Train a resolved config (``xmr.checks.resolve``) for ``epochs`` (default
    ``optim.epochs``, or fewer with ``optim.patience``) with the cosine schedule over that
    cap, scoring ``eval_split`` (default ``data.val_split``) after every epoch. With
    ``keep_best`` the returned method holds the best epoch's weights (by the checkpoint
    metric, ties to the later epoch), as a run's best checkpoint would."""
    if epochs is not None:
        cfg.optim.epochs = epochs
    if max_steps_per_epoch is not None:
        cfg.optim.max_steps_per_epoch = max_steps_per_epoch
    split = eval_split or cfg.data.val_split
    metric = cfg.storage.checkpoint_metric or family_of(cfg).main_metric
    mode = cfg.storage.checkpoint_mode
    manifest = load_manifest(cfg.data.path, endpoint_url=cfg.data.endpoint_url)
    torch.manual_seed(cfg.seed)
    method = Method(cfg)
    if cfg.model.pretrained:
        load_pretrained(method.model, cfg.model.pretrained)
    loader = loader_for(cfg, cfg.data.train_split, train=True, unit=method.family.train_unit, manifest=manifest)
    steps, total = schedule(cfg, loader.steps)
    step = TrainStep(method, cfg, total_steps=total)
    run = LocalRun(method, metric)
    if evaluate_untrained:
        run.history.append({"epoch": 0, **evaluate(method, cfg, manifest, split)})
    best_state = None
    for epoch in range(cfg.optim.epochs):
        if patience_exhausted(run.history, metric, mode, cfg.optim.patience):
            break
        loader.set_epoch(epoch)
        method.train()
        meter = EpochMeter()
        for i, batch in enumerate(loader):
            if i >= steps:
                break
            meter.add(step(batch))
        row = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in meter.means(torch.device("cpu")).items()},
               **evaluate(method, cfg, manifest, split)}
        run.history.append(row)
        if keep_best and best_epoch(run.history, metric, mode) == epoch + 1:
            best_state = copy.deepcopy(method.state_dict())
        if on_epoch is not None:
            on_epoch(row)
    run.best_epoch = best_epoch(run.history, metric, mode)
    if keep_best and best_state is not None:
        method.load_state_dict(best_state)
    return run
