"""Collate lists of decoded units into the batch dicts of docs/design.md (float32 tensors)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from xmr.data.decode import DecodeSpec


def _pad(arrays: list[np.ndarray], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length ``[n_i, D]`` arrays into ``[B, L, D]`` zeros-padded, plus a valid mask."""
    n = max([a.shape[0] for a in arrays] + [length or 0, 1])
    out = np.zeros((len(arrays), n) + arrays[0].shape[1:], dtype=arrays[0].dtype)
    mask = np.zeros((len(arrays), n), dtype=bool)
    for i, a in enumerate(arrays):
        out[i, :a.shape[0]] = a
        mask[i, :a.shape[0]] = True
    return torch.from_numpy(out), torch.from_numpy(mask)


def collate_category(units: list[dict], spec: DecodeSpec) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "a": torch.from_numpy(np.stack([u["a"] for u in units])),
        "b": torch.from_numpy(np.stack([u["b"] for u in units])),
        "index": torch.tensor([u["index"] for u in units], dtype=torch.long),
        "key": [u["key"] for u in units],
    }
    if spec.label_kind in ("single", "hierarchical"):
        batch["label"] = torch.tensor([u["label"] for u in units], dtype=torch.long)
    elif spec.label_kind == "multi":
        hot = torch.zeros(len(units), spec.num_classes[0])
        for i, u in enumerate(units):
            hot[i, u["label"]] = 1.0
        batch["label"] = hot
    return batch


def _video_fields(videos: list[dict]) -> dict[str, Any]:
    visual, clip_mask = _pad([v["visual"] for v in videos])
    subtitle, _ = _pad([v["subtitle"] for v in videos])
    sub_mask, _ = _pad([v["sub_mask"] for v in videos])
    return {"visual": visual, "subtitle": subtitle, "sub_mask": sub_mask & clip_mask, "clip_mask": clip_mask,
            "video_index": torch.tensor([v["video_index"] for v in videos], dtype=torch.long),
            "duration": torch.tensor([v["duration"] for v in videos], dtype=torch.float32)}


def collate_vcmr_query(units: list[dict]) -> dict[str, Any]:
    """One row per query, each with its video's clips (a video repeats once per query)."""
    batch = _video_fields([u["video"] for u in units])
    q_tokens, q_mask = _pad([u["q_tokens"] for u in units])
    batch.update({
        "q_tokens": q_tokens, "q_mask": q_mask,
        "st": torch.tensor([u["st"] for u in units], dtype=torch.long),
        "ed": torch.tensor([u["ed"] for u in units], dtype=torch.long),
        "ts": torch.tensor([u["ts"] for u in units], dtype=torch.float32).reshape(len(units), 2),
        "desc_id": torch.tensor([u["desc_id"] for u in units], dtype=torch.long),
        "index": torch.tensor([u["video"]["index"] for u in units], dtype=torch.long),
        "type": [u["type"] for u in units],
        "desc": [u["desc"] for u in units],
        "vid_name": [u["video"]["vid_name"] for u in units],
        "key": [u["key"] for u in units],
    })
    return batch


def collate_vcmr_video(units: list[dict]) -> dict[str, Any]:
    """One row per video (the gallery side of an index); query metadata as lists per video."""
    batch = _video_fields(units)
    batch.update({
        "index": torch.tensor([v["index"] for v in units], dtype=torch.long),
        "key": [v["key"] for v in units],
        "vid_name": [v["vid_name"] for v in units],
        "desc_id": [[int(q.get("desc_id", -1)) for q in v["queries"]] for v in units],
        "desc": [[str(q.get("desc", "")) for q in v["queries"]] for v in units],
        "ts": [[list(q.get("ts", [])) for q in v["queries"]] for v in units],
        "type": [[str(q.get("type", "")) for q in v["queries"]] for v in units],
    })
    return batch


def collate(units: list[dict], spec: DecodeSpec) -> dict[str, Any]:
    """The batch for ``spec.unit``; an empty list (all rows skipped) gives an empty batch."""
    if not units:
        return {"key": [], "index": torch.zeros(0, dtype=torch.long)}
    if spec.task == "category":
        return collate_category(units, spec)
    return collate_vcmr_query(units) if spec.unit == "query" else collate_vcmr_video(units)
