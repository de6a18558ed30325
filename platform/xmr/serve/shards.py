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

This module is what the request-time side needs: reading and checking ``shards.json``, a
replica's memory, and merging the shards' answers. The offline builder (the Ray Data job
that encodes the parts) is ``xmr.serve.index_build``, so the gateway does not import it.
"""

from __future__ import annotations

import json
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

    for index in getattr(loaded.gallery, "approx", {}).values():  # a table served as a view of
        view = index.vectors()  # its index's vectors is counted once, with the index
        if view is not None:
            seen.add((view.ctypes.data, view.nbytes))
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
        if not is_complete(folder, endpoint_url):
            raise ValueError(f"{path}: shard {i} ({s['path']}) is missing; rebuild it with "
                             f"xmr index build --shards {len(meta['shards'])} --out {path}")
        s["path"] = folder
        offset += s["items"]
    if offset != meta.get("items"):
        raise ValueError(f"{path}/{SHARDS_FILE}: the shards hold {offset} items, the manifest says {meta.get('items')}")
    return meta


def is_complete(folder: str, endpoint_url: str | None = None) -> bool:
    """A shard folder is complete when its index.json is there (written, or uploaded, last)."""
    return storage.exists(storage.join(folder, "index.json"), endpoint_url=endpoint_url)


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
