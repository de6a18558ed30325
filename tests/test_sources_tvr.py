"""TVR converter on a fixture in the exact release layout, built from REAL annotation lines
(and their real durations and video indices) with random features."""

from __future__ import annotations

import argparse
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

from xmr.data.sources.cli import register_sources
from xmr.data.sources.tvr import TvrInputError, convert_tvr

pytestmark = pytest.mark.timeout(120)

TVR_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tvr"
DV, DS, DQ = 8, 6, 5


@pytest.fixture(scope="module")
def tvr_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two splits ("val", "train") of real val annotations, extra query-less corpus videos,
    and HDF5 files keyed as the release keys them."""
    import h5py

    if not (TVR_DIR / "tvr_val_release.jsonl").is_file():
        pytest.skip("needs ../shared/data/tvr (TVR annotations)")
    root = tmp_path_factory.mktemp("tvr_fixture")
    v2d_real = json.loads((TVR_DIR / "tvr_video2dur_idx.json").read_text())["val"]
    lines, videos = [], []
    with open(TVR_DIR / "tvr_val_release.jsonl") as f:
        for line in f:
            d = json.loads(line)
            if d["vid_name"] not in videos:
                if len(videos) == 14:
                    continue
                videos.append(d["vid_name"])
            lines.append(d)
            if len(lines) >= 45 and len(videos) == 14:
                break
    extra = [v for v in sorted(v2d_real) if v not in videos][:3]          # corpus videos without queries
    split_of = {v: ("val" if i < 9 else "train") for i, v in enumerate(videos)}
    split_of.update({extra[0]: "val", extra[1]: "val", extra[2]: "train"})
    v2d = {"val": {}, "train": {}, "test_public": {}}
    for v, s in split_of.items():
        v2d[s][v] = v2d_real[v]
    (root / "video2dur.json").write_text(json.dumps(v2d))
    for s in ("val", "train"):
        (root / f"{s}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines if split_of[d["vid_name"]] == s))
    rng = np.random.default_rng(0)
    with h5py.File(root / "video.h5", "w") as vh, h5py.File(root / "sub.h5", "w") as sh, \
            h5py.File(root / "query.h5", "w") as qh:
        for i, v in enumerate(sorted(split_of)):
            n = math.ceil(v2d_real[v][0] / 1.5) + (1 if i == 0 else 0)      # one video holds an extra row
            vh[v] = rng.normal(size=(n, DV)).astype(np.float32)
            sub = rng.normal(size=(n, DS)).astype(np.float32)
            sub[rng.random(n) < 0.3] = 0
            sh[v] = sub
            if i % 2:
                sh[f"{v}-mask"] = (rng.random(n) < 0.5).astype(np.uint8)
        for d in lines:
            qh[str(d["desc_id"])] = rng.normal(size=(int(rng.integers(3, 20)), DQ)).astype(np.float32)
    return {"root": root, "lines": lines, "v2d": v2d, "split_of": split_of, "n_videos": len(split_of)}


def _files(fx: dict) -> dict:
    r = fx["root"]
    return {"video_feats": str(r / "video.h5"), "sub_feats": str(r / "sub.h5"), "query_feats": str(r / "query.h5"),
            "video2dur": str(r / "video2dur.json")}


def _read(root: Path, m, split: str) -> list[dict]:
    out = []
    for shard in m.splits[split].shards:
        with tarfile.open(root / shard.path) as t:
            samples: dict[str, dict] = {}
            for mem in t.getmembers():
                key, rest = mem.name.split(".", 1)
                data = t.extractfile(mem).read()
                samples.setdefault(key, {})[rest] = json.loads(data) if rest == "json" else np.load(io.BytesIO(data))
            out.extend(samples[k] for k in sorted(samples, key=lambda k: samples[k]["json"]["index"]))
    return out


def test_round_trip_clips_moments_and_indices(tvr_fixture: dict, tmp_path: Path) -> None:
    import h5py

    fx, out = tvr_fixture, tmp_path / "tvr"
    splits = {"val": str(fx["root"] / "val.jsonl"), "train": str(fx["root"] / "train.jsonl")}
    m, rep = convert_tvr(str(out), splits=splits, samples_per_shard=4, progress=False, **_files(fx))
    by_id = {d["desc_id"]: d for d in fx["lines"]}
    assert m.clip_len == 1.5 and m.modalities["visual"].shape == [DV] and m.modalities["query"].shape == [DQ]
    assert sum(rep.videos.values()) == fx["n_videos"] and rep.videos_without_query == {"val": 2, "train": 1}
    assert sum(s.num_queries for s in m.splits.values()) == len(fx["lines"])
    assert rep.clip_count_mismatch == 1
    with h5py.File(fx["root"] / "video.h5") as vh, h5py.File(fx["root"] / "sub.h5") as sh, \
            h5py.File(fx["root"] / "query.h5") as qh:
        for split in ("val", "train"):
            samples = _read(out, m, split)
            assert [s["json"]["vid_name"] for s in samples] == sorted(
                fx["v2d"][split], key=lambda v: fx["v2d"][split][v][1]), "videos are ordered by video index"
            for s in samples:
                meta, vid = s["json"], s["json"]["vid_name"]
                duration, index = fx["v2d"][split][vid]
                assert meta["video_index"] == index and meta["duration"] == duration
                assert meta["n_clips"] == vh[vid].shape[0] and meta["n_clips"] in (
                    math.ceil(duration / 1.5), math.ceil(duration / 1.5) + 1)
                assert np.allclose(s["visual.npy"], vh[vid][()], atol=1e-2)
                mask = sh[f"{vid}-mask"][()] > 0 if f"{vid}-mask" in sh else np.abs(sh[vid][()]).sum(1) > 0
                assert np.array_equal(s["sub_mask.npy"].astype(bool), mask)
                assert not s["subtitle.npy"][~mask].any()
                start = 0
                for q in meta["queries"]:
                    src = by_id[q["desc_id"]]
                    assert src["vid_name"] == vid and q["type"] == src["type"] and q["desc"] == src["desc"]
                    assert q["ts"] == [min(t, duration) for t in src["ts"]]
                    tok = s["query_tokens.npy"][start: start + q["n_tokens"]]
                    assert np.allclose(tok, qh[str(q["desc_id"])][()], atol=1e-2)
                    start += q["n_tokens"]
                assert start == s["query_tokens.npy"].shape[0]


def test_truncation_is_counted(tvr_fixture: dict, tmp_path: Path) -> None:
    fx = tvr_fixture
    m, rep = convert_tvr(str(tmp_path), splits={"val": str(fx["root"] / "val.jsonl")}, max_clips=20,
                         max_query_tokens=6, progress=False, **_files(fx))
    samples = _read(tmp_path, m, "val")
    assert max(s["json"]["n_clips"] for s in samples) == 20
    assert rep.clips_truncated == sum(1 for v, (d, _) in fx["v2d"]["val"].items() if math.ceil(d / 1.5) > 20)
    assert rep.clips_truncated > 0 and rep.tokens_truncated > 0
    assert max(q["n_tokens"] for s in samples for q in s["json"]["queries"]) == 6


def test_missing_keys_error_or_skip(tvr_fixture: dict, tmp_path: Path) -> None:
    import shutil

    import h5py

    fx = tvr_fixture
    files = _files(fx)
    query_copy = tmp_path / "query_missing.h5"
    shutil.copy(files["query_feats"], query_copy)
    victim = next(d for d in fx["lines"] if fx["split_of"][d["vid_name"]] == "val")
    with h5py.File(query_copy, "a") as qh:
        del qh[str(victim["desc_id"])]
    files["query_feats"] = str(query_copy)
    splits = {"val": str(fx["root"] / "val.jsonl")}
    with pytest.raises(TvrInputError, match=rf"query_missing\.h5: no dataset '{victim['desc_id']}'"):
        convert_tvr(str(tmp_path / "a"), splits=splits, progress=False, **files)
    m, rep = convert_tvr(str(tmp_path / "b"), splits=splits, skip_missing=True, progress=False, **files)
    assert rep.skipped_queries == [victim["desc_id"]]
    assert m.splits["val"].num_queries == sum(1 for d in fx["lines"] if fx["split_of"][d["vid_name"]] == "val") - 1
    with pytest.raises(TvrInputError, match="no split 'nope'"):
        convert_tvr(str(tmp_path / "c"), splits={"nope": splits["val"]}, progress=False, **_files(fx))


def test_cli_convert_tvr(tvr_fixture: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fx = tvr_fixture
    parser = argparse.ArgumentParser(prog="xmr data")
    register_sources(parser.add_subparsers(dest="data_command", required=True))
    f = _files(fx)
    args = parser.parse_args(["convert", "tvr", "--out", str(tmp_path), "--splits", f"val={fx['root'] / 'val.jsonl'}",
                              "--video-feats", f["video_feats"], "--sub-feats", f["sub_feats"], "--query-feats",
                              f["query_feats"], "--video2dur", f["video2dur"], "--quiet"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path}/manifest.json" in out and "tvr (vcmr): val 11" in out
    args = parser.parse_args(["convert", "tvr", "--out", str(tmp_path), "--splits", f"val={fx['root'] / 'val.jsonl'}",
                              "--video-feats", f["video_feats"], "--sub-feats", f["sub_feats"], "--query-feats",
                              f["query_feats"], "--video2dur", f["video2dur"], "--quiet"])
    assert args.func(args) == 2, "a second write without --overwrite must fail"
    assert "already exists" in capsys.readouterr().err
