"""Convert the public TVR release layout (annotations + HDF5 features) into vcmr shards.

Inputs, as the TVR release and its feature packs ship them:
- one annotation jsonl per split: ``{"vid_name", "duration", "ts", "desc", "type", "desc_id"}``;
- clip visual features, HDF5 keyed by ``vid_name`` -> ``[n_clips, Dv]``;
- subtitle features, HDF5 keyed by ``vid_name`` -> ``[n_clips, Ds]``, with an optional
  ``f"{vid_name}-mask"`` dataset; without it a clip has a subtitle iff its row is non-zero;
- query token features, HDF5 keyed by ``str(desc_id)`` -> ``[n_tokens, Dq]``;
- ``video2dur_idx`` json ``{split: {vid_name: [duration, video_index]}}``.

Every video of a split's corpus (its video2dur entry) is written, queried or not, because
VR/VCMR rank the whole corpus. ``n_clips`` is what the visual HDF5 holds (normally
``ceil(duration / 1.5)``), capped by ``max_clips``; subtitle rows are padded/cut to match.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xmr.data.manifest import LabelSpec, Manifest, ModalitySpec
from xmr.data.tvr_annotations import read_tvr_jsonl
from xmr.data.writer import DatasetWriter

CLIP_LEN = 1.5
_KEY_OK = re.compile(r"[^A-Za-z0-9_\-]")


class TvrInputError(ValueError):
    """A TVR input file is missing a key or has a malformed entry; names file and key."""


@dataclass
class TvrReport:
    """What the conversion did, per split; printed by the CLI and kept in ``source.details``."""

    videos: dict[str, int] = field(default_factory=dict)
    videos_without_query: dict[str, int] = field(default_factory=dict)
    queries: dict[str, int] = field(default_factory=dict)
    clips_truncated: int = 0          # videos cut to max_clips
    clip_count_mismatch: int = 0      # h5 rows != ceil(duration / clip_len)
    tokens_truncated: int = 0         # queries cut to max_query_tokens
    ts_clamped: int = 0               # moments clipped into [0, duration]
    skipped_videos: list[str] = field(default_factory=list)
    skipped_queries: list[int] = field(default_factory=list)


def read_annotations(path: str | Path) -> list[dict]:
    """Parse a TVR jsonl, checking each line's fields; errors name file and line."""
    return read_tvr_jsonl(path, error=TvrInputError)


def _key(vid_name: str, used: set[str]) -> str:
    """A webdataset-safe sample key (no dots) that stays unique."""
    base = _KEY_OK.sub("_", vid_name) or "video"
    key, i = base, 1
    while key in used:
        key, i = f"{base}_{i}", i + 1
    used.add(key)
    return key


def _get(h5, name: str, key: str, skip: bool) -> np.ndarray | None:
    if key in h5:
        return np.asarray(h5[key][()], dtype=np.float32)
    if skip:
        return None
    raise TvrInputError(f"{name}: no dataset {key!r} (pass --skip-missing to skip such videos/queries)")


