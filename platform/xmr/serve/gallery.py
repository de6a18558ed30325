"""What a replica holds: a checkpoint's model (no loss terms) and the gallery it searches,
built by the task family from a dataset split or loaded from a saved index (``xmr index
build``), so a replica restart does not re-encode."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from xmr.checkpoint import fetch_checkpoint
from xmr.config import Config
from xmr.data.manifest import Manifest, load_manifest
from xmr.method import load_model
from xmr.tasks import TaskFamily, family_of


class LazyArrays(Mapping[str, np.ndarray]):
    """An index's ``embeddings.safetensors``, each array read when first asked for: a shard
    served from approximate indexes that keep the vectors never reads its tables (the peak
    memory of loading a million-item shard is then the indexes', not twice that)."""

    def __init__(self, path: str) -> None:
        self._file = safe_open(path, framework="numpy")  # reads and checks the header only
        self._keys = list(self._file.keys())

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass
class Loaded:
    """What a replica holds: the model (no loss terms), its config, and the gallery it searches."""

    model: Any
    cfg: Config
    manifest: Manifest
    gallery: Any  # the family's gallery (xmr.tasks.category.CategoryGallery, xmr.tasks.vcmr.VideoCorpus)
    info: dict[str, Any]

    @property
    def family(self) -> TaskFamily:
        return family_of(self.cfg)


def load_for_serving(checkpoint: str, gallery: str | None = None, split: str = "test", index: str | None = None,
                     approx: str = "auto", endpoint_url: str | None = None, ann=None,
                     part: tuple[int, int] = (0, 1), model_cfg: tuple[Any, Config] | None = None,
                     cache_dir: str | None = None) -> Loaded:
    """Load a checkpoint (dir, run dir or s3://) and its gallery (a dataset split, or a saved
    index). ``part`` (i, n): encode only the i-th of n contiguous parts of the split (a shard
    of ``xmr index build --shards n``); ``model_cfg``: a model already loaded from
    ``checkpoint`` (a shard builder encodes several shards with one); ``cache_dir``: where
    s3:// checkpoints and indexes are cached (the runtime's ``cache``)."""
    t0 = time.perf_counter()
    local = fetch_checkpoint(checkpoint, endpoint_url=endpoint_url, cache_dir=cache_dir)
    model, cfg = model_cfg or load_model(local)
    model.eval()
    fam = family_of(cfg)
    if index:
        manifest, g, _ = load_index(str(fetch_index(index, endpoint_url, cache_dir)), cfg)
        root = index
    else:
        root = gallery or cfg.data.path
        manifest = load_manifest(root, endpoint_url=endpoint_url)
        if split not in manifest.splits:
            raise ValueError(f"gallery {root!r} has no split {split!r} (splits: {sorted(manifest.splits)})")
        g = fam.build_gallery(model, cfg, manifest, root, split, endpoint_url=endpoint_url, approx=approx, ann=ann,
                              part=part)
    approx_index = getattr(g, "approx", None) or {}
    search = ("approximate (" + ", ".join(sorted({a.kind for a in approx_index.values()})) + ")" if approx_index
              else "exact")
    info = {"method": cfg.method, "task": cfg.task, "model": cfg.model.name, "checkpoint": shown(checkpoint),
            "gallery": shown(root), "split": split, "gallery_size": g.size,
            "embed_dim": cfg.model.embed_dim, "input_dims": cfg.model.dims,
            "search": search,
            "build_s": round(time.perf_counter() - t0, 3), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return Loaded(model, cfg, manifest, g, info)


def shown(location: str) -> str:
    """How ``/info`` names a served location: an s3:// URI whole; a local path by its last two
    parts (which run, which checkpoint), not where it lies on the replica's disk (the
    endpoint's clients need not learn the machine's layout)."""
    if "://" in location:
        return location
    return "/".join(Path(location).parts[-2:])


def save_index(out: str | Path, loaded: Loaded, recalls: dict[str, float]) -> Path:
    """Write an encoded gallery to ``out`` (the family's arrays and items, and index.json with
    what the application builder needs to serve it without the checkpoint: ``serving``)."""
    from xmr.serve.served import serving_block

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded.family.save_gallery(loaded.gallery, out)
    meta = {**loaded.info, "manifest": loaded.manifest.to_dict(), "approx_recall_at_10": recalls,
            "serving": serving_block(loaded.cfg), "format": "xmr-index-1"}
    (out / "index.json").write_text(json.dumps(meta, indent=2, default=str))
    return out


def fetch_index(uri: str, endpoint_url: str | None = None, cache_dir: str | None = None) -> Path:
    """A local folder for a saved index: ``uri`` itself, or an s3:// index downloaded once
    into a cache keyed by its URI (a shard's replicas fetch only their shard)."""
    import hashlib
    import os
    import shutil

    from xmr.data import storage
    from xmr.runtime import DEFAULT_CACHE

    if not storage.is_s3(uri):
        return Path(uri)
    try:  # keyed by the URI and its index.json: an index rebuilt at the same URI is fetched anew
        stamp = storage.read_bytes(storage.join(uri, "index.json"), endpoint_url=endpoint_url)
    except FileNotFoundError:
        raise ValueError(f"{uri}: no index.json there (not an xmr index)") from None
    cache = Path(cache_dir or DEFAULT_CACHE) / "indexes"
    local = cache / hashlib.sha1(uri.encode() + b"\0" + stamp).hexdigest()[:16]
    if not (local / "index.json").is_file():
        part = local.with_name(f"{local.name}.part-{os.getpid()}")
        try:
            storage.download_dir(uri, str(part), endpoint_url=endpoint_url, progress=False)
        except FileNotFoundError:
            raise ValueError(f"{uri}: nothing there (not an xmr index)") from None
        if local.exists():  # a concurrent download finished first
            shutil.rmtree(part, ignore_errors=True)
        else:
            part.replace(local)
    return local


def load_index(path: str, cfg: Config) -> tuple[Manifest, Any, dict[str, Any]]:
    """(the dataset's manifest, the family's gallery, index.json) of a saved index folder."""
    p = Path(path)
    try:
        meta = json.loads((p / "index.json").read_text())
        arrays = LazyArrays(str(p / "embeddings.safetensors"))
        items = json.loads((p / "items.json").read_text())
    except (OSError, ValueError, SafetensorError) as exc:
        raise ValueError(f"{path}: not a readable xmr index ({exc})") from None
    if meta.get("embed_dim") != cfg.model.embed_dim or meta.get("task") != cfg.task:
        raise ValueError(f"{path}: an index of a {meta.get('task')!r} model with embed_dim {meta.get('embed_dim')} "
                         f"does not fit this {cfg.task!r} checkpoint ({cfg.model.embed_dim})")
    try:
        gallery = family_of(cfg).load_gallery(p, arrays, items)
    except (KeyError, SafetensorError) as exc:
        raise ValueError(f"{path}: not a readable xmr index ({exc!r} in embeddings.safetensors)") from None
    return Manifest.from_dict(meta["manifest"]), gallery, meta


def text_encoder_of(manifest: Manifest) -> dict[str, Any] | None:
    """The text encoder a dataset's query features came from (``source.details.text_encoder``,
    written by ``xmr data synth vcmr --queries-from ... --text-encoder``), or None."""
    source = manifest.source if isinstance(manifest.source, dict) else {}
    enc = (source.get("details") or {}).get("text_encoder")
    return enc if isinstance(enc, dict) and enc.get("name") else None
