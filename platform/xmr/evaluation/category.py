"""Category retrieval (mAP) and pair matching (Recall@K) from a model and a split's batches."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from xmr.metrics.retrieval import cosine_similarity, cross_modal_map, pair_recall_at_k, precision_at_k


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


def label_kind(labels: torch.Tensor) -> str:
    if labels.is_floating_point():
        return "multi"
    return "hierarchical" if labels.dim() == 2 else "single"


def score_embeddings(emb_a, emb_b, labels, task: str) -> dict[str, float]:
    """Metrics from embeddings: category -> mAP@all, mAP@100 and P@10 per direction and mean;
    pair -> Recall@{1,5,10} and median rank per direction, and their means."""
    if task == "pair":
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
    return {"map_a2b": full["a2b"], "map_b2a": full["b2a"], "map_mean": full["mean"],
            "map100_mean": top["mean"], "p10_mean": (p_a2b + p_b2a) / 2,
            "n_no_relevant": int(full["a2b_n_no_relevant"] + full["b2a_n_no_relevant"])}


def evaluate_category(model: torch.nn.Module, batches: Iterable[dict[str, Any]], task: str) -> dict[str, float]:
    emb_a, emb_b, labels, _ = embed_split(model, batches)
    return score_embeddings(emb_a, emb_b, labels, task)
