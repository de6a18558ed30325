"""Sharded indexes: a gallery split cut into N contiguous parts, each a complete
``xmr index build`` folder of its own, served by a retriever deployment of its own.

Layout (``xmr index build --shards N --out DIR``)::

    DIR/shards.json      what the parts are (written last: its presence means complete)
    DIR/shard-000/       an ordinary index folder (index.json, embeddings, items, FAISS)
    DIR/shard-001/ ...

Why contiguous parts of the split's order (the read plan's rank shares, ``xmr.data.plan``)
and not a hash of the item id: a shard is then a pure function of the dataset's manifest
and (i, N), so any one shard can be rebuilt alone by reading only the WebDataset shards
that hold its range; and the concatenation of the parts is the unsharded gallery in its
order, so "item j of shard i" has one global position (``offset + j``) and a merge can
break ties exactly as one index would.

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

SHARDS_FILE = "shards.json"
FORMAT = "xmr-sharded-index-1"

# A retriever replica's process before its shard: Python, torch, Ray's worker and Serve's
# replica, FastAPI's models, the buffers of a batch. Measured: a replica serving a 47-item
# shard of the digits holds 480 MB of RSS once serving (3 replicas, 491,556..491,952 kB);
# rounded up for the batches a loaded replica holds.
REPLICA_BASE_BYTES = 640 * 2**20


def resident_bytes(loaded) -> int:
    """What a loaded index holds in memory, computed (not sampled): the bytes of every tensor
    and array of its gallery (each counted once: a table that serves both sides, or a view,
    shares its storage), its FAISS indexes (their serialised size, measured at build: the
    index's vectors, codes and links, which is what faiss keeps resident), the model's
    parameters, and the ids and labels as Python objects (``sys.getsizeof`` of each, plus the
    list's slots). Recorded in
    the index's index.json by ``xmr index build``; a replica asks Ray for this plus
    ``REPLICA_BASE_BYTES`` (``replica_memory``)."""
    import sys

    import numpy as np
    import torch

    seen: set[tuple[int, int]] = set()
    total = 0

    def add(x) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
        elif isinstance(x, np.ndarray):
            base = x if x.base is None else x.base
            key = (id(base), getattr(base, "nbytes", x.nbytes))
            if key not in seen:
                seen.add(key)
                total += x.nbytes
        elif isinstance(x, dict):
            for v in x.values():
                add(v)
        elif isinstance(x, (list, tuple)):
            if x and all(isinstance(v, (str, int, float, type(None))) for v in x[:64]):
                total += sys.getsizeof(x) + sum(sys.getsizeof(v) for v in x if v is not None)
            else:
                for v in x:
                    add(v)
        elif hasattr(x, "index") and hasattr(x, "bytes_per_item") and hasattr(x, "search_params"):  # AnnIndex
            # its serialised size, measured when it was built (bytes per item): not serialised
            # again here, which would hold a second copy of an HNSW index for a moment
            total += int(x.bytes_per_item * x.index.ntotal) if x.bytes_per_item == x.bytes_per_item else 0
        elif hasattr(x, "__dataclass_fields__"):
            for name in x.__dataclass_fields__:
                add(getattr(x, name))

    add(loaded.gallery)
    for p in loaded.model.parameters():
        add(p.data)
    return int(total)


def replica_memory(resident: int | None) -> int | None:
    """Bytes of memory a retriever replica asks Ray for: its shard's resident size and the
    replica process's own (None: an index built before the size was recorded asks nothing)."""
    return int(resident) + REPLICA_BASE_BYTES if resident else None


def shard_name(i: int) -> str:
    return f"shard-{i:03d}"


def is_sharded(path: str | None, endpoint_url: str | None = None) -> bool:
    return bool(path) and storage.exists(storage.join(str(path), SHARDS_FILE), endpoint_url=endpoint_url)


def read_shards(path: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """The sharded index's ``shards.json`` (local or s3://), checked: every part's folder is
    complete, offsets follow each other, counts add up. Each part's ``path`` becomes its
    full location (absolute, or its s3:// prefix: each shard's replicas download only theirs)."""
    try:
        meta = json.loads(storage.read_bytes(storage.join(path, SHARDS_FILE), endpoint_url=endpoint_url))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable sharded xmr index ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("shards"), list):
        raise ValueError(f"{path}/{SHARDS_FILE}: not an {FORMAT} manifest")
    offset = 0
    for i, s in enumerate(meta["shards"]):
        if s.get("offset") != offset or not isinstance(s.get("items"), int) or s["items"] < 1:
            raise ValueError(f"{path}/{SHARDS_FILE}: shards[{i}] has offset {s.get('offset')} and items "
                             f"{s.get('items')}; expected offset {offset} and at least one item")
        folder = storage.join(path, s["path"]) if storage.is_s3(path) else str((Path(path) / s["path"]).resolve())
        if not _complete(folder, endpoint_url):
            raise ValueError(f"{path}: shard {i} ({s['path']}) is missing; rebuild it with "
                             f"xmr index build --shards {len(meta['shards'])} --out {path}")
        s["path"] = folder
        offset += s["items"]
    if offset != meta.get("items"):
        raise ValueError(f"{path}/{SHARDS_FILE}: the shards hold {offset} items, the manifest says {meta.get('items')}")
    return meta


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


def _complete(folder: str, endpoint_url: str | None = None) -> bool:
    """A shard folder is complete when its index.json is there (written, or uploaded, last)."""
    return storage.exists(storage.join(folder, "index.json"), endpoint_url=endpoint_url)


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
              approx: str, ann_args: dict[str, Any] | None, endpoint_url: str | None) -> dict[str, Any]:
    """Encode part ``shard`` of ``shards`` into ``out/shard-NNN`` (written beside, then renamed
    into place) and say what it holds; a part already complete is read back, not redone."""
    from xmr.serve.gallery import load_for_serving, save_index
    from xmr.tasks.ann import AnnConfig

    folder = storage.join(out, shard_name(shard))
    if _complete(folder, endpoint_url):  # built by an earlier run (build_sharded checked it is of this build)
        meta = json.loads(storage.read_bytes(storage.join(folder, "index.json"), endpoint_url=endpoint_url))
        return {"shard": shard, "items": meta["gallery_size"], "build_s": 0.0, "resumed": True,
                "recalls": meta.get("approx_recall_at_10") or {}, "search": meta.get("search")}
    t0 = time.perf_counter()
    loaded = load_for_serving(checkpoint, gallery, split, approx=approx, endpoint_url=endpoint_url,
                              ann=AnnConfig(**ann_args) if ann_args else None, part=(shard, shards),
                              model_cfg=model_cfg)
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
    (``batch_size=1``), so a worker that encodes several shards loads the model once."""

    def __init__(self, checkpoint: str, endpoint_url: str | None, job: dict[str, Any], gpu: bool = False) -> None:
        import torch

        from xmr.checkpoint import fetch_checkpoint
        from xmr.method import load_model

        model, cfg = load_model(fetch_checkpoint(checkpoint, endpoint_url=endpoint_url))
        if gpu and torch.cuda.is_available():
            model = model.cuda()
        self.model_cfg, self.checkpoint, self.endpoint_url, self.job = (model, cfg), checkpoint, endpoint_url, job

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = [build_one(self.model_cfg, self.checkpoint, endpoint_url=self.endpoint_url, shard=int(i), **self.job)
                for i in batch["shard"]]
        return {"summary": [json.dumps(r, default=float) for r in rows]}


def quiet_ray_data() -> None:
    """Ray Data's own lines (its plan, the logged progress a non-terminal gets, its progress
    bars on a terminal) in its log files only, unless ``--verbose``: xmr prints a line per
    shard with the items per second and an ETA. Ray Data configures its ``ray.data`` logger
    when ``ray.data`` is imported (its console handler at INFO), hence the import first: a
    level set before it is reset then."""
    import logging

    import ray.data

    if os.environ.get("XMR_VERBOSE") == "1":
        return
    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):  # its console; the file keeps everything
            handler.setLevel(logging.ERROR)


def build_sharded(checkpoint: str, gallery: str | None, split: str, out: str, shards: int, *, approx: str = "auto",
                  ann_args: dict[str, Any] | None = None, endpoint_url: str | None = None,
                  address: str | None = None, workers: int = 0, cpus_per_worker: float = 1.0,
                  gpu: bool = False) -> dict[str, Any]:
    """Build (or finish building) a sharded index; returns its ``shards.json``.

    The missing shards are encoded by a Ray Data job over the cluster (``workers`` model
    replicas, 0: as many as there are shards to build and CPUs for them); each shard's
    summary is printed as it lands. ``out`` must be a folder every worker can write (this
    machine, or a filesystem the cluster's nodes share)."""
    import ray

    from xmr.checkpoint import fetch_checkpoint, load_checkpoint
    from xmr.data.manifest import load_manifest
    from xmr.train.driver import ensure_ray

    if shards < 1:
        raise ValueError(f"--shards {shards}: at least 1")
    out = out if storage.is_s3(out) else os.path.abspath(out)
    gallery = os.path.abspath(gallery) if gallery and "://" not in gallery else gallery
    checkpoint = checkpoint if storage.is_s3(checkpoint) else os.path.abspath(checkpoint)
    cfg, _, _ = load_checkpoint(fetch_checkpoint(checkpoint, endpoint_url=endpoint_url))
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
    todo = [i for i in range(shards) if not _complete(storage.join(out, shard_name(i)), endpoint_url)]
    done = shards - len(todo)
    _check_resumable(out, [i for i in range(shards) if i not in todo], shards,
                     _identity(checkpoint, root, split, approx), endpoint_url)
    if storage.exists(storage.join(out, SHARDS_FILE), endpoint_url=endpoint_url) and todo:
        raise ValueError(f"{out}: a complete sharded index ({SHARDS_FILE}) with missing shard folders; remove "
                         f"{SHARDS_FILE} to rebuild them")
    print(f"[xmr] sharded index: {shards} shards of ~{total // shards} {unit} -> {out}"
          + (f" ({done} already built, resuming)" if done else ""), flush=True)
    job = {"gallery": root, "split": split, "out": out, "shards": shards, "approx": approx, "ann_args": ann_args}
    summaries: dict[int, dict[str, Any]] = {}
    if todo:
        ensure_ray(address, dashboard=False, driver_logs=os.environ.get("XMR_VERBOSE") == "1")
        quiet_ray_data()
        n_workers = workers or max(1, min(len(todo), int(ray.cluster_resources().get("CPU", 1) // cpus_per_worker)))
        ds = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(ShardEncoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=n_workers),
                            num_cpus=cpus_per_worker, num_gpus=1 if gpu else None,
                            fn_constructor_kwargs={"checkpoint": checkpoint, "endpoint_url": endpoint_url,
                                                   "job": job, "gpu": gpu})
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


# --------------------------------------------------------------------------- merging shards' answers
#
# Exactness. A category shard's top-k holds every item of that shard that can be in the
# global top-k, so the global top-k is the top-k of the shards' lists. Equal scores are
# ordered by global position (shard order, then the shard's own order), which is the order
# one index over the concatenated shards gives its equal scores, as the shards are
# contiguous parts of the split. Scores are the same dot products; a matrix product of
# another shape may round the last bit differently, so tests compare ids and order exactly
# and scores to 1e-6.
#
# VCMR (``merge_moments``): a moment's score is its video's score times its span
# probabilities, all of its own video, but one index ranks moments only within each query's
# top-N videos (``model.top_videos``). A shard's own top N holds every one of its videos in
# the global top N (fewer videos outrank them), so each shard returns its top-k moments over
# its top N videos and those videos' scores; the gateway takes the global top N and keeps
# the moments of those videos. A shard's list is known to hold all of its eligible moments
# that can enter the top k when it ran out (fewer than asked), when at least k of its
# moments are eligible, or when its last moment scores below the merged k-th; otherwise the
# gateway asks that shard again for twice as many (``needs_more``).


def merge_hits(per_shard: list[list[dict[str, Any]] | None], k: int) -> list[dict[str, Any]]:
    """The top ``k`` of the shards' top-k lists (None: a shard that did not answer)."""
    rows = [(-float(h["score"]), s, j, h) for s, hits in enumerate(per_shard) if hits for j, h in enumerate(hits)]
    rows.sort(key=lambda r: r[:3])
    return [r[3] for r in rows[:k]]


def global_videos(per_shard: list[dict[str, Any] | None], top_videos: int) -> dict[str, int]:
    """{video id: rank} of the global top-N videos from the shards' own top-N lists."""
    rows = [(-float(score), s, j, vid) for s, ans in enumerate(per_shard) if ans
            for j, (vid, score) in enumerate(ans["videos"])]
    rows.sort(key=lambda r: r[:3])
    return {r[3]: rank for rank, r in enumerate(rows[:top_videos])}


def merge_moments(per_shard: list[dict[str, Any] | None], k: int, top_videos: int) -> list[dict[str, Any]]:
    """The global top ``k`` moments: the eligible moments (of the global top-N videos) of
    every shard, by score, equal scores by (video rank, start, end) as one index orders them."""
    rank = global_videos(per_shard, top_videos)
    rows = [(-float(m["score"]), rank[m["video"]], m["start"], m["end"], m) for ans in per_shard if ans
            for m in ans["results"] if m["video"] in rank]
    rows.sort(key=lambda r: r[:4])
    return [r[4] for r in rows[:k]]


def needs_more(per_shard: list[dict[str, Any] | None], asked: list[int], k: int, top_videos: int) -> list[int]:
    """The shards whose lists may miss an eligible moment of the global top ``k`` (see the
    note above): ask them again with a larger k."""
    rank = global_videos(per_shard, top_videos)
    merged = merge_moments(per_shard, k, top_videos)
    kth = float(merged[-1]["score"]) if len(merged) == k else -float("inf")
    out = []
    for s, ans in enumerate(per_shard):
        if not ans or len(ans["results"]) < asked[s]:  # no answer, or ran out: nothing more to get
            continue
        if not any(vid in rank for vid, _ in ans["videos"]):  # none of its videos can contribute
            continue
        eligible = sum(m["video"] in rank for m in ans["results"])
        if eligible >= k or (ans["results"] and float(ans["results"][-1]["score"]) < kth):
            continue
        out.append(s)
    return out


async def moments_across(ask, n_shards: int, k: int, top_videos: int) -> list[dict[str, Any] | None]:
    """Every shard's answer for a VCMR query, complete enough for ``merge_moments`` to be
    exact: ``ask(shards, ks)`` awaits the answers of those shards with those k (None for a
    shard that had none in time); a shard whose list may miss an eligible moment is asked
    again for twice as many (``needs_more``), until none may. The gateway's loop, apart so
    that tests run it against the families' search without HTTP."""
    asked = [k] * n_shards
    per_shard = await ask(list(range(n_shards)), asked)
    while True:
        again = needs_more(per_shard, asked, k, top_videos)
        if not again:
            return per_shard
        for s in again:
            asked[s] *= 2
        more = await ask(again, [asked[s] for s in again])
        for s, ans in zip(again, more):
            per_shard[s] = ans
