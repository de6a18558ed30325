"""Synthetic video corpus moment retrieval (VCMR) data where QACLN's premise is true and measurable.

As in TVR, a ``v`` query describes what is seen, a ``t`` query what is said, a ``vt`` query
both. Each video has a topic latent and per-clip content latents, separately for the visual
and the subtitle stream. A query's moment gets a visual latent ``m_v`` (``v`` and ``vt``),
planted (times ``signal``) into the visual clips of its moment, and/or a subtitle latent
``m_s`` (``t`` and ``vt``) planted into its subtitle clips. The query's tokens are drawn from
the latent(s) of the stream(s) its type names, through a query "vocabulary" per stream (its
own fixed map and offset: words for what is seen differ from words for what is said), so
the tokens say which stream holds the moment: query-aware fusion has something to learn
(a linear probe of the mean token predicts the type). ``type_cue`` < 1 writes some of a
single-stream query's tokens in the other stream's vocabulary, so the words say its type
only as weakly as real queries do (bench/qcf_cue.py measures both). Features are each stream's fixed
random linear map of its latents plus an offset and noise; subtitles are missing (mask 0,
zero row) on ``sub_missing`` of the clips, but a ``t``/``vt`` moment keeps at least one
subtitled clip. Distractors: ``distractors_per_video`` random-latent segments, and, with
probability ``cross_stream_distractors`` per query, the query's own latent planted in the
*other* stream of a random other video of the split: similar content elsewhere in the
corpus, a wrong answer for a model that does not weigh the streams by query. Durations,
moment positions and types can be drawn from a real TVR jsonl.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from xmr.data.manifest import LabelSpec, Manifest, ModalitySpec
from xmr.data.tvr_annotations import read_tvr_jsonl
from xmr.data.writer import DatasetWriter
from xmr.data.sources.configs import SynthVcmrConfig  # noqa: F401 (re-exported)


@dataclass
class VcmrVideo:
    """One generated video: writer arrays, writer meta, and the planted query latents."""

    key: str
    arrays: dict[str, np.ndarray]
    meta: dict
    query_latents: dict[str, np.ndarray]  # stream -> [n_queries, latent_dim] (zero where the type does not name it)


@dataclass
class SynthVcmrData:
    """All splits plus the planted maps/offsets (``visual``, ``subtitle``, ``query_v``, ``query_t``)."""

    videos: dict[str, list[VcmrVideo]]
    maps: dict[str, np.ndarray]
    offsets: dict[str, np.ndarray]


def moment_clips(ts: list[float], n_clips: int, clip_len: float) -> range:
    """Clips overlapping ``[t_s, t_e]`` (at least one): where the moment's content is planted."""
    st = min(int(math.floor(ts[0] / clip_len)), n_clips - 1)
    ed = min(max(int(math.ceil(ts[1] / clip_len)), st + 1), n_clips)
    return range(st, ed)


def load_real_videos(path: str) -> list[tuple[float, list[tuple[list[float], str]]]]:
    """Group a TVR jsonl by video: ``[(duration, [(ts, type), ...]), ...]`` sorted by name."""
    groups: dict[str, list] = defaultdict(list)
    durations: dict[str, float] = {}
    for d in read_tvr_jsonl(path, required=("vid_name", "duration", "ts", "type")):
        groups[d["vid_name"]].append(([float(d["ts"][0]), float(d["ts"][1])], str(d["type"])))
        durations[d["vid_name"]] = float(d["duration"])
    return [(durations[v], groups[v]) for v in sorted(groups)]


def _split_rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}/vcmr/{split}".encode()).digest()[:8],
                                                "little"))


def _plan_video(cfg: SynthVcmrConfig, rng: np.random.Generator, real: list | None) -> tuple[float, list]:
    """Duration and the queries' ``(ts, type)``, synthetic or sampled from real TVR videos."""
    if real is not None:
        duration, qs = real[int(rng.integers(len(real)))]
        order = rng.permutation(len(qs))[: cfg.max_queries]
        return duration, [([min(max(qs[i][0][0], 0.0), duration), min(max(qs[i][0][1], 0.0), duration)],
                           qs[i][1]) for i in sorted(order)]
    duration = round(float(rng.uniform(cfg.min_duration, cfg.max_duration)), 2)
    probs = cfg.type_probs if cfg.single_stream_share is None else \
        {"v": cfg.single_stream_share / 2, "t": cfg.single_stream_share / 2, "vt": 1 - cfg.single_stream_share}
    types = [t for t in probs if probs[t] > 0]
    p = np.array([probs[t] for t in types], dtype=np.float64)
    queries = []
    for _ in range(int(rng.integers(cfg.min_queries, cfg.max_queries + 1))):
        length = min(float(rng.uniform(cfg.min_moment, cfg.max_moment)), duration)
        r = rng.random()
        if r < cfg.edge_prob / 2:
            start = 0.0
        elif r < cfg.edge_prob:
            start = duration - length
        else:
            start = float(rng.uniform(0, duration - length))
        ts = [round(start, 2), round(min(start + length, duration), 2)]
        queries.append((ts, str(types[int(rng.choice(len(types), p=p / p.sum()))])))
    return duration, queries


