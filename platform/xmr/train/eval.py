"""``xmr eval``: a checkpoint (or a run's / sweep's best) scored on a dataset split, with the
family's files beside the metrics (TVR predictions for VCMR, per-query ranks for category
and pair), by the same evaluation the trainer runs each epoch.

In this process by default; ``workers`` > 1 runs it over Ray Train workers, each encoding
and ranking its share of the corpus and queries exactly as training's evaluation does,
rank 0 writing the files. A checkpoint whose task or input dimensions do not fit the data
fails before any work, naming both.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

from xmr.checks import check
from xmr.checkpoint import fetch_checkpoint, load_checkpoint
from xmr.config import Config, ConfigError
from xmr.data import storage
from xmr.data.manifest import Manifest, load_manifest
from xmr.distributed import all_gather_objects, world_info
from xmr.method import load_model
from xmr.progress_line import progress_every
from xmr.runtime import Runtime
from xmr.tasks import family_of

METRICS = "metrics.json"


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    files: dict[str, str]  # name -> URI of what was written
    seconds: float


def fit_data(cfg: Config, manifest: Manifest, data: str) -> None:
    """The checkpoint's task and input dimensions must be the dataset's (ConfigError naming both)."""
    fam = family_of(cfg)
    if manifest.task != fam.dataset_task:
        raise ConfigError(f"the checkpoint is a {cfg.task!r} model (it reads {fam.dataset_task!r} datasets), but "
                          f"{data!r} is a {manifest.task!r} dataset")
    for role, shape in cfg.model.dims.items():
        have = list(manifest.modalities[role].shape) if role in manifest.modalities else None
        if have != list(shape):
            raise ConfigError(f"the checkpoint's {role!r} inputs are {list(shape)}, but {data!r} has "
                              + (f"{have}" if have is not None else f"no {role!r} modality")
                              + f" (modalities {{{', '.join(f'{r}: {list(m.shape)}' for r, m in manifest.modalities.items())}}})")


def prepare_eval(checkpoint: str, data: str | None, split: str | None, endpoint_url: str | None = None,
                 runtime: Runtime | None = None):
    """(local checkpoint dir, its config pointed at ``data``, manifest, split), all checked."""
    local = fetch_checkpoint(checkpoint, endpoint_url=endpoint_url, cache_dir=(runtime or Runtime()).cache)
    cfg, _, _ = load_checkpoint(local)
    if data:
        cfg.data.path = data if storage.is_s3(data) else os.path.abspath(data)
    if endpoint_url:
        cfg.data.endpoint_url = endpoint_url
    try:
        manifest = load_manifest(cfg.data.path, endpoint_url=cfg.data.endpoint_url)
    except Exception as exc:
        raise ConfigError(f"--data {cfg.data.path!r}: dataset not readable ({exc})") from None
    fit_data(cfg, manifest, cfg.data.path)
    split = split or cfg.data.test_split
    if split not in manifest.splits:
        raise ConfigError(f"--split {split!r}: not in {cfg.data.path!r} (splits: {sorted(manifest.splits)})")
    return str(local), check(cfg), manifest, split


def evaluate_files(local: str, cfg: Config, manifest: Manifest, split: str, nms: float | None):
    """On every rank: this rank's detailed share; on rank 0 (after gathering), the metrics and
    files, else (None, None)."""
    import torch

    model, _ = load_model(local, cfg)  # cfg: checked by prepare_eval
    model.eval()
    fam = family_of(cfg)
    with torch.no_grad():
        shares = all_gather_objects(fam.score_share(model, cfg, manifest, split, detailed=True, nms=nms))
    if world_info()[0] != 0:
        return None, None
    return fam.outputs(shares, cfg, manifest, nms=nms)


def write_outputs(out: str, metrics: dict[str, Any], files: dict[str, str], meta: dict[str, Any],
                  endpoint_url: str | None = None) -> dict[str, str]:
    written = {}
    for name, text in {METRICS: json.dumps({**meta, "metrics": metrics}, indent=2, default=float), **files}.items():
        written[name] = storage.join(out, name)
        storage.write_bytes(written[name], text.encode(), endpoint_url=endpoint_url)
    return written


def _eval_loop(payload: dict[str, Any]) -> None:
    """One Ray Train worker of ``xmr eval --workers N``."""
    import ray.train

    from xmr.config import from_dict

    runtime = Runtime.from_dict(payload.get("runtime"))
    cfg = from_dict(payload["config"])
    local = str(fetch_checkpoint(payload["checkpoint"], endpoint_url=cfg.data.endpoint_url, cache_dir=runtime.cache))
    manifest = load_manifest(cfg.data.path, endpoint_url=cfg.data.endpoint_url)
    with progress_every(runtime.progress_every_s):
        metrics, files = evaluate_files(local, cfg, manifest, payload["split"], payload["nms"])
    if metrics is not None:
        write_outputs(payload["out"], metrics, files, payload["meta"], cfg.data.endpoint_url)
    ray.train.report({"done": 1})


def run_eval(checkpoint: str, out: str, *, data: str | None = None, split: str | None = None,
             nms: float | None = None, workers: int = 1, address: str | None = None,
             endpoint_url: str | None = None, verbose: bool = True, runtime: Runtime | None = None) -> EvalResult:
    """Score ``checkpoint`` on ``split`` and write ``out`` (see the module's docstring); the
    runtime gives the cache, the progress interval and, without ``address``, the cluster."""
    runtime = runtime or Runtime()
    if nms is not None and not 0 < nms < 1:
        raise ConfigError(f"--nms {nms}: an IoU threshold in (0, 1)")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be >= 1")
    t0 = time.perf_counter()
    local, cfg, manifest, split = prepare_eval(checkpoint, data, split, endpoint_url, runtime)
    out = out if storage.is_s3(out) else os.path.abspath(out)
    meta = {"checkpoint": checkpoint, "data": cfg.data.path, "split": split, "task": cfg.task, "nms": nms,
            "workers": workers}
    if verbose:
        info = manifest.splits[split]
        n = info.num_queries if info.num_queries is not None else info.num_samples
        print(f"[xmr] evaluating {cfg.method} ({cfg.task}) on {cfg.data.path} split {split!r}: {info.num_samples} "
              f"items, {n} queries" + (f", {workers} Ray workers" if workers > 1 else ", in this process"), flush=True)
    if workers == 1:
        with progress_every(runtime.progress_every_s):
            metrics, files = evaluate_files(local, cfg, manifest, split, nms)
        written = write_outputs(out, metrics, files, meta, cfg.data.endpoint_url)
    else:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from xmr.ray.session import ensure_ray

        ensure_ray(address, runtime=runtime, need_cpus=workers)
        ckpt = checkpoint if storage.is_s3(checkpoint) else local
        TorchTrainer(_eval_loop, train_loop_config={"config": cfg.to_dict(), "checkpoint": ckpt, "split": split,
                                                      "nms": nms, "out": out, "meta": meta,
                                                      "runtime": runtime.to_dict()},
                     torch_config=TorchConfig(backend="gloo"),
                     scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(name=f"eval-{int(time.time())}",
                                          storage_path=os.path.abspath(os.path.expanduser("~/ray_results")))).fit()
        metrics = json.loads(storage.read_bytes(storage.join(out, METRICS), endpoint_url=cfg.data.endpoint_url))["metrics"]
        written = {n: storage.join(out, n) for n in (METRICS, *family_of(cfg).output_files)}
    result = EvalResult(metrics, written, time.perf_counter() - t0)
    if verbose:
        main = family_of(cfg).main_metric
        print(f"[xmr] {main} = {metrics.get(main, float('nan')):.4f}; wrote " + ", ".join(written.values())
              + f" ({result.seconds:.1f} s)", flush=True)
    return result
