"""A TVR-sized corpus in the public release's layout, with the synthetic VCMR generator's
planted structure (``xmr.data.sources.synth_vcmr``), for exercising the pipeline at scale.

What it writes into ``out`` is what the TVR release and its feature packs ship, so
``xmr data convert tvr`` reads it exactly as it reads the real thing:

- ``tvr_<split>_release.jsonl``: one query a line, ``vid_name, duration, ts, desc, type, desc_id``;
- ``tvr_video2dur_idx.json``: ``{split: {vid_name: [duration, video_index]}}``;
- ``tvr_visual_cl-1.5.h5``: ``vid_name -> [n_clips, 3072]`` (ResNet-152 2,048 + I3D 1,024 in
  the release; one clip per 1.5 s);
- ``tvr_sub_cl-1.5.h5``: ``vid_name -> [n_clips, 768]`` and ``vid_name-mask -> [n_clips]``;
- ``tvr_query.h5``: ``str(desc_id) -> [n_tokens, 768]`` (at most 30 tokens);
- ``README.txt`` with the ``xmr data convert tvr`` command for these files.

Sizes are parameters; the defaults are TVR's (17,435 train and 2,179 val videos). Given the
real ``tvr_video2dur_idx.json``, each split's videos are the real ones (names, durations,
indices); given the real validation annotations (``tvr_val_release.jsonl``), the val split's
queries are the real ones (moments, types, descriptions, ids: 10,895 of them) and each train
video's queries are those of a random real validation video, their moments scaled to its
duration (TVR's ~5 queries a video, its type mix and moment lengths). Without them, durations
and moments are drawn as the synthetic generator draws them. A query's token count is its
description's word count (capped at 30) when it has a real description.

Streaming: videos are drafted (latents only, 16-d per clip) for a split, then each video's
features are made and written to the HDF5 files one at a time, so memory stays at the
drafts (about 0.1 GB for TVR's train split) whatever the feature dimensions.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xmr.data.sources.synth_vcmr import (SynthVcmrConfig, _draft_video, _finish_video, _plan_video,
                                         _plant_cross_stream, _split_rng, planted_maps)
from xmr.data.tvr_annotations import read_tvr_jsonl
from xmr.data.sources.configs import TVR_SIZES, TvrReleaseConfig  # noqa: F401 (re-exported)

FILES = {"video2dur": "tvr_video2dur_idx.json", "visual": "tvr_visual_cl-1.5.h5", "subtitle": "tvr_sub_cl-1.5.h5",
         "query": "tvr_query.h5"}


def annotations_file(split: str) -> str:
    return f"tvr_{split}_release.jsonl"


@dataclass
class ReleaseReport:
    videos: dict[str, int] = field(default_factory=dict)
    queries: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


def _real_queries(path: str) -> dict[str, list[dict]]:
    by_video: dict[str, list[dict]] = defaultdict(list)
    for a in read_tvr_jsonl(path):
        by_video[a["vid_name"]].append(a)
    return by_video


def _n_tokens(desc: str | None, rng: np.random.Generator, cfg: TvrReleaseConfig) -> int:
    if desc:
        return max(cfg.min_tokens, min(cfg.max_tokens, len(desc.split())))
    return int(rng.integers(cfg.min_tokens, cfg.max_tokens + 1))


def _plan_split(cfg: TvrReleaseConfig, gen: SynthVcmrConfig, split: str, n: int, rng: np.random.Generator,
                real_v2d: dict | None, real_q: dict | None, first_index: int, first_desc_id: int):
    """[(vid_name, duration, video_index, [query dicts])] for one split."""
    if real_v2d is not None and split in real_v2d:
        names = sorted(real_v2d[split], key=lambda v: (int(real_v2d[split][v][1]), v))[:n]
        corpus = [(v, float(real_v2d[split][v][0]), int(real_v2d[split][v][1])) for v in names]
    else:
        corpus = []
        for i in range(n):
            duration, _ = _plan_video(gen, rng, None)
            corpus.append((f"tvrsynth_{split}_{i:05d}", duration, first_index + i))
    pool = sorted(real_q) if real_q else []
    desc_id, plans = first_desc_id, []
    for vid, duration, index in corpus:
        if real_q and vid in real_q:  # the real queries of this video (val)
            queries = [{"ts": [min(max(float(a["ts"][0]), 0.0), duration), min(max(float(a["ts"][1]), 0.0), duration)],
                        "type": a["type"], "desc": a["desc"], "desc_id": int(a["desc_id"])}
                       for a in sorted(real_q[vid], key=lambda a: int(a["desc_id"]))]
        elif pool:  # those of a random real video, scaled to this one's duration
            source = real_q[pool[int(rng.integers(len(pool)))]]
            scale = duration / max(float(source[0]["duration"]), 1e-6)
            queries = []
            for a in source:
                ts = sorted(min(max(float(t) * scale, 0.0), duration) for t in a["ts"])
                queries.append({"ts": [round(ts[0], 2), round(ts[1], 2)], "type": a["type"], "desc": a["desc"],
                                "desc_id": desc_id})
                desc_id += 1
        else:
            _, drawn = _plan_video(replace(gen, min_duration=duration, max_duration=duration), rng, None)
            queries = []
            for ts, typ in drawn:
                queries.append({"ts": ts, "type": typ, "desc": None, "desc_id": desc_id})
                desc_id += 1
        plans.append((vid, duration, index, queries))
    return plans, desc_id


def write_tvr_release(out: str, cfg: TvrReleaseConfig, progress: bool = True, overwrite: bool = False) -> ReleaseReport:
    """Write the release-layout files for ``cfg`` into ``out`` (a local directory)."""
    import h5py
    import resource

    cfg.validate()
    t0 = time.perf_counter()
    root = Path(out)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty (pass --overwrite to replace it)")
    root.mkdir(parents=True, exist_ok=True)
    gen = cfg.generator()
    maps, offsets = planted_maps(gen)
    real_v2d = json.loads(Path(cfg.video2dur).read_text()) if cfg.video2dur else None
    real_q = _real_queries(cfg.annotations) if cfg.annotations else None
    report, v2d_out = ReleaseReport(), {}
    first_desc_id = 1 + max((int(a["desc_id"]) for qs in (real_q or {}).values() for a in qs), default=-1)
    first_index = 0
    with h5py.File(root / FILES["visual"], "w") as vh5, h5py.File(root / FILES["subtitle"], "w") as sh5, \
            h5py.File(root / FILES["query"], "w") as qh5:
        for split, n in cfg.splits.items():
            rng = _split_rng(cfg.seed, f"release/{split}")
            plans, first_desc_id = _plan_split(cfg, gen, split, n, rng, real_v2d, real_q, first_index, first_desc_id)
            first_index += len(plans)
            drafts = [_draft_video(gen, rng, duration, [(q["ts"], q["type"]) for q in queries], (vid, index, 0))
                      for vid, duration, index, queries in plans]
            _plant_cross_stream(gen, rng, drafts)
            v2d_out[split] = {}
            n_queries = 0
            with open(root / annotations_file(split), "w", encoding="utf-8") as ann:
                for (vid, duration, index, queries), draft in tqdm(list(zip(plans, drafts)), desc=f"tvr-release {split}",
                                                                   disable=not progress):
                    counts = [_n_tokens(q["desc"], rng, cfg) for q in queries]
                    video = _finish_video(gen, rng, maps, offsets, draft, token_counts=counts)
                    vh5.create_dataset(vid, data=video.arrays["visual"].astype(np.float16))
                    sh5.create_dataset(vid, data=video.arrays["subtitle"].astype(np.float16))
                    sh5.create_dataset(f"{vid}-mask", data=video.arrays["sub_mask"].astype(np.uint8))
                    tokens = np.split(video.arrays["query_tokens"], np.cumsum(counts)[:-1]) if counts else []
                    for q, tok, typ_meta in zip(queries, tokens, video.meta["queries"]):
                        qh5.create_dataset(str(q["desc_id"]), data=tok.astype(np.float16))
                        desc = q["desc"] or typ_meta["desc"]
                        ann.write(json.dumps({"vid_name": vid, "duration": duration, "ts": q["ts"], "desc": desc,
                                              "type": q["type"], "desc_id": q["desc_id"]}) + "\n")
                    v2d_out[split][vid] = [duration, index]
                    n_queries += len(queries)
                    draft.lat = {}  # its features are written: drop the latents as we go
            report.videos[split], report.queries[split] = len(plans), n_queries
    (root / FILES["video2dur"]).write_text(json.dumps(v2d_out))
    (root / "README.txt").write_text(readme(out, list(cfg.splits)))
    report.bytes = {p.name: p.stat().st_size for p in root.iterdir() if p.is_file()}
    report.seconds = time.perf_counter() - t0
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


def convert_command(out: str, splits: list[str], shards: str = "<shards dir>") -> str:
    root = os.path.abspath(out)
    parts = " ".join(f"{s}={root}/{annotations_file(s)}" for s in splits)
    return (f"xmr data convert tvr --out {shards} --splits {parts} --video-feats {root}/{FILES['visual']} "
            f"--sub-feats {root}/{FILES['subtitle']} --query-feats {root}/{FILES['query']} "
            f"--video2dur {root}/{FILES['video2dur']}")


def readme(out: str, splits: list[str]) -> str:
    return ("A synthetic corpus in the TVR release layout, written by `xmr data synth tvr-release`\n"
            "(features with planted structure, not real features). Convert it to shards with:\n\n"
            f"    {convert_command(out, splits)}\n")


def summary(report: ReleaseReport) -> str:
    size = sum(report.bytes.values()) / 2**30
    return (f"videos {report.videos}, queries {report.queries}; {size:.2f} GiB in {len(report.bytes)} files; "
            f"{report.seconds:.0f} s, peak memory {report.peak_rss_mb:.0f} MB")