STREAMS = ("visual", "subtitle")
QUERY_MAP = {"visual": "query_v", "subtitle": "query_t"}  # each stream's query vocabulary


@dataclass
class _Draft:
    """A video's latents and queries before they become features (distractors go in between)."""

    key: str
    video_index: int
    first_desc_id: int
    duration: float
    queries: list
    lat: dict[str, np.ndarray]
    mask: np.ndarray
    q_lat: dict[str, np.ndarray]


def _draft_video(cfg: SynthVcmrConfig, rng: np.random.Generator, duration: float, queries: list,
                 names: tuple[str, int, int]) -> _Draft:
    key, video_index, first_desc_id = names
    k, n = cfg.latent_dim, max(1, int(math.ceil(duration / cfg.clip_len)))
    topic = rng.normal(0, cfg.content_scale, k)
    lat = {s: topic + rng.normal(0, 0.5 * cfg.content_scale, (n, k)) for s in STREAMS}
    mask = (rng.random(n) >= cfg.sub_missing).astype(np.uint8)
    q_lat = {s: np.zeros((len(queries), k)) for s in STREAMS}
    for j, (ts, typ) in enumerate(queries):
        clips = moment_clips(ts, n, cfg.clip_len)
        for stream, letter in (("visual", "v"), ("subtitle", "t")):
            if letter in typ:
                q_lat[stream][j] = rng.normal(0, 1.0, k)
                lat[stream][clips.start:clips.stop] += cfg.signal * q_lat[stream][j]
        if "t" in typ and not mask[clips.start:clips.stop].any():
            mask[int(rng.integers(clips.start, clips.stop))] = 1
    for _ in range(cfg.distractors_per_video):
        st = int(rng.integers(n))
        ed = min(n, st + int(rng.integers(1, max(2, int(cfg.max_moment / cfg.clip_len)))))
        lat[STREAMS[int(rng.integers(2))]][st:ed] += cfg.signal * rng.normal(0, 1.0, k)
    return _Draft(key, video_index, first_desc_id, duration, queries, lat, mask, q_lat)


def _plant_cross_stream(cfg: SynthVcmrConfig, rng: np.random.Generator, drafts: list[_Draft]) -> None:
    """Each query's latent, with probability ``cross_stream_distractors``, into the other
    stream of a random segment of another video (its own stream's content, elsewhere)."""
    if len(drafts) < 2 or cfg.cross_stream_distractors <= 0:
        return
    for i, d in enumerate(drafts):
        for j in range(len(d.queries)):
            if rng.random() >= cfg.cross_stream_distractors:
                continue
            named = [s for s in STREAMS if d.q_lat[s][j].any()]
            source = named[int(rng.integers(len(named)))]
            other = drafts[(i + 1 + int(rng.integers(len(drafts) - 1))) % len(drafts)]
            n = other.lat["visual"].shape[0]
            st = int(rng.integers(n))
            ed = min(n, st + int(rng.integers(1, max(2, int(cfg.max_moment / cfg.clip_len)))))
            target = "subtitle" if source == "visual" else "visual"
            other.lat[target][st:ed] += cfg.signal * d.q_lat[source][j]
            if target == "subtitle":
                other.mask[st:ed] = 1  # the distractor is heard, so its clips have subtitles


def _worded_as(cfg: SynthVcmrConfig, rng: np.random.Generator, stream: str, n_named: int) -> str:
    """The stream whose vocabulary writes one token of a query about ``stream``: its own, or
    (a single-stream query, with probability (1 - type_cue) / 2) the other's. At type_cue 1
    nothing is drawn, so corpora generated before the setting existed are unchanged."""
    if cfg.type_cue >= 1 or n_named > 1 or rng.random() < (1 + cfg.type_cue) / 2:
        return stream
    return "subtitle" if stream == "visual" else "visual"


