"""Training in this process, without Ray: the worker's own step and evaluation, for
notebooks, tests and benchmarks that must measure exactly what a Ray Train run does
(``xmr.train.step.TrainStep``, ``xmr.tasks.evaluate.evaluate``) on one process."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from xmr.config import Config
from xmr.data.manifest import load_manifest
from xmr.data.reader import loader_for
from xmr.method import Method
from xmr.tasks.evaluate import evaluate
from xmr.train.pretrained import load_pretrained
from xmr.train.step import EpochMeter, TrainStep, schedule


@dataclass
class LocalRun:
    method: Method
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per evaluation (epoch 0: untrained)


def fit_in_process(cfg: Config, *, epochs: int | None = None, max_steps_per_epoch: int | None = None,
                   eval_split: str | None = None, evaluate_untrained: bool = True,
                   on_epoch: Callable[[dict[str, Any]], None] | None = None) -> LocalRun:
    """Train a resolved config (``xmr.config.resolve``) for ``epochs`` (default
    ``optim.epochs``) with the cosine schedule over exactly those steps, scoring
    ``eval_split`` (default ``data.val_split``) after every epoch."""
    if epochs is not None:
        cfg.optim.epochs = epochs
    if max_steps_per_epoch is not None:
        cfg.optim.max_steps_per_epoch = max_steps_per_epoch
    split = eval_split or cfg.data.val_split
    manifest = load_manifest(cfg.data.path, endpoint_url=cfg.data.endpoint_url)
    torch.manual_seed(cfg.seed)
    method = Method(cfg)
    if cfg.model.pretrained:
        load_pretrained(method.model, cfg.model.pretrained)
    loader = loader_for(cfg, cfg.data.train_split, train=True, unit=method.family.train_unit, manifest=manifest)
    steps, total = schedule(cfg, loader.steps)
    step = TrainStep(method, cfg, total_steps=total)
    run = LocalRun(method)
    if evaluate_untrained:
        run.history.append({"epoch": 0, **evaluate(method, cfg, manifest, split)})
    for epoch in range(cfg.optim.epochs):
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
        if on_epoch is not None:
            on_epoch(row)
    return run
