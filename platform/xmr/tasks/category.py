"""Category retrieval (mAP, relevance = a shared class) and pair matching (Recall@K,
relevance = the paired item): evaluation, the served gallery and its search."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from xmr.data.reader import loader_for
from xmr.distributed import world_info
from xmr.metrics.retrieval import cosine_similarity, cross_modal_map, pair_recall_at_k, precision_at_k
from xmr.progress_line import units_in, with_progress
from xmr.tasks.ann import AnnConfig, AnnIndex, build_ann
from xmr.tasks.base import TaskFamily
from xmr.tasks.topk import half_prescan_ok, topk_scores

EXACT_LIMIT = 200_000  # above this many items "auto" builds an approximate index (xmr.tasks.ann)


class CategoryFamily(TaskFamily):
    name = "category"
    dataset_task = "category"
    main_metric = "map_mean"
    route = "search"
    title = "category"
    labelled = True
    output_files = ("per_query.csv",)
    data_fields = ("data.label_noise",)

    def targets(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["label"]

    def bank_targets(self, cfg) -> tuple[tuple[int, ...], torch.dtype]:
        m = cfg.model
        if m.label_kind == "multi":
            return (m.num_classes[0],), torch.float32
        if m.label_kind == "hierarchical":
            return (len(m.num_classes),), torch.long
        return (), torch.long

    def score_share(self, model, cfg, manifest, split: str, detailed: bool = False, nms: float | None = None):
        rank, world = world_info()
        loader = loader_for(cfg, split, rank=rank, world_size=world, manifest=manifest)
        keys: list[str] = []
        total = -(-manifest.splits[split].num_samples // world)
        batches = with_progress(_keys_of(loader, keys), f"{split}: encoding pairs", total, "pairs", units_in,
                                speak=rank == 0)
        share = embed_split(model, _to(batches, next(model.parameters()).device))
        return (*share, keys) if detailed else share

    def _merged(self, shares: list):
        a, b, index = (torch.cat([s[i] for s in shares]) for i in (0, 1, 3))
        labels = torch.cat([s[2] for s in shares]) if shares[0][2] is not None else None
        order = index.argsort()
        keys = [k for s in shares for k in s[4]] if len(shares[0]) > 4 else []
        return a[order], b[order], labels[order] if labels is not None else None, \
            [keys[i] for i in order.tolist()] if keys else []

    def score(self, shares: list, cfg) -> dict[str, float]:
        a, b, labels, _ = self._merged(shares)
        return score_embeddings(a, b, labels, self.name)

    def outputs(self, shares: list, cfg, manifest, nms: float | None = None) -> tuple[dict, dict[str, str]]:
        """Metrics per direction, and ``per_query.csv``: each query's id, direction, the
        1-based rank of its first relevant item (0: none) and its AP."""
        import pandas as pd

        from xmr.metrics.retrieval import per_query_ap

        a, b, labels, keys = self._merged(shares)
        metrics = score_embeddings(a, b, labels, self.name)
        sim = cosine_similarity(a, b)
        if self.name == PairFamily.name:
            q_lab, kind = torch.arange(len(a)), "single"
        else:
            q_lab, kind = labels, label_kind(labels)
        rows = []
        for direction, s in (("a2b", sim), ("b2a", sim.T)):
            ap, first = per_query_ap(s, q_lab, q_lab, label_kind=kind)
            rows += [{"query": keys[i] if keys else i, "direction": direction, "first_relevant_rank": int(first[i]),
                      "ap": float(ap[i])} for i in range(len(ap))]
        return metrics, {"per_query.csv": pd.DataFrame(rows).to_csv(index=False)}

    def build_gallery(self, model, cfg, manifest, root: str, split: str, endpoint_url: str | None = None,
                      approx: str = "auto", ann: AnnConfig | None = None, part: tuple[int, int] = (0, 1)):
        g = embed_category(model, manifest, root, split, endpoint_url=endpoint_url, part=part)
        g.recalls = add_approx(g, approx, ann)
        return g

    def save_gallery(self, g: "CategoryGallery", out: Path) -> None:
        from safetensors.numpy import save_file

        shared = bool(g.shared)  # one table serves both sides (a synthetic gallery): stored once
        save_file({f"emb_{r}": e.contiguous().numpy() for r, e in g.emb.items() if not (shared and r == "b")},
                  str(out / "embeddings.safetensors"))
        (out / "items.json").write_text(json.dumps({"ids": g.ids, "labels": g.labels, "shared_embeddings": shared}))
        for role, index in g.approx.items():
            meta = index.save(str(out / f"faiss_{role}.index"))
            (out / f"faiss_{role}.json").write_text(json.dumps(meta, indent=2))

    def load_gallery(self, path: Path, arrays: Mapping[str, np.ndarray], items: dict) -> "CategoryGallery":
        """``arrays`` reads each table when asked: a side served from an approximate index that
        keeps its vectors is never read from disk (the index holds the table)."""
        approx: dict[str, AnnIndex] = {}
        for role in ("a", "b"):
            f, meta = path / f"faiss_{role}.index", path / f"faiss_{role}.json"
            if f.is_file():
                approx[role] = AnnIndex.load(str(f), json.loads(meta.read_text()) if meta.is_file() else None)
        shared = bool(items.get("shared_embeddings"))
        read: dict[str, torch.Tensor] = {}
        emb: dict[str, torch.Tensor] = {}
        for role in ("a", "b"):
            view = approx[role].vectors() if role in approx else None
            if view is not None:
                emb[role] = torch.from_numpy(view)
                continue
            key = "emb_a" if shared else f"emb_{role}"
            if key not in read:
                read[key] = torch.from_numpy(arrays[key])
            emb[role] = read[key]
        return CategoryGallery(emb, items["ids"], items["labels"], approx=approx,
                               recalls={r: a.recall_at_10 for r, a in approx.items()}, shared=shared)

    def search(self, model, gallery: "CategoryGallery", items: list[tuple]) -> list[list[dict[str, Any]]]:
        return search_category(model, gallery, items)


class PairFamily(CategoryFamily):
    """Pair matching: the only relevant item is a query's own partner."""

    name = "pair"
    title = "pair"
    main_metric = "r1_mean"
    labelled = False
    data_fields = ()  # relevance is the pair itself: no label to corrupt

    def targets(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["index"].reshape(-1)

    def bank_targets(self, cfg) -> tuple[tuple[int, ...], torch.dtype]:
        return (), torch.long


def _keys_of(batches: Iterable[dict[str, Any]], keys: list[str]):
    """The batches, recording their item keys on the way (for per-query files)."""
    for batch in batches:
        keys.extend(batch.get("key", []))
        yield batch


def _to(batches: Iterable[dict[str, Any]], device: torch.device):
    for batch in batches:
        yield {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def embed_split(model: torch.nn.Module, batches: Iterable[dict[str, Any]]):
    """(emb_a, emb_b, labels, index) over every batch, in order; eval mode, no grad."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"a": [], "b": [], "label": [], "index": []}
    try:
        for batch in batches:
            if len(batch["index"]) == 0:
                continue
            parts["a"].append(model.encode("a", batch["a"]).float().cpu())
            parts["b"].append(model.encode("b", batch["b"]).float().cpu())
            parts["index"].append(batch["index"].cpu())
            if "label" in batch:
                parts["label"].append(batch["label"].cpu())
    finally:
        model.train(was_training)
    if not parts["a"]:
        raise ValueError("embed_split: the split yielded no samples")
    labels = torch.cat(parts["label"]) if parts["label"] else None
    return torch.cat(parts["a"]), torch.cat(parts["b"]), labels, torch.cat(parts["index"])


def evaluate_category(model: torch.nn.Module, batches: Iterable[dict[str, Any]], task: str) -> dict[str, float]:
    """Single-process metrics of ``model`` over ``batches`` (one process, any iterable)."""
    emb_a, emb_b, labels, _ = embed_split(model, batches)
    return score_embeddings(emb_a, emb_b, labels, task)


def label_kind(labels: torch.Tensor) -> str:
    if labels.is_floating_point():
        return "multi"
    return "hierarchical" if labels.dim() == 2 else "single"


def score_embeddings(emb_a, emb_b, labels, task: str) -> dict[str, float]:
    """Metrics from embeddings: category -> mAP@all, mAP@100 and P@10 per direction and mean
    (and per label level for hierarchical labels); pair -> Recall@{1,5,10} and median rank
    per direction, and their means."""
    if task == PairFamily.name:
        sim = cosine_similarity(emb_a, emb_b)
        out: dict[str, float] = {}
        for name, s in (("a2b", sim), ("b2a", sim.T)):
            r = pair_recall_at_k(s, ks=(1, 5, 10))
            out.update({f"r1_{name}": r["r@1"], f"r5_{name}": r["r@5"], f"r10_{name}": r["r@10"],
                        f"median_rank_{name}": r["median_rank"]})
        for k in (1, 5, 10):
            out[f"r{k}_mean"] = (out[f"r{k}_a2b"] + out[f"r{k}_b2a"]) / 2
        return out
    if labels is None:
        raise ValueError("category metrics need labels; use task 'pair' for unlabelled pairs")
    kind = label_kind(labels)
    full = cross_modal_map(emb_a, emb_b, labels, labels, label_kind=kind)
    top = cross_modal_map(emb_a, emb_b, labels, labels, k=100, label_kind=kind)
    sim = cosine_similarity(emb_a, emb_b)
    p_a2b = precision_at_k(sim, labels, labels, ks=(10,), label_kind=kind)["p@10"]
    p_b2a = precision_at_k(sim.T, labels, labels, ks=(10,), label_kind=kind)["p@10"]
    out = {"map_a2b": full["a2b"], "map_b2a": full["b2a"], "map_mean": full["mean"],
           "map100_mean": top["mean"], "p10_mean": (p_a2b + p_b2a) / 2,
           "n_no_relevant": int(full["a2b_n_no_relevant"] + full["b2a_n_no_relevant"])}
    if kind == "hierarchical" and labels.shape[1] > 1:
        out.update(level_maps(emb_a, emb_b, labels))
    return out


def level_maps(emb_a, emb_b, labels) -> dict[str, float]:
    """mAP with relevance at each label level (``map_mean_coarse`` for the first,
    ``map_mean_fine`` for the last, ``map_mean_l{i}`` between), so a hierarchy's effect on
    the coarse structure is measured, not only on the finest classes (``map_mean``)."""
    n = labels.shape[1]
    out = {}
    for level in range(n):
        name = "coarse" if level == 0 else "fine" if level == n - 1 else f"l{level}"
        lv = labels[:, level]
        out[f"map_mean_{name}"] = cross_modal_map(emb_a, emb_b, lv, lv, label_kind="single")["mean"]
    return out


# --------------------------------------------------------------------------- the served gallery


def _label_json(label: torch.Tensor, kind: str) -> Any:
    if kind == "multi":
        return [int(i) for i in torch.nonzero(label).flatten().tolist()]
    if label.dim() == 0:
        return int(label)
    return [int(x) for x in label.tolist()]


@dataclass
class CategoryGallery:
    """Unit-norm embeddings of both modalities of one split, with ids and labels.

    A side with an approximate index that keeps the full vectors (ivfpq, hnsw) is searched
    through it, so its table is a view of the index's copy (``AnnIndex.vectors``) and it has
    no float16 pre-scan copy: the table is held once, by FAISS (see ``serve_from_indexes``)."""

    emb: dict[str, torch.Tensor]  # role -> [N, d] float32
    ids: list[str]
    labels: list[Any]
    approx: dict[str, AnnIndex] = field(default_factory=dict)  # role -> approximate index (searched side)
    half: dict[str, torch.Tensor] = field(default_factory=dict)  # role -> float16 copy for the pre-scan
    recalls: dict[str, float] = field(default_factory=dict)  # approximate index recall@10 vs exact
    shared: bool | None = None  # one table serves both sides (a synthetic gallery): stored once

    def __post_init__(self) -> None:
        if self.shared is None:
            self.shared = self.emb["a"] is self.emb["b"]
        self.serve_from_indexes()

    def serve_from_indexes(self) -> None:
        """Each side's table: the view of its approximate index's vectors where it has one (no
        pre-scan copy: searches go through the index), else its own with a float16 copy for
        the exact pre-scan."""
        for role, index in self.approx.items():
            view = index.vectors()
            if view is not None and tuple(view.shape) == tuple(self.emb[role].shape):
                self.emb[role] = torch.from_numpy(view)
                self.half.pop(role, None)
        for role, e in self.emb.items():
            if role in self.approx or role in self.half:
                continue
            twin = next((self.half[r] for r, other in self.emb.items() if other is e and r in self.half), None)
            if twin is not None:  # one table serves both sides: one float16 copy
                self.half[role] = twin
            elif half_prescan_ok(e):
                self.half[role] = e.half()

    @property
    def size(self) -> int:
        return len(self.ids)


@torch.no_grad()
def embed_category(model, manifest, root: str, split: str, batch_size: int = 512,
                   endpoint_url: str | None = None, part: tuple[int, int] = (0, 1)) -> CategoryGallery:
    """The split's items encoded in order; ``part`` (i, n): only the i-th of n contiguous
    near-equal parts (a shard of a sharded index: the parts concatenate to the whole)."""
    from xmr.data.reader import make_loader

    model = model.eval()
    device = next(model.parameters()).device
    loader = make_loader(root, split, local_batch_size=batch_size, shuffle=False, manifest=manifest,
                         endpoint_url=endpoint_url, rank=part[0], world_size=part[1])
    parts: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    ids: list[str] = []
    labels: list[Any] = []
    for batch in with_progress(loader, f"index {split}: encoding", loader.local_samples, "items", units_in):
        if len(batch["index"]) == 0:
            continue
        for role in ("a", "b"):
            parts[role].append(model.encode(role, batch[role].to(device)).float().cpu())
        ids.extend(batch["key"])
        if "label" in batch:
            labels.extend(_label_json(lab, manifest.labels.kind) for lab in batch["label"])
    if not ids:
        raise ValueError(f"{root} split {split!r}: no items to serve")
    return CategoryGallery({r: torch.cat(p) for r, p in parts.items()}, ids, labels or [None] * len(ids))


def add_approx(g: CategoryGallery, approx: str, ann: AnnConfig | None = None) -> dict[str, float]:
    """Build an approximate index per side when asked ("on") or when the gallery is large
    ("auto"), its search setting chosen on the other side's embeddings as probe queries;
    returns each index's held-out recall@10 against exact search."""
    if approx not in ("auto", "on", "off"):
        raise ValueError(f"approx = {approx!r}: use auto, on or off")
    if approx == "off" or (approx == "auto" and g.size <= EXACT_LIMIT):
        return {}
    for role, other in (("a", "b"), ("b", "a")):
        g.approx[role] = build_ann(g.emb[role].numpy(), g.emb[other].numpy(), ann)
    g.serve_from_indexes()  # as a replica will hold it (what xmr index build records as resident)
    return {role: a.recall_at_10 for role, a in g.approx.items()}


@torch.inference_mode()
def search_category(model, g: CategoryGallery, items: list[tuple]) -> list[list[dict[str, Any]]]:
    """items: (query role, query array, k). One encoder pass and one matrix product (or FAISS
    search) per role; results in item order."""
    out: list[list[dict[str, Any]] | None] = [None] * len(items)
    groups: dict[str, list[int]] = {}
    for i, (role, _, _) in enumerate(items):
        groups.setdefault(role, []).append(i)
    for role, idx in groups.items():
        other = "b" if role == "a" else "a"
        q = model.encode(role, torch.from_numpy(np.stack([items[i][1] for i in idx]))).float()
        k_max = max(items[i][2] for i in idx)
        if other in g.approx:
            scores_np, top_np = g.approx[other].search(q.numpy(), k_max)
            scores, top = torch.from_numpy(scores_np), torch.from_numpy(top_np)
        else:
            scores, top = topk_scores(q, g.emb[other], g.half.get(other), k_max)
        for row, i in enumerate(idx):
            k = items[i][2]
            out[i] = [{"id": g.ids[j], "score": float(s), "label": g.labels[j]}
                      for j, s in zip(top[row, :k].tolist(), scores[row, :k].tolist()) if j >= 0]
    return out  # type: ignore[return-value]
