"""Galleries the endpoint searches: a category/pair split embedded once (both modalities),
or a VCMR corpus encoded once. Built from a checkpoint and a dataset split, or loaded
from a saved index (``xmr index build``), so a replica restart does not re-encode."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from xmr.checkpoint import fetch_checkpoint, load_method
from xmr.config import Config
from xmr.data.manifest import Manifest, load_manifest
from xmr.data.reader import make_loader

EXACT_LIMIT = 200_000  # above this many items "auto" builds an approximate (FAISS IVF) index


def _label_json(label: torch.Tensor, kind: str) -> Any:
    if kind == "multi":
        return [int(i) for i in torch.nonzero(label).flatten().tolist()]
    if label.dim() == 0:
        return int(label)
    return [int(x) for x in label.tolist()]


@dataclass
class CategoryGallery:
    """Unit-norm embeddings of both modalities of one split, with ids and labels."""

    emb: dict[str, torch.Tensor]  # role -> [N, d] float32
    ids: list[str]
    labels: list[Any]
    approx: dict[str, Any] = field(default_factory=dict)  # role -> faiss index (searched side)
    half: dict[str, torch.Tensor] = field(default_factory=dict)  # role -> float16 copy for the pre-scan

    def __post_init__(self) -> None:
        from xmr.serve.search import half_prescan_ok

        for role, e in self.emb.items():
            if half_prescan_ok(e):
                self.half[role] = e.half()

    @property
    def size(self) -> int:
        return len(self.ids)


@dataclass
class VideoCorpus:
    """Clip encodings of every video of a split; ids are video names."""

    enc: dict[str, torch.Tensor]
    ids: list[str]
    durations: torch.Tensor
    buckets: list = field(default_factory=list)  # length-grouped views for search, built once

    def __post_init__(self) -> None:
        from xmr.models.qacln import bucket_corpus

        if not self.buckets:
            self.buckets = bucket_corpus(self.enc)

    @property
    def size(self) -> int:
        return len(self.ids)


@torch.no_grad()
def embed_category(method, manifest: Manifest, root: str, split: str, batch_size: int = 512,
                   endpoint_url: str | None = None) -> CategoryGallery:
    model = method.model.eval()
    loader = make_loader(root, split, local_batch_size=batch_size, shuffle=False, manifest=manifest,
                         endpoint_url=endpoint_url)
    parts: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    ids: list[str] = []
    labels: list[Any] = []
    for batch in loader:
        if len(batch["index"]) == 0:
            continue
        for role in ("a", "b"):
            parts[role].append(model.encode(role, batch[role]).float())
        ids.extend(batch["key"])
        if "label" in batch:
            labels.extend(_label_json(lab, manifest.labels.kind) for lab in batch["label"])
    if not ids:
        raise ValueError(f"{root} split {split!r}: no items to serve")
    return CategoryGallery({r: torch.cat(p) for r, p in parts.items()}, ids, labels or [None] * len(ids))


@torch.no_grad()
def encode_video_corpus(method, manifest: Manifest, root: str, split: str, cfg: Config,
                        endpoint_url: str | None = None) -> VideoCorpus:
    from xmr.evaluation.vcmr import encode_corpus

    loader = make_loader(root, split, local_batch_size=64, shuffle=False, unit="video", manifest=manifest,
                         max_clips=cfg.data.max_clips, endpoint_url=endpoint_url)
    enc, meta = encode_corpus(method.model.eval(), loader)
    return VideoCorpus(enc, [str(n) for n in meta["vid_name"]], meta["duration"])


def build_approx(emb: torch.Tensor, nlist: int | None = None, nprobe: int = 32):
    """An inner-product IVF index over unit vectors (cosine), trained on the gallery itself."""
    import faiss

    x = np.ascontiguousarray(emb.numpy().astype(np.float32))
    n, d = x.shape
    nlist = nlist or max(1, int(4 * np.sqrt(n)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(x[np.random.default_rng(0).choice(n, min(n, 256 * nlist), replace=False)])
    index.add(x)
    index.nprobe = nprobe
    return index


def approx_recall_at_10(index, gallery: torch.Tensor, queries: torch.Tensor) -> float:
    """Fraction of the exact top-10 that the approximate index also returns in its top 10."""
    exact = (queries @ gallery.T).topk(10, dim=1).indices.numpy()
    _, got = index.search(np.ascontiguousarray(queries.numpy().astype(np.float32)), 10)
    return float(np.mean([len(set(e) & set(g)) / 10 for e, g in zip(exact, got)]))


@dataclass
class Loaded:
    """What a replica holds: the model, its config, and the gallery it searches."""

    method: Any
    cfg: Config
    manifest: Manifest
    gallery: CategoryGallery | VideoCorpus
    info: dict[str, Any]


def load_for_serving(checkpoint: str, gallery: str | None = None, split: str = "test", index: str | None = None,
                     approx: str = "auto", endpoint_url: str | None = None) -> Loaded:
    """Load a checkpoint (dir, run dir or s3://) and its gallery (a dataset split or a saved index)."""
    t0 = time.perf_counter()
    local = fetch_checkpoint(checkpoint, endpoint_url=endpoint_url)
    method = load_method(local).eval()
    cfg = method.cfg
    torch.set_num_threads(max(1, int(os.environ.get("XMR_SERVE_THREADS", torch.get_num_threads()))))
    if index:
        manifest, g = load_index(index, method)
        root = index
    else:
        root = gallery or cfg.data.path
        manifest = load_manifest(root, endpoint_url=endpoint_url)
        if split not in manifest.splits:
            raise ValueError(f"gallery {root!r} has no split {split!r} (splits: {sorted(manifest.splits)})")
        if cfg.task == "vcmr":
            g = encode_video_corpus(method, manifest, root, split, cfg, endpoint_url)
        else:
            g = embed_category(method, manifest, root, split, endpoint_url=endpoint_url)
            add_approx(g, approx)
    info = {"method": cfg.method, "task": cfg.task, "model": cfg.model.name, "checkpoint": checkpoint,
            "checkpoint_local": str(local), "gallery": root, "split": split, "gallery_size": g.size,
            "embed_dim": cfg.model.embed_dim, "input_dims": cfg.model.dims,
            "search": "approximate (faiss IVF)" if getattr(g, "approx", None) else "exact",
            "build_s": round(time.perf_counter() - t0, 3), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return Loaded(method, cfg, manifest, g, info)


def add_approx(g: CategoryGallery, approx: str) -> dict[str, float]:
    """Build FAISS indexes when asked ("on") or when the gallery is large ("auto"); returns
    their recall@10 against exact search (on up to 1,000 of the other modality's items)."""
    if approx not in ("auto", "on", "off"):
        raise ValueError(f"approx = {approx!r}: use auto, on or off")
    if approx == "off" or (approx == "auto" and g.size <= EXACT_LIMIT):
        return {}
    recalls = {}
    for role, other in (("a", "b"), ("b", "a")):
        g.approx[role] = build_approx(g.emb[role])
        recalls[role] = approx_recall_at_10(g.approx[role], g.emb[role], g.emb[other][:1000])
    return recalls


# --------------------------------------------------------------------------- saved indexes


def save_index(out: str | Path, loaded: Loaded, recalls: dict[str, float]) -> Path:
    """Write an encoded gallery to ``out``: a category split's embeddings, ids and labels
    (and FAISS indexes), or a VCMR corpus's clip encodings, video ids and durations."""
    g = loaded.gallery
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(g, VideoCorpus):
        save_file({f"enc_{k}": v.contiguous().numpy() for k, v in g.enc.items()}, str(out / "embeddings.safetensors"))
        (out / "items.json").write_text(json.dumps({"ids": g.ids, "durations": g.durations.tolist()}))
    else:
        save_file({f"emb_{r}": e.contiguous().numpy() for r, e in g.emb.items()}, str(out / "embeddings.safetensors"))
        (out / "items.json").write_text(json.dumps({"ids": g.ids, "labels": g.labels}))
        if g.approx:
            import faiss

            for role, index in g.approx.items():
                faiss.write_index(index, str(out / f"faiss_{role}.index"))
    meta = {**loaded.info, "manifest": loaded.manifest.to_dict(), "approx_recall_at_10": recalls,
            "format": "xmr-index-1"}
    (out / "index.json").write_text(json.dumps(meta, indent=2, default=str))
    return out


def load_index(path: str, method) -> tuple[Manifest, CategoryGallery | VideoCorpus]:
    p = Path(path)
    try:
        meta = json.loads((p / "index.json").read_text())
        arrays = load_file(str(p / "embeddings.safetensors"))
        items = json.loads((p / "items.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable xmr index ({exc})") from None
    if meta.get("embed_dim") != method.cfg.model.embed_dim or meta.get("task") != method.cfg.task:
        raise ValueError(f"{path}: an index of a {meta.get('task')!r} model with embed_dim {meta.get('embed_dim')} "
                         f"does not fit this {method.cfg.task!r} checkpoint ({method.cfg.model.embed_dim})")
    manifest = Manifest.from_dict(meta["manifest"])
    if method.cfg.task == "vcmr":
        enc = {k[len("enc_"):]: torch.from_numpy(v) for k, v in arrays.items()}
        return manifest, VideoCorpus(enc, items["ids"], torch.tensor(items["durations"], dtype=torch.float32))
    g = CategoryGallery({r: torch.from_numpy(arrays[f"emb_{r}"]) for r in ("a", "b")}, items["ids"], items["labels"])
    for role in ("a", "b"):
        f = p / f"faiss_{role}.index"
        if f.is_file():
            import faiss

            g.approx[role] = faiss.read_index(str(f))
            g.approx[role].nprobe = 32
    return manifest, g
