"""A VCMR corpus on real language: TVR-style annotations, query features from a real text
encoder, clip features carrying each query's meaning in the stream(s) its type names.

``xmr data synth vcmr --queries-from ANNOTATIONS.jsonl --text-encoder minilm`` reads real
annotations (``vid_name``, ``duration``, ``ts``, ``desc``, ``type``, ``desc_id``): one video
per ``vid_name`` at its real duration, its real queries at their real moments. Then:

- each query's token features are the encoder's token embeddings of its ``desc``
  (``xmr.data.text_encoder``; the endpoint's text featuriser computes the same for a text
  typed at it, so a user can query by text);
- its sentence embedding is planted (times ``signal``) into the clips of its moment, on the
  visual stream for a ``v`` query, the subtitle stream for ``t``, both for ``vt``, through a
  fixed random projection per stream, on top of a per-video topic and per-clip content
  (random, in the same 384-d space) and feature noise;
- subtitles are missing on ``sub_missing`` of the clips (a ``t``/``vt`` moment keeps one).

What the features do not hold: real pixels or dialogue. The model must learn to map a
text's tokens to the planted meaning and to weigh the streams by the query -- on real
sentences, whose similarities (paraphrases, shared names) are real. The manifest records
the encoder, its package version and this config.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import asdict

import numpy as np

from xmr.data.manifest import LabelSpec, Manifest, ModalitySpec
from xmr.data.sources.synth_vcmr import moment_clips
from xmr.data.tvr_annotations import read_tvr_jsonl
from xmr.data.writer import DatasetWriter
from xmr.data.sources.configs import TextVcmrConfig  # noqa: F401 (re-exported)


def read_videos(path: str) -> list[tuple[str, float, list[dict]]]:
    """``[(vid_name, duration, [annotation, ...]), ...]`` sorted by name; queries by desc_id."""
    groups: dict[str, list[dict]] = defaultdict(list)
    durations: dict[str, float] = {}
    for d in read_tvr_jsonl(path):
        groups[d["vid_name"]].append(d)
        durations[d["vid_name"]] = float(d["duration"])
    return [(v, durations[v], sorted(groups[v], key=lambda d: d["desc_id"])) for v in sorted(groups)]


def _rng(seed: int, what: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}/text-vcmr/{what}".encode()).digest()[:8],
                                                "little"))


def stream_projections(cfg: TextVcmrConfig, dim: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each stream's fixed random projection from the sentence space to its features, and
    its offset (from ``cfg.seed``)."""
    rng0 = _rng(cfg.seed, "maps")
    maps = {"visual": rng0.normal(0, 1.0, (cfg.dim_visual, dim)), "subtitle": rng0.normal(0, 1.0, (cfg.dim_subtitle, dim))}
    return maps, {s: rng0.normal(0, 1.0, m.shape[0]) for s, m in maps.items()}


def write_text_vcmr(out: str, cfg: TextVcmrConfig, *, name: str = "text-vcmr", samples_per_shard: int = 64,
                    overwrite: bool = False, endpoint_url: str | None = None, progress: bool = True,
                    encoder=None, cache_dir: str | None = None) -> Manifest:
    """Build and write the corpus. ``encoder``: a loaded ``TextEncoder`` (default: load
    ``cfg.text_encoder``, unpacked under ``cache_dir``: the runtime's cache)."""
    from xmr.data.text_encoder import describe_encoder, load_text_encoder
    from xmr.progress_line import with_progress

    cfg.validate()
    videos = read_videos(cfg.queries_from)
    wanted = sum(cfg.splits.values())
    if wanted > len(videos):
        raise ValueError(f"splits ask for {wanted} videos; {cfg.queries_from} annotates {len(videos)}")
    encoder = encoder or load_text_encoder(cfg.text_encoder, cache=cache_dir)
    dim = encoder.dim
    maps, offsets = stream_projections(cfg, dim)
    order = _rng(cfg.seed, "order").permutation(len(videos))[:wanted]
    w = DatasetWriter(out, name=name, task="vcmr",
                      modalities={"visual": ModalitySpec("text_planted_visual", [cfg.dim_visual], cfg.dtype),
                                  "subtitle": ModalitySpec("text_planted_subtitle", [cfg.dim_subtitle], cfg.dtype),
                                  "query": ModalitySpec(f"text_{cfg.text_encoder}_tokens", [dim], cfg.dtype)},
                      labels=LabelSpec("none", []),
                      source={"kind": "text-vcmr", "details": {**asdict(cfg),
                                                               "text_encoder": describe_encoder(cfg.text_encoder)}},
                      clip_len=cfg.clip_len, samples_per_shard=samples_per_shard, overwrite=overwrite,
                      endpoint_url=endpoint_url)
    at, video_index = 0, 0
    for split, n_videos in cfg.splits.items():
        picked = [videos[int(i)] for i in order[at:at + n_videos]]
        at += n_videos
        with w.split(split) as s:
            for i, (vid, duration, anns) in enumerate(with_progress(picked, f"text vcmr {split}", len(picked),
                                                                    "videos", speak=progress)):
                if cfg.max_queries:
                    anns = anns[: cfg.max_queries]
                arrays, meta = _video(cfg, encoder, maps, offsets, vid, duration, anns, video_index)
                s.write(vid, arrays=arrays, meta={"index": i, **meta})
                video_index += 1
    return w.finish()


def _video(cfg: TextVcmrConfig, encoder, maps: dict, offsets: dict, vid: str, duration: float, anns: list[dict],
           video_index: int) -> tuple[dict, dict]:
    rng = _rng(cfg.seed, vid)
    dim = encoder.dim
    n = max(1, int(math.ceil(duration / cfg.clip_len)))
    scale = cfg.content_scale / math.sqrt(dim)  # content vectors of about content_scale norm, like the unit sentences
    topic = rng.normal(0, scale, dim)
    lat = {s: topic + rng.normal(0, 0.5 * scale, (n, dim)) for s in maps}
    mask = (rng.random(n) >= cfg.sub_missing).astype(np.uint8)
    texts = [str(a["desc"]) for a in anns]
    sentences = encoder.sentences(texts)
    tokens = encoder.tokens(texts)
    qmeta = []
    for j, a in enumerate(anns):
        ts = [min(max(float(a["ts"][0]), 0.0), duration), min(max(float(a["ts"][1]), 0.0), duration)]
        clips = moment_clips(ts, n, cfg.clip_len)
        typ = str(a["type"])
        for stream, letter in (("visual", "v"), ("subtitle", "t")):
            if letter in typ:
                lat[stream][clips.start:clips.stop] += cfg.signal * sentences[j]
        if "t" in typ and not mask[clips.start:clips.stop].any():
            mask[int(rng.integers(clips.start, clips.stop))] = 1
        qmeta.append({"desc_id": int(a["desc_id"]), "desc": texts[j], "type": typ, "ts": ts,
                      "n_tokens": int(tokens[j].shape[0])})
    feats = {s: lat[s] @ maps[s].T + offsets[s] + rng.normal(0, cfg.noise, (n, maps[s].shape[0])) for s in maps}
    feats["subtitle"] *= mask[:, None]
    arrays = {"visual": feats["visual"].astype(np.float32), "subtitle": feats["subtitle"].astype(np.float32),
              "sub_mask": mask,
              "query_tokens": (np.concatenate(tokens).astype(np.float32) if tokens else np.zeros((0, dim), np.float32))}
    return arrays, {"vid_name": vid, "duration": float(duration), "n_clips": n, "video_index": video_index,
                    "queries": qmeta}
