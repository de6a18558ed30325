"""The offline builder of sharded indexes (``xmr index build --shards N``): a Ray Data job
that encodes the gallery's N contiguous parts (layout and why contiguous: ``xmr.serve.shards``).

Kept apart from ``xmr.serve.shards``, which the request-time gateway imports: building pulls
in Ray Data, the model's encoders and FAISS training, none of which a query needs.

The parts are encoded by a Ray Data job (``map_batches`` with a model per worker, one shard
per call), so N shards build on as many workers as the cluster gives; a shard is written
to a temporary folder and renamed when complete, so an interrupted build resumes by
encoding only the shards that are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from xmr.data import storage
from xmr.progress_line import progress_every
from xmr.runtime import Runtime
from xmr.serve.shards import FORMAT, SHARDS_FILE, is_complete, resident_bytes, shard_name


def _identity(checkpoint: str, gallery: str | None, split: str, approx: str) -> dict[str, Any]:
    """What makes two shard folders parts of the same index (a resumed build checks it)."""
    return {"checkpoint": checkpoint, "gallery": gallery, "split": split, "approx": approx}


def _check_resumable(out: str, done: list[int], shards: int, identity: dict[str, Any],
                     endpoint_url: str | None) -> None:
    """Refuse to finish a build whose existing shards came from another checkpoint, dataset,
    split, approx setting or shard count: mixing them would serve two indexes as one."""
    for i in done:
        meta = json.loads(storage.read_bytes(storage.join(out, shard_name(i), "index.json"), endpoint_url=endpoint_url))
        theirs = meta.get("shard") or {}
        differs = {k: (theirs.get(k), v) for k, v in {"of": shards, **identity}.items() if theirs.get(k) != v}
        if differs:
            what = "; ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in differs.items())
            raise ValueError(f"{out}: {shard_name(i)} belongs to another build ({what}); remove the folder or "
                             "choose another --out")


def _publish(tmp: Path, folder: str, endpoint_url: str | None) -> None:
    """Put a finished shard in place: renamed locally; on S3 every file uploaded, index.json
    last, so a shard that is there is whole."""
    if not storage.is_s3(folder):
        if Path(folder).exists():  # an incomplete folder left by a build that died before the rename
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return
    rest = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file() and p.name != "index.json")
    storage.upload_dir(str(tmp), folder, endpoint_url=endpoint_url, progress=False, files=rest)
    storage.upload_dir(str(tmp), folder, endpoint_url=endpoint_url, progress=False, files=["index.json"])
    shutil.rmtree(tmp, ignore_errors=True)


def build_one(model_cfg, checkpoint: str, gallery: str | None, split: str, out: str, shard: int, shards: int,
              approx: str, ann_args: dict[str, Any] | None, endpoint_url: str | None,
              cache_dir: str | None = None) -> dict[str, Any]:
    """Encode part ``shard`` of ``shards`` into ``out/shard-NNN`` (written beside, then renamed
    into place) and say what it holds; a part already complete is read back, not redone.
    ``cache_dir``: the runtime's cache (an s3:// checkpoint's local copy)."""
    from xmr.serve.gallery import load_for_serving, save_index
    from xmr.tasks.ann import AnnConfig

    folder = storage.join(out, shard_name(shard))
    if is_complete(folder, endpoint_url):  # built by an earlier run (build_sharded checked it is of this build)
        meta = json.loads(storage.read_bytes(storage.join(folder, "index.json"), endpoint_url=endpoint_url))
        return {"shard": shard, "items": meta["gallery_size"], "build_s": 0.0, "resumed": True,
                "recalls": meta.get("approx_recall_at_10") or {}, "search": meta.get("search")}
    t0 = time.perf_counter()
    loaded = load_for_serving(checkpoint, gallery, split, approx=approx, endpoint_url=endpoint_url,
                              ann=AnnConfig(**ann_args) if ann_args else None, part=(shard, shards),
                              model_cfg=model_cfg, cache_dir=cache_dir)
    loaded.info["shard"] = {"index": shard, "of": shards, **_identity(checkpoint, gallery, split, approx)}
    loaded.info["resident_bytes"] = resident_bytes(loaded)
    scratch = Path(tempfile.gettempdir()) if storage.is_s3(out) else Path(out)
    tmp = scratch / f".{shard_name(shard)}.{uuid.uuid4().hex[:8]}.partial"
    save_index(tmp, loaded, getattr(loaded.gallery, "recalls", {}))
    _publish(tmp, folder, endpoint_url)
    return {"shard": shard, "items": loaded.gallery.size, "build_s": round(time.perf_counter() - t0, 3),
            "resumed": False, "recalls": getattr(loaded.gallery, "recalls", {}), "search": loaded.info["search"]}


class ShardEncoder:
    """Ray Data's callable class: one model per worker process, then one shard per call
    (``batch_size=1``), so a worker that encodes several shards loads the model once.
    ``runtime``: the driver's (``Runtime.to_dict``): its cache and its progress interval hold
    in the worker too."""

    def __init__(self, checkpoint: str, endpoint_url: str | None, job: dict[str, Any], gpu: bool = False,
                 runtime: dict[str, Any] | None = None) -> None:
        import torch

        from xmr.checkpoint import fetch_checkpoint
        from xmr.method import load_model

        self.runtime = Runtime.from_dict(runtime)
        model, cfg = load_model(fetch_checkpoint(checkpoint, endpoint_url=endpoint_url, cache_dir=self.runtime.cache))
        if gpu and torch.cuda.is_available():
            model = model.cuda()
        self.model_cfg, self.checkpoint, self.endpoint_url, self.job = (model, cfg), checkpoint, endpoint_url, job

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        with progress_every(self.runtime.progress_every_s):  # the encoding loop's line, at the driver's interval
            rows = [build_one(self.model_cfg, self.checkpoint, endpoint_url=self.endpoint_url, shard=int(i),
                              cache_dir=self.runtime.cache, **self.job) for i in batch["shard"]]
        return {"summary": [json.dumps(r, default=float) for r in rows]}


def quiet_ray_data(verbose: bool = False) -> None:
    """Ray Data's own lines (its plan, the logged progress a non-terminal gets, its progress
    bars on a terminal) in its log files only, unless ``--verbose``: xmr prints a line per
    shard with the items per second and an ETA. Ray Data configures its ``ray.data`` logger
    when ``ray.data`` is imported (its console handler at INFO), hence the import first: a
    level set before it is reset then."""
    import logging

    import ray.data

    if verbose:
        return
    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):  # its console; the file keeps everything
            handler.setLevel(logging.ERROR)


def build_sharded(checkpoint: str, gallery: str | None, split: str, out: str, shards: int, *, approx: str = "auto",
                  ann_args: dict[str, Any] | None = None, endpoint_url: str | None = None,
                  address: str | None = None, workers: int = 0, cpus_per_worker: float = 1.0,
                  gpu: bool = False, runtime: Runtime | None = None) -> dict[str, Any]:
    """Build (or finish building) a sharded index; returns its ``shards.json``.

    The missing shards are encoded by a Ray Data job over the cluster (``workers`` model
    replicas, 0: as many as there are shards to build and CPUs for them); each shard's
    summary is printed as it lands. ``out`` must be a folder every worker can write (this
    machine, or a filesystem the cluster's nodes share). ``runtime``: the command's (its
    cache, progress interval and verbosity reach the workers in their arguments)."""
    import ray

    from xmr.checkpoint import fetch_checkpoint, load_checkpoint
    from xmr.data.manifest import load_manifest
    from xmr.ray.session import ensure_ray

    if shards < 1:
        raise ValueError(f"--shards {shards}: at least 1")
    runtime = runtime or Runtime()
    out = out if storage.is_s3(out) else os.path.abspath(out)
    gallery = os.path.abspath(gallery) if gallery and "://" not in gallery else gallery
    checkpoint = checkpoint if storage.is_s3(checkpoint) else os.path.abspath(checkpoint)
    cfg, _, _ = load_checkpoint(fetch_checkpoint(checkpoint, endpoint_url=endpoint_url, cache_dir=runtime.cache))
    root = gallery or cfg.data.path
    manifest = load_manifest(root, endpoint_url=endpoint_url)
    if split not in manifest.splits:
        raise ValueError(f"gallery {root!r} has no split {split!r} (splits: {sorted(manifest.splits)})")
    unit = "videos" if manifest.task == "vcmr" else "items"
    total = manifest.splits[split].num_samples
    if shards > total:
        raise ValueError(f"--shards {shards}: the split holds only {total} {unit}")
    if not storage.is_s3(out):
        Path(out).mkdir(parents=True, exist_ok=True)
        for stale in Path(out).glob(".shard-*.partial"):  # left by a build that died mid-write
            shutil.rmtree(stale, ignore_errors=True)
    todo = [i for i in range(shards) if not is_complete(storage.join(out, shard_name(i)), endpoint_url)]
    done = shards - len(todo)
    _check_resumable(out, [i for i in range(shards) if i not in todo], shards,
                     _identity(checkpoint, root, split, approx), endpoint_url)
    if storage.exists(storage.join(out, SHARDS_FILE), endpoint_url=endpoint_url) and todo:
        raise ValueError(f"{out}: a complete sharded index ({SHARDS_FILE}) with missing shard folders; remove "
                         f"{SHARDS_FILE} to rebuild them")
    print(f"[xmr] sharded index: {shards} shards of ~{total // shards} {unit} -> {out}"
          + (f" ({done} already built, resuming)" if done else ""), flush=True)
    if ann_args and not ann_args.get("build_threads"):
        # FAISS's default is every core of the machine; each worker has cpus_per_worker of them,
        # and workers that build at once would otherwise oversubscribe the cores, where
        # OpenMP's barriers wait on threads the kernel has descheduled
        ann_args = {**ann_args, "build_threads": max(1, int(cpus_per_worker))}
    job = {"gallery": root, "split": split, "out": out, "shards": shards, "approx": approx, "ann_args": ann_args}
    summaries: dict[int, dict[str, Any]] = {}
    if todo:
        ensure_ray(address, runtime=runtime, dashboard=False, driver_logs=runtime.verbose)
        quiet_ray_data(runtime.verbose)  # --verbose: Ray's and Ray Data's own lines too
        # never more actors than shards left: an idle actor still loads the model
        n_workers = min(len(todo), workers or max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_worker)))
        ds = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
        # one shard in flight per actor: a shard is one long task, and Ray Data's default (several
        # per actor) queues the shards of a short job on the first actor while the others idle
        # (2 shards on 2 workers built one after the other, measured)
        pool = ray.data.ActorPoolStrategy(size=n_workers, max_tasks_in_flight_per_actor=1)
        ds = ds.map_batches(ShardEncoder, batch_size=1, compute=pool,
                            num_cpus=cpus_per_worker, num_gpus=1 if gpu else None,
                            fn_constructor_kwargs={"checkpoint": checkpoint, "endpoint_url": endpoint_url,
                                                   "job": job, "gpu": gpu, "runtime": runtime.to_dict()})
        t0 = time.perf_counter()
        left = sum(part_sizes(total, shards)[i] for i in todo)
        for row in ds.iter_rows():
            s = json.loads(row["summary"])
            summaries[s["shard"]] = s
            line = progress_line(s, shards, len(summaries) + done, left, time.perf_counter() - t0, unit, summaries)
            print(f"[xmr] {line}", flush=True)
    return write_manifest(out, shards, checkpoint, root, split, total, endpoint_url)


def part_sizes(total: int, shards: int) -> list[int]:
    """Items of each contiguous part (the read plan's near-equal shares)."""
    from xmr.data.plan import near_equal

    return list(near_equal(total, shards))


def progress_line(s: dict[str, Any], shards: int, built: int, to_build: int, elapsed: float, unit: str,
                  summaries: dict[int, dict[str, Any]]) -> str:
    """One shard landed: its size and time, shards built, the job's rate and an ETA (the
    shards still to build at the rate so far)."""
    encoded = sum(x["items"] for x in summaries.values() if not x.get("resumed"))
    rate = encoded / elapsed if elapsed > 0 else 0.0
    remaining = max(0, to_build - encoded)
    eta = f"ETA {remaining / rate:.0f} s" if remaining and rate > 0 else "done"
    return (f"shard {s['shard'] + 1}/{shards}: {s['items']:,} {unit} in {s['build_s']:.1f} s "
            f"({built}/{shards} built, {elapsed:.0f} s; {rate:,.0f} {unit}/s; {eta})")


def write_manifest(out: str, shards: int, checkpoint: str, gallery: str, split: str, total: int,
                   endpoint_url: str | None = None) -> dict[str, Any]:
    """``shards.json`` over the complete shard folders of ``out`` (written last: a sharded
    index is complete when it is there); returns it."""

    def index_json(i: int) -> dict[str, Any]:
        return json.loads(storage.read_bytes(storage.join(out, shard_name(i), "index.json"), endpoint_url=endpoint_url))

    parts, offset = [], 0
    for i in range(shards):
        meta = index_json(i)
        parts.append({"path": shard_name(i), "items": int(meta["gallery_size"]), "offset": offset,
                      "search": meta.get("search"), "approx_recall_at_10": meta.get("approx_recall_at_10") or {},
                      "resident_bytes": meta.get("resident_bytes")})
        offset += int(meta["gallery_size"])
    if offset != total:
        raise ValueError(f"{out}: the shards hold {offset} items, the split {total}; remove the shard folders "
                         "and build again")
    first = index_json(0)
    meta = {"format": FORMAT, "items": total, "task": first["task"], "method": first["method"],
            "embed_dim": first["embed_dim"], "checkpoint": checkpoint, "gallery": gallery, "split": split,
            "search": sorted({p["search"] for p in parts}), "shards": parts, "manifest": first["manifest"],
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_bytes(storage.join(out, SHARDS_FILE), json.dumps(meta, indent=2, default=float).encode(),
                        endpoint_url=endpoint_url)
    return meta
