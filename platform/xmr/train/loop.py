"""The per-worker training loop that Ray Train runs on every data-parallel worker.

Each worker reads its own share of the training shards (``make_loader`` with its rank), runs
the method under DDP (gloo on CPU, NCCL on GPU, bf16 autocast on GPU), evaluates the whole
validation split jointly with the other workers, and reports one row per epoch with a
checkpoint (model + optimiser + scheduler + resolved config + metrics). On a restart, after
a worker failure or a relaunch with the same run name, it resumes from the latest
checkpoint: the epochs already checkpointed are not trained again.
"""

from __future__ import annotations

import json
import math
import resource
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from xmr.checkpoint import BEST, META, load_checkpoint, load_train_state, save_checkpoint, save_train_state
from xmr.config import Config, from_dict
from xmr.data.manifest import load_manifest
from xmr.data.reader import make_loader
from xmr.losses.negatives import world_info
from xmr.method import Method
from xmr.train.evaluate import all_gather_objects, broadcast_object, evaluate_split, to_device
from xmr.train.progress import epoch_line, say
from xmr.train.runfs import RunDir

CHECKPOINT_PREFIX = "checkpoint_epoch"
_P = 2_147_483_647  # prime modulus keeping Σ index² in int64 for any split size


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    if cfg.optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=0.9, weight_decay=cfg.optim.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Linear warm-up, then constant or cosine decay to 0 over ``total`` steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def autocast_for(cfg: Config, device: torch.device):
    """bf16 autocast on GPU unless fp32 is asked for; fp32 on CPU unless bf16 is asked for."""
    wanted = cfg.optim.precision
    if wanted == "bf16" or (wanted == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _reduce_means(sums: dict[str, float], count: int, device: torch.device) -> dict[str, float]:
    """Mean of each logged term over every step of every rank."""
    names = sorted(sums)
    t = torch.tensor([sums[n] for n in names] + [float(count)], dtype=torch.float64, device=device)
    if world_info()[1] > 1:
        dist.all_reduce(t)
    return {n: float(v) / max(1.0, float(t[-1])) for n, v in zip(names, t[:-1].tolist())}


def _newest_on_storage(run: RunDir) -> tuple[int, str] | None:
    """(epoch, URI) of the newest complete ``checkpoint_epochNNNN`` in the run folder."""
    import pyarrow.fs as pafs

    best = None
    for info in run.fs.get_file_info(pafs.FileSelector(run.path, allow_not_found=True)):
        name = info.base_name
        if info.type != pafs.FileType.Directory or not name.startswith(CHECKPOINT_PREFIX):
            continue
        files = {f.base_name for f in run.fs.get_file_info(pafs.FileSelector(info.path))}
        if {"model.safetensors", "meta.json", "train_state.pt", "config.yaml"} <= files:
            epoch = int(name[len(CHECKPOINT_PREFIX):])
            if best is None or epoch > best[0]:
                best = (epoch, run.uri(name))
    return best


def _resume(method: Method, optimizer, scheduler, run: RunDir, endpoint_url: str | None):
    """Load the latest checkpoint: Ray Train's, or a newer complete one in the run folder.

    A process killed right after a checkpoint was persisted can leave Ray's checkpoint
    record one report behind; the folder is the truth, so that epoch is not trained again.
    Returns (start epoch, step, history, best, attempt); attempt counts the loop's starts.
    """
    import ray.train

    from xmr.checkpoint import CheckpointError, fetch_checkpoint

    checkpoint = ray.train.get_checkpoint()
    newest = _newest_on_storage(run)
    ray_epoch = -1
    if checkpoint is not None:  # its epoch only: meta.json, not the weights
        with checkpoint.as_directory() as d:
            ray_epoch = int(json.loads((Path(d) / META).read_text()).get("epoch", -1))
    source = None
    if newest is not None and newest[0] > ray_epoch:
        try:
            source = str(fetch_checkpoint(newest[1], endpoint_url=endpoint_url))
        except CheckpointError:
            source = None
    if source is None and checkpoint is None:
        return 0, 0, [], None, 1
    ctx = checkpoint.as_directory() if source is None else nullcontext(source)
    with ctx as d:
        _, state, meta = load_checkpoint(d)
        method.load_state_dict(state)
        train_state = load_train_state(d)
    optimizer.load_state_dict(train_state["optimizer"])
    scheduler.load_state_dict(train_state["scheduler"])
    torch.set_rng_state(train_state["rng"])
    return (int(meta["epoch"]), int(meta["step"]), list(meta.get("history", [])), meta.get("best"),
            int(meta.get("attempt", 1)) + 1)


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg: Config = from_dict(payload["config"])
    metric, mode = payload["metric"], payload["mode"]
    rank, world = world_info()
    device = ray.train.torch.get_device()
    manifest = load_manifest(cfg.data.path, endpoint_url=cfg.data.endpoint_url)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    method = Method(cfg)
    loader = make_loader(cfg.data.path, cfg.data.train_split, local_batch_size=max(1, cfg.data.batch_size // world),
                         rank=rank, world_size=world, num_workers=cfg.data.num_workers, seed=cfg.seed,
                         shuffle=True, mode=cfg.data.split_mode, on_bad_sample=cfg.data.on_bad_sample,
                         max_clips=cfg.data.max_clips, max_query_tokens=cfg.data.max_query_tokens,
                         endpoint_url=cfg.data.endpoint_url, manifest=manifest)
    steps_per_epoch = min(loader.steps, cfg.optim.max_steps_per_epoch or loader.steps)
    total_steps = steps_per_epoch * cfg.optim.epochs
    optimizer = make_optimizer(cfg, method.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.optim.warmup_steps, cfg.optim.scheduler))
    # every rank reads the same checkpoint (rank 0's run folder view is the same storage)
    run_view = RunDir(payload["storage_root"], payload["run_name"], cfg.data.endpoint_url)
    start_epoch, step, history, best, attempt = _resume(method, optimizer, scheduler, run_view, cfg.data.endpoint_url)
    if start_epoch == 0 and cfg.model.pretrained:
        from xmr.checkpoint import fetch_checkpoint
        from xmr.models.registry import load_pretrained

        load_pretrained(method.model, str(fetch_checkpoint(cfg.model.pretrained, endpoint_url=cfg.data.endpoint_url)))
    method.to(device)
    for state in optimizer.state.values():  # resumed optimiser state follows the model's device
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                state[k] = v.to(device)
    ddp = method
    if world > 1:
        # static_graph: terms switched off (λ = 0) or ablated branches leave the same parameters
        # without gradient every step, which DDP then handles without a per-step graph walk.
        ddp = DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None,
                                      static_graph=True)
    num_nodes = len(set(all_gather_objects(ray.get_runtime_context().get_node_id())))
    run = run_view if rank == 0 else None
    if rank == 0 and start_epoch:
        say(f"[xmr] resuming {payload['run_name']} after epoch {start_epoch} (step {step}, attempt {attempt})")
    if start_epoch >= cfg.optim.epochs:  # nothing left: report the final row again so the run ends cleanly
        ray.train.report(history[-1] if history else {"epoch": start_epoch})
        return

    if start_epoch == 0:  # the metric before training, as the run's epoch-0 row
        before = evaluate_split(method.model, cfg, manifest, cfg.data.val_split)
        check_metric_name(metric, before)
        history.append({"epoch": 0, "step": 0, **before})
        if rank == 0:
            say(f"[xmr] before training: {metric} {before[metric]:.4f}")

    params = [p for p in method.parameters() if p.requires_grad]
    started = time.perf_counter()
    for epoch in range(start_epoch, cfg.optim.epochs):
        loader.set_epoch(epoch)
        method.train()
        sums: dict[str, float] = {}
        n_steps, t0 = 0, time.perf_counter()
        seen = torch.zeros(3, dtype=torch.int64)  # count, Σ index, Σ index² mod P of the samples trained on
        for batch in to_device(loader, device):
            if n_steps >= steps_per_epoch:
                break
            with autocast_for(cfg, device):
                out = ddp(batch)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            n_steps += 1
            index = batch["index"].detach().to("cpu", torch.int64)
            seen += torch.stack([torch.tensor(len(index)), index.sum(), (index * index % _P).sum() % _P])
            for name, value in out.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
        train_s = time.perf_counter() - t0
        seen = seen.to(device)
        if world > 1:
            dist.all_reduce(seen)
        n_samples = int(seen[0].item())
        losses = _reduce_means(sums, n_steps, device)
        t1 = time.perf_counter()
        val = evaluate_split(method.model, cfg, manifest, cfg.data.val_split)
        eval_s = time.perf_counter() - t1
        row: dict[str, Any] = {"epoch": epoch + 1, "step": step, **{f"train_{k}": v for k, v in losses.items()},
                               **val, "train_samples": n_samples, "samples_per_s": n_samples / max(train_s, 1e-9),
                               "train_s": train_s, "eval_s": eval_s, "lr": scheduler.get_last_lr()[0]}
        if cfg.task != "vcmr":  # sample indices are 0..N-1: count and power sums pin down "each exactly once"
            n = loader.num_samples
            row["train_exactly_once"] = bool(n_samples == n and int(seen[1]) == n * (n - 1) // 2
                                             and int(seen[2]) % _P == (n - 1) * n * (2 * n - 1) // 6 % _P)
        row["attempt"], row["num_workers"], row["num_nodes"] = attempt, world, num_nodes
        row["run"] = payload["run_name"]
        row["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this worker's peak
        history.append(row)
        if is_new_best(row.get(metric), best, mode):
            best = {"metric": metric, "value": row[metric], "epoch": epoch + 1,
                    "checkpoint": None}  # filled in by rank 0 below
        name = f"{CHECKPOINT_PREFIX}{epoch + 1:04d}"
        if rank == 0:
            assert run is not None
            if best is not None and best["epoch"] == epoch + 1:
                best["checkpoint"] = run.uri(name)
            with tempfile.TemporaryDirectory(prefix="xmr-ckpt-") as tmp:
                save_checkpoint(tmp, method, cfg, metrics=row, epoch=epoch + 1, step=step, history=history, best=best,
                                attempt=attempt)
                save_train_state(tmp, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                       "rng": torch.get_rng_state()})
                ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
            run.write_text("metrics.csv", pd.DataFrame(history).to_csv(index=False))
            if best is not None:
                run.write_text(BEST, _json(best))
            elapsed = time.perf_counter() - started
            done = epoch + 1 - start_epoch
            say(epoch_line(row, cfg.optim.epochs, metric, eta_s=elapsed / done * (cfg.optim.epochs - epoch - 1)))
        else:
            ray.train.report(row)
        best = broadcast_object(best)


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


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=float) + "\n"
