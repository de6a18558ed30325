"""What an application serves, read once (by ``xmr serve``, which hands it to the
application builder, or by the builder itself under ``serve run`` / ``serve deploy``) without
loading the model: the task, each modality's input shape, the query-token limit, the videos a VCMR index
ranks moments within, the dataset's manifest, the gallery's size and, for a saved index, its
parts and their loaded sizes.

A saved index (``xmr index build``, sharded or not) records all of it (its ``index.json``'s
``serving`` block, written by ``xmr.serve.gallery.save_index``), so serving an index reads no
checkpoint; serving a dataset split (encoded on the replicas) reads the checkpoint's config
once, as does an index built before the block was recorded."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from xmr.data import storage
from xmr.data.manifest import Manifest, load_manifest
from xmr.serve.settings import ServeSettings
from xmr.serve.shards import is_sharded, read_shards
from xmr.tasks import family


@dataclass
class Served:
    task: str
    dims: dict[str, list[int]]
    max_query_tokens: int
    top_videos: int
    manifest: Manifest
    gallery_size: int | None  # None: not known before the replica loads (an unreadable count)
    index_meta: dict[str, Any] = field(default_factory=dict)  # an unsharded index's index.json
    shards: list[dict[str, Any]] | None = None  # a sharded index's parts (path, items, resident_bytes)

    @property
    def route(self) -> str:
        return family(self.task).route

    @property
    def title(self) -> str:
        return family(self.task).title


def serving_block(cfg) -> dict[str, Any]:
    """What an index records for the application builder, from the checkpoint's config."""
    return {"max_query_tokens": int(cfg.data.max_query_tokens), "top_videos": int(cfg.model.top_videos)}


def served(s: ServeSettings) -> Served:
    """What the application of settings ``s`` serves (raises ValueError for an index it
    cannot read, naming it)."""
    if s.index and is_sharded(s.index, s.endpoint_url):
        meta = read_shards(s.index, s.endpoint_url)
        first = _index_json(meta["shards"][0]["path"], s.endpoint_url)
        return _from_index(s, first, Manifest.from_dict(meta["manifest"]), sum(p["items"] for p in meta["shards"]),
                           shards=meta["shards"])
    if s.index:
        meta = _index_json(s.index, s.endpoint_url)
        return _from_index(s, meta, Manifest.from_dict(meta["manifest"]), meta.get("gallery_size"), index_meta=meta)
    cfg = _checkpoint_config(s)
    manifest = load_manifest(s.gallery or cfg.data.path, endpoint_url=s.endpoint_url)
    size = manifest.splits[s.split].num_samples if s.split in manifest.splits else None
    block = serving_block(cfg)
    return Served(cfg.task, cfg.model.dims, block["max_query_tokens"], block["top_videos"], manifest, size)


def _from_index(s: ServeSettings, meta: dict[str, Any], manifest: Manifest, size: int | None,
                **parts: Any) -> Served:
    block = meta.get("serving")
    if not isinstance(block, dict):  # an index built before it recorded what serving needs
        block = serving_block(_checkpoint_config(s))
    try:
        return Served(meta["task"], meta["input_dims"], int(block["max_query_tokens"]), int(block["top_videos"]),
                      manifest, size, **parts)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{s.index}: not a readable xmr index (index.json lacks {exc})") from None


def _index_json(index: str, endpoint_url: str | None) -> dict[str, Any]:
    try:
        meta = json.loads(storage.read_bytes(storage.join(index, "index.json"), endpoint_url=endpoint_url))
        Manifest.from_dict(meta["manifest"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{index}: not a readable xmr index ({exc})") from None
    return meta


def _checkpoint_config(s: ServeSettings):
    """The checkpoint's config (fetched once: an s3:// checkpoint is cached)."""
    import yaml

    from xmr.checkpoint import CONFIG, fetch_checkpoint
    from xmr.config import from_dict

    local = fetch_checkpoint(s.checkpoint, endpoint_url=s.endpoint_url, cache_dir=s.cache_dir)
    try:
        return from_dict(yaml.safe_load((local / CONFIG).read_text()) or {})
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{s.checkpoint}: cannot read the checkpoint's config ({exc})") from None