def _subtitles(h5, name: str, vid: str, n: int, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``[n, Ds]`` features and uint8 mask, padded with no-subtitle rows or cut to ``n``."""
    if vid not in h5:
        return None
    feat = np.asarray(h5[vid][()], dtype=np.float32).reshape(-1, dim)
    mkey = f"{vid}-mask"
    mask = (np.asarray(h5[mkey][()]).reshape(-1) > 0) if mkey in h5 else np.abs(feat).sum(axis=1) > 0
    out_f, out_m = np.zeros((n, dim), np.float32), np.zeros(n, np.uint8)
    m = min(n, feat.shape[0], mask.shape[0])
    out_m[:m] = mask[:m]
    out_f[:m] = feat[:m] * out_m[:m, None]
    return out_f, out_m


def _dims(vh5, sh5, qh5, names: tuple[str, str, str]) -> tuple[int, int, int]:
    dims = []
    for h5, name in zip((vh5, sh5, qh5), names):
        first = next((k for k in h5.keys() if not k.endswith("-mask")), None)
        if first is None:
            raise TvrInputError(f"{name}: the HDF5 file has no feature datasets")
        dims.append(int(h5[first].shape[-1]))
    return dims[0], dims[1], dims[2]


def convert_tvr(out: str, *, splits: dict[str, str], video_feats: str, sub_feats: str, query_feats: str,
                video2dur: str, max_clips: int | None = None, max_query_tokens: int | None = None,
                skip_missing: bool = False, name: str = "tvr", dtype: str = "float16",
                samples_per_shard: int = 64, overwrite: bool = False, endpoint_url: str | None = None,
                progress: bool = True) -> tuple[Manifest, TvrReport]:
    """Write one vcmr split per ``splits`` entry (split name -> jsonl path)."""
    import h5py

    v2d_all = json.loads(Path(video2dur).read_text())
    report = TvrReport()
    with h5py.File(video_feats, "r") as vh5, h5py.File(sub_feats, "r") as sh5, h5py.File(query_feats, "r") as qh5:
        dv, ds, dq = _dims(vh5, sh5, qh5, (video_feats, sub_feats, query_feats))
        details = {"splits": dict(splits), "video_feats": str(video_feats), "sub_feats": str(sub_feats),
                   "query_feats": str(query_feats), "video2dur": str(video2dur), "max_clips": max_clips,
                   "max_query_tokens": max_query_tokens, "skip_missing": skip_missing}
        w = DatasetWriter(out, name=name, task="vcmr",
                          modalities={"visual": ModalitySpec("tvr_visual", [dv], dtype),
                                      "subtitle": ModalitySpec("tvr_subtitle", [ds], dtype),
                                      "query": ModalitySpec("tvr_query", [dq], dtype)},
                          labels=LabelSpec("none", []), source={"kind": "tvr", "details": details},
                          clip_len=CLIP_LEN, samples_per_shard=samples_per_shard, overwrite=overwrite,
                          endpoint_url=endpoint_url)
        for split, jsonl in splits.items():
            if split not in v2d_all:
                raise TvrInputError(f"{video2dur}: no split {split!r} (splits: {sorted(v2d_all)})")
            _convert_split(w, split, read_annotations(jsonl), v2d_all[split], (vh5, sh5, qh5),
                           (video_feats, sub_feats, query_feats, video2dur), (dv, ds, dq),
                           max_clips, max_query_tokens, skip_missing, report, progress)
        w.source["details"]["report"] = asdict(report)
        return w.finish(), report


def _convert_split(w: DatasetWriter, split: str, anns: list[dict], v2d: dict, h5s: tuple, names: tuple,
                   dims: tuple[int, int, int], max_clips: int | None, max_tokens: int | None,
                   skip: bool, report: TvrReport, progress: bool) -> None:
    vh5, sh5, qh5 = h5s
    vname, sname, qname, v2d_name = names
    by_video: dict[str, list[dict]] = defaultdict(list)
    for a in anns:
        if a["vid_name"] not in v2d:
            if skip:
                report.skipped_queries.append(int(a["desc_id"]))
                continue
            raise TvrInputError(f"{v2d_name}: split {split!r} has no video {a['vid_name']!r} "
                                f"(queried by desc_id {a['desc_id']})")
        by_video[a["vid_name"]].append(a)
    order = sorted(v2d, key=lambda v: (int(v2d[v][1]), v))
    used: set[str] = set()
    n_written = n_queries = n_empty = 0
    with w.split(split) as s:
        for vid in tqdm(order, desc=f"tvr {split}", disable=not progress):
            duration, video_index = float(v2d[vid][0]), int(v2d[vid][1])
            visual = _get(vh5, vname, vid, skip)
            if visual is not None:
                visual = visual.reshape(-1, dims[0])
                if visual.shape[0] == 0:
                    raise TvrInputError(f"{vname}: dataset {vid!r} has no clips (shape {list(visual.shape)})")
            subs = None if visual is None else _subtitles(sh5, sname, vid, visual.shape[0], dims[1])
            if visual is None or subs is None:
                if subs is None and visual is not None and not skip:
                    raise TvrInputError(f"{sname}: no dataset {vid!r} (pass --skip-missing to skip such videos)")
                report.skipped_videos.append(vid)
                report.skipped_queries.extend(int(a["desc_id"]) for a in by_video.get(vid, []))
                continue
            if visual.shape[0] != max(1, math.ceil(duration / CLIP_LEN)):
                report.clip_count_mismatch += 1
            n = visual.shape[0]
            if max_clips is not None and n > max_clips:
                n = max_clips
                report.clips_truncated += 1
            queries, tokens = [], []
            for a in sorted(by_video.get(vid, []), key=lambda a: int(a["desc_id"])):
                tok = _get(qh5, qname, str(a["desc_id"]), skip)
                if tok is None:
                    report.skipped_queries.append(int(a["desc_id"]))
                    continue
                tok = tok.reshape(-1, dims[2])
                if max_tokens is not None and tok.shape[0] > max_tokens:
                    tok = tok[:max_tokens]
                    report.tokens_truncated += 1
                ts = [float(a["ts"][0]), float(a["ts"][1])]
                clamped = [min(max(ts[0], 0.0), duration), min(max(ts[1], 0.0), duration)]
                clamped[0] = min(clamped)
                if clamped != ts:
                    report.ts_clamped += 1
                queries.append({"desc_id": int(a["desc_id"]), "desc": str(a["desc"]), "type": a["type"],
                                "ts": clamped, "n_tokens": int(tok.shape[0])})
                tokens.append(tok)
            arrays = {"visual": visual[:n], "subtitle": subs[0][:n], "sub_mask": subs[1][:n],
                      "query_tokens": np.concatenate(tokens) if tokens else np.zeros((0, dims[2]), np.float32)}
            s.write(_key(vid, used), arrays=arrays,
                    meta={"index": n_written, "vid_name": vid, "duration": duration, "n_clips": n,
                          "video_index": video_index, "queries": queries})
            n_written += 1
            n_queries += len(queries)
            n_empty += not queries
    report.videos[split], report.queries[split], report.videos_without_query[split] = n_written, n_queries, n_empty
