"""Validation over a whole split, each sample exactly once across the data-parallel ranks,
reduced before it is reported: Ray Tune only sees worker 0's metrics, so worker 0 must hold
the metric of the whole split, not of its share."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from xmr.config import Config
from xmr.data.manifest import Manifest
from xmr.data.reader import Loader, make_loader
from xmr.evaluation.category import embed_split, score_embeddings
from xmr.evaluation.vcmr import encode_corpus, rank_query_batches, score_vcmr
from xmr.losses.negatives import world_info


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (a one-item list without a process group)."""
    _, world = world_info()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    _, world = world_info()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def to_device(batches: Iterable[dict[str, Any]], device: torch.device) -> Iterator[dict[str, Any]]:
    for batch in batches:
        yield {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def split_loader(cfg: Config, manifest: Manifest, split: str, unit: str | None = None) -> Loader:
    """This rank's contiguous share of ``split``, unshuffled (shares partition the split)."""
    rank, world = world_info()
    return make_loader(cfg.data.path, split, local_batch_size=cfg.data.eval_batch_size, rank=rank, world_size=world,
                       num_workers=cfg.data.num_workers, shuffle=False, mode="shard", unit=unit,
                       on_bad_sample=cfg.data.on_bad_sample, max_clips=cfg.data.max_clips,
                       max_query_tokens=cfg.data.max_query_tokens, endpoint_url=cfg.data.endpoint_url,
                       manifest=manifest)


@torch.no_grad()
def evaluate_split(model: torch.nn.Module, cfg: Config, manifest: Manifest, split: str) -> dict[str, float]:
    """The task family's metrics over the whole ``split``; the same dict on every rank."""
    rank, _ = world_info()
    if cfg.task == "vcmr":
        ranked = _rank_vcmr_share(model, cfg, manifest, split)
        shares = [s for s in all_gather_objects(ranked) if len(s["gt_video"])]
        metrics = None
        if rank == 0:
            merged = {k: np.concatenate([s[k] for s in shares]) for k in shares[0]}
            order = np.argsort(merged["index"], kind="stable")
            metrics = score_vcmr({k: v[order] for k, v in merged.items()})
        return broadcast_object(metrics)
    device = next(model.parameters()).device
    share = embed_split(model, to_device(split_loader(cfg, manifest, split), device))
    shares = all_gather_objects(share)
    metrics = None
    if rank == 0:
        a, b, index = (torch.cat([s[i] for s in shares]) for i in (0, 1, 3))
        labels = torch.cat([s[2] for s in shares]) if shares[0][2] is not None else None
        order = index.argsort()
        metrics = score_embeddings(a[order], b[order], labels[order] if labels is not None else None, cfg.task)
    return broadcast_object(metrics)


def _rank_vcmr_share(model, cfg: Config, manifest: Manifest, split: str) -> dict[str, np.ndarray]:
    """Encode this rank's videos, assemble the whole corpus on every rank, then rank this
    rank's queries against it."""
    from xmr.models.qacln import pad_encoding

    was_training = model.training
    model.eval()
    try:
        corpus, meta = encode_corpus(model, split_loader(cfg, manifest, split, unit="video"))
        device = corpus["clip_mask"].device
        shares = all_gather_objects(({k: v.cpu() for k, v in corpus.items()}, meta))
        if len(shares) > 1:
            n = max(c["h_v"].shape[1] for c, _ in shares)
            padded = [pad_encoding(c, n) for c, _ in shares]
            corpus = {k: torch.cat([p[k] for p in padded]).to(device) for k in padded[0]}
            meta = {"video_index": torch.cat([m["video_index"] for _, m in shares]),
                    "duration": torch.cat([m["duration"] for _, m in shares]),
                    "vid_name": [name for _, m in shares for name in m["vid_name"]]}
        return rank_query_batches(model, corpus, meta, split_loader(cfg, manifest, split, unit="query"),
                                  manifest.clip_len or 1.0, cfg.model.top_videos, cfg.model.max_moment_clips)
    finally:
        model.train(was_training)