def _finish_video(cfg: SynthVcmrConfig, rng: np.random.Generator, maps: dict, offsets: dict, d: _Draft,
                  token_counts: list[int] | None = None) -> VcmrVideo:
    """Features of a drafted video; ``token_counts`` fixes each query's token count (else drawn)."""
    k, n = cfg.latent_dim, d.lat["visual"].shape[0]
    feats = {s: d.lat[s] @ maps[s].T + offsets[s] + rng.normal(0, cfg.noise, (n, maps[s].shape[0])) for s in STREAMS}
    feats["subtitle"] *= d.mask[:, None]
    tokens, qmeta = [], []
    for j, (ts, typ) in enumerate(d.queries):
        nt = int(token_counts[j]) if token_counts is not None else int(rng.integers(cfg.min_tokens, cfg.max_tokens + 1))
        named = [s for s, letter in (("visual", "v"), ("subtitle", "t")) if letter in typ]
        rows = []
        for t in range(nt):  # a vt query's tokens alternate between its two vocabularies
            stream = named[t % len(named)]
            z = d.q_lat[stream][j] + rng.normal(0, cfg.token_noise, k)
            vocab = QUERY_MAP[_worded_as(cfg, rng, stream, len(named))]
            rows.append(z @ maps[vocab].T + offsets[vocab] + rng.normal(0, cfg.noise, cfg.dim_query))
        tokens.append(np.stack(rows))
        desc_id = d.first_desc_id + j
        qmeta.append({"desc_id": desc_id, "desc": f"synthetic {typ} query {desc_id} on {d.key}",
                      "type": typ, "ts": [float(ts[0]), float(ts[1])], "n_tokens": nt})
    arrays = {"visual": feats["visual"].astype(np.float32), "subtitle": feats["subtitle"].astype(np.float32),
              "sub_mask": d.mask,
              "query_tokens": (np.concatenate(tokens).astype(np.float32) if tokens
                               else np.zeros((0, cfg.dim_query), np.float32))}
    meta = {"vid_name": d.key, "duration": float(d.duration), "n_clips": n, "video_index": d.video_index,
            "queries": qmeta}
    return VcmrVideo(key=d.key, arrays=arrays, meta=meta, query_latents=d.q_lat)


def planted_maps(cfg: SynthVcmrConfig) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each stream's and each query vocabulary's fixed linear map and offset (from ``cfg.seed``)."""
    rng0 = np.random.default_rng(cfg.seed)
    dims = {"visual": cfg.dim_visual, "subtitle": cfg.dim_subtitle, "query_v": cfg.dim_query, "query_t": cfg.dim_query}
    maps = {s: rng0.normal(0, 1 / np.sqrt(cfg.latent_dim), (d, cfg.latent_dim)) for s, d in dims.items()}
    offsets = {s: rng0.normal(0, 1.0, d) for s, d in dims.items()}
    for vocab in ("query_v", "query_t"):
        offsets[vocab] = rng0.normal(0, cfg.query_offset_scale, cfg.dim_query)
    return maps, offsets


def generate_vcmr(cfg: SynthVcmrConfig, progress: bool = False) -> SynthVcmrData:
    """The whole corpus in memory, deterministic in ``cfg.seed`` (and the jsonl, if given)."""
    cfg.validate()
    maps, offsets = planted_maps(cfg)
    real = load_real_videos(cfg.durations_from) if cfg.durations_from else None
    videos: dict[str, list[VcmrVideo]] = {}
    video_index, desc_id = 0, 0
    for split, n_videos in cfg.splits.items():
        rng = _split_rng(cfg.seed, split)
        drafts = []
        for i in range(n_videos):
            duration, queries = _plan_video(cfg, rng, real)
            drafts.append(_draft_video(cfg, rng, duration, queries, (f"synth_{split}_{i:05d}", video_index, desc_id)))
            video_index += 1
            desc_id += len(queries)
        _plant_cross_stream(cfg, rng, drafts)
        videos[split] = [_finish_video(cfg, rng, maps, offsets, d)
                         for d in tqdm(drafts, desc=f"synth vcmr {split}", disable=not progress)]
    return SynthVcmrData(videos=videos, maps=maps, offsets=offsets)


def write_synth_vcmr(out: str, cfg: SynthVcmrConfig, *, name: str = "synth-vcmr", samples_per_shard: int = 64,
                     overwrite: bool = False, endpoint_url: str | None = None, progress: bool = True) -> Manifest:
    """Generate and write the corpus; the config is recorded in ``source.details``."""
    data = generate_vcmr(cfg, progress=progress)
    w = DatasetWriter(out, name=name, task="vcmr",
                      modalities={"visual": ModalitySpec("synth_visual", [cfg.dim_visual], cfg.dtype),
                                  "subtitle": ModalitySpec("synth_subtitle", [cfg.dim_subtitle], cfg.dtype),
                                  "query": ModalitySpec("synth_query", [cfg.dim_query], cfg.dtype)},
                      labels=LabelSpec("none", []), source={"kind": "synth-vcmr", "details": asdict(cfg)},
                      clip_len=cfg.clip_len, samples_per_shard=samples_per_shard, overwrite=overwrite,
                      endpoint_url=endpoint_url)
    for split, videos in data.videos.items():
        with w.split(split) as s:
            for i, v in enumerate(videos):
                s.write(v.key, arrays=v.arrays, meta={"index": i, **v.meta})
    return w.finish()
