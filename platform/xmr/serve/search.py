"""The endpoint's compute, batched: requests grouped by the replica state they were
admitted with (a hot swap can put two in one batch), each group answered by its task
family's search (``xmr.tasks``), so tests and benches call exactly what the endpoint runs."""

from __future__ import annotations

from typing import Any

import numpy as np

from xmr.serve.gallery import Loaded


def _groups(items: list[tuple]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        out.setdefault(id(item[0]), []).append(i)
    return out


def search_items(items: list[tuple]) -> list[list[dict[str, Any]]]:
    """items: (loaded, query role, query array, k) -> top-k items of the other modality."""
    out: list[Any] = [None] * len(items)
    for idx in _groups(items).values():
        st: Loaded = items[idx[0]][0]
        for i, hits in zip(idx, st.family.search(st.model, st.gallery, [items[i][1:] for i in idx])):
            out[i] = hits
    return out


def moments_items(items: list[tuple], with_videos: bool = False) -> list[Any]:
    """items: (loaded, token array [T, d], k) -> top-k (video, start, end, score) over the corpus;
    ``with_videos`` (``Retriever.moments_videos``, what the gateway asks a shard): each answer is
    ``{"results", "videos"}``, the moments and the top videos with their scores, what it merges."""
    out: list[Any] = [None] * len(items)
    for idx in _groups(items).values():
        st: Loaded = items[idx[0]][0]
        rows = st.family.moments(st.model, st.gallery, st.cfg, st.manifest.clip_len or 1.0, [items[i][1:] for i in idx],
                                 with_videos=with_videos)
        for i, hits in zip(idx, rows):
            out[i] = hits
    return out


def svmr_one(st: Loaded, tokens: np.ndarray, position: int, k: int) -> list[dict[str, Any]]:
    """Top-k spans within one video of the corpus."""
    return st.family.svmr(st.model, st.gallery, st.cfg, st.manifest.clip_len or 1.0, tokens, position, k)
