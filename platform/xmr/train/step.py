"""One optimiser step of a Method, the same in a Ray Train worker and in process.

``TrainStep`` owns the optimiser (the model's parameters, and any group a term declares,
``LossTerm.param_groups``), the learning-rate schedule, autocast, clipping, the terms'
extra updates (``LossTerm.after_step``) and the per-term gradient-norm shares. ``EpochMeter`` averages what the steps record over an
epoch and over every rank.

Gradient shares (``tracking.grad_share_every``): every N steps, each term's weighted
gradient norm on the shared model parameters (not the terms' own) over the sum of the
terms' norms, so the shares of a step add up to 1. Why: a term scaled to nothing is
otherwise invisible (issue 11: the center loss's gradient was 0.1–0.4% of SupCon's at the
preset λ). Each share costs one extra backward through the encoders; they are computed
with ``torch.autograd.grad`` (never touching ``.grad``, so DDP's reducer is not involved)
and never on a process's first step, where DDP's static-graph set-up hooks the backward.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch

from xmr.config import Config
from xmr.distributed import all_reduce_sum


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Linear warm-up, then constant or cosine decay to 0 over ``total`` steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule(cfg: Config, loader_steps: int) -> tuple[int, int]:
    """(steps per epoch, total steps): the loader's steps capped by ``optim.max_steps_per_epoch``,
    times ``optim.epochs`` (the cosine schedule's length)."""
    per_epoch = min(loader_steps, cfg.optim.max_steps_per_epoch or loader_steps)
    return per_epoch, per_epoch * cfg.optim.epochs


def best_epoch(history: list[dict[str, Any]], metric: str, mode: str) -> int | None:
    """The epoch with the best ``metric`` (ties to the later epoch, as checkpoints keep), or None."""
    best, value = None, None
    for row in history:
        v = row.get(metric)
        if row.get("epoch", 0) < 1 or v is None or v != v:
            continue
        if value is None or (v >= value if mode == "max" else v <= value):
            best, value = int(row["epoch"]), v
    return best


def patience_exhausted(history: list[dict[str, Any]], metric: str, mode: str, patience: int) -> bool:
    """Early stopping: ``patience`` > 0 epochs have passed since the best validation metric."""
    if patience <= 0 or not history:
        return False
    best = best_epoch(history, metric, mode)
    return best is not None and int(history[-1]["epoch"]) - best >= patience


def autocast_for(cfg: Config, device: torch.device):
    """bf16 autocast on GPU unless fp32 is asked for; fp32 on CPU unless bf16 is asked for."""
    wanted = cfg.optim.precision
    if wanted == "bf16" or (wanted == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def param_groups(method, cfg: Config) -> list[dict[str, Any]]:
    """The model's and the terms' parameters at ``optim.lr``, except those a term trains in
    groups of its own (``LossTerm.param_groups``, e.g. a discriminator at ``loss.disc_lr``)."""
    own = [g for term in method.objective.terms.values() for g in term.param_groups(cfg.optim.lr)]
    apart = {id(p) for g in own for p in g["params"]}
    main = [p for p in method.trainable_parameters() if id(p) not in apart]
    return [{"params": main, "lr": cfg.optim.lr, "name": "model"}, *own]


def make_optimizer(cfg: Config, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW (or SGD with momentum 0.9). AdamW runs fused (one kernel over every parameter)
    wherever the parameters are floating point on CPU or CUDA: the same update as the
    per-parameter loop to float rounding, at a fifth of its time on CPU (issue 14: 14 ms ->
    3 ms a step for QACLN's 1.6 M parameters)."""
    if cfg.optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=0.9, weight_decay=cfg.optim.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=fused or None)


class TrainStep:
    """``step(batch)`` trains one batch and returns what it records (floats by name)."""

    def __init__(self, method, cfg: Config, total_steps: int, device: torch.device | None = None,
                 module: torch.nn.Module | None = None) -> None:
        self.method, self.cfg = method, cfg
        self.module = module if module is not None else method  # the DDP wrapper, when there is one
        self.device = device or torch.device("cpu")
        self.optimizer = make_optimizer(cfg, param_groups(method, cfg))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_steps, cfg.optim.warmup_steps, cfg.optim.scheduler))
        self.params = method.trainable_parameters()
        self.shared = [p for p in method.model.parameters() if p.requires_grad]
        self.terms = dict(method.objective.terms)
        self.step = 0  # optimiser steps of the run (set on resume)
        self._calls = 0  # steps taken by this process

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state.get("step", self.step))
        for st in self.optimizer.state.values():  # resumed optimiser state follows the model's device
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and k != "step":
                    st[k] = v.to(self.device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, float]:
        with autocast_for(self.cfg, self.device):
            out = self.module(batch)
        record = {k: float(v.detach()) for k, v in out.items() if not k.startswith("_")}
        every = self.cfg.tracking.grad_share_every
        if every and self._calls > 0 and self.step % every == 0 and len(out["_weighted"]) > 1:
            record.update(self._grad_shares(out["_weighted"]))
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        for name, term in self.terms.items():
            record.update({f"{name}_{k}": v for k, v in term.after_step(self.optimizer).items()})
        self.scheduler.step()
        self.step += 1
        self._calls += 1
        return record

    def _grad_shares(self, weighted: dict[str, torch.Tensor]) -> dict[str, float]:
        norms = {}
        for name, value in weighted.items():
            grads = torch.autograd.grad(value, self.shared, retain_graph=True, allow_unused=True)
            norms[name] = math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads if g is not None))
        total = sum(norms.values())
        return {f"grad_share_{name}": (n / total if total > 0 else 0.0) for name, n in norms.items()}


class EpochMeter:
    """Means of the recorded values over an epoch's steps (each value over the steps that
    recorded it), then over every rank."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, record: dict[str, float]) -> None:
        for k, v in record.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self, device: torch.device, names: list[str] | None = None) -> dict[str, float]:
        """Every rank must pass the same ``names`` (default: its own keys, which agree when
        every rank runs the same steps)."""
        names = sorted(names if names is not None else self.sums)
        t = torch.tensor([[self.sums.get(n, 0.0), float(self.counts.get(n, 0))] for n in names] or [[0.0, 0.0]],
                         dtype=torch.float64, device=device)
        all_reduce_sum(t)
        return {n: float(s) / c for n, (s, c) in zip(names, t.tolist()) if c > 0}
