"""``xmr data synth tvr-release`` writes the public TVR release's layout (annotation jsonl,
video2dur json, visual / subtitle (+ ``-mask``) / query-token HDF5) at the given sizes and
dimensions, with the real validation queries when given the real annotations; and
``xmr data convert tvr`` reads it back into shards (small sizes here; the full size is
bench/tvr_scale.py's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import needs_tvr

from xmr.data.manifest import load_manifest
from xmr.data.reader import make_loader
from xmr.data.tvr_annotations import read_tvr_jsonl

pytestmark = [pytest.mark.timeout(180), needs_tvr]


def xmr(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "xmr.cli", *args], capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def release(tmp_path_factory, shared_dir: Path):
    root = tmp_path_factory.mktemp("release")
    tvr = shared_dir / "data" / "tvr"
    out = xmr("data", "synth", "tvr-release", "--out", str(root / "rel"), "--splits", "train=12", "val=8",
              "--annotations", str(tvr / "tvr_val_release.jsonl"), "--video2dur", str(tvr / "tvr_video2dur_idx.json"),
              "--dim-visual", "48", "--dim-subtitle", "16", "--dim-query", "16", "--quiet")
    return root, out, tvr


def test_release_files_have_the_public_layout(release):
    root, out, tvr = release
    rel = root / "rel"
    v2d = json.loads((rel / "tvr_video2dur_idx.json").read_text())
    real_v2d = json.loads((tvr / "tvr_video2dur_idx.json").read_text())
    assert {s: len(v) for s, v in v2d.items()} == {"train": 12, "val": 8}
    for split in ("train", "val"):  # the real videos, in index order, with their durations
        for vid, (duration, index) in v2d[split].items():
            assert real_v2d[split][vid] == [duration, index]
    real = {a["desc_id"]: a for a in read_tvr_jsonl(tvr / "tvr_val_release.jsonl") if a["vid_name"] in v2d["val"]}
    val = read_tvr_jsonl(rel / "tvr_val_release.jsonl")
    assert {a["desc_id"] for a in val} == set(real)  # every real query of those videos, nothing else
    for a in val:
        assert (a["desc"], a["type"], a["vid_name"]) == (real[a["desc_id"]]["desc"], real[a["desc_id"]]["type"],
                                                         real[a["desc_id"]]["vid_name"])
    train = read_tvr_jsonl(rel / "tvr_train_release.jsonl")
    assert {a["vid_name"] for a in train} == set(v2d["train"])
    assert all(0 <= a["ts"][0] <= a["ts"][1] <= a["duration"] for a in train)
    assert not {a["desc_id"] for a in train} & set(real)
    with h5py.File(rel / "tvr_visual_cl-1.5.h5") as vh5, h5py.File(rel / "tvr_sub_cl-1.5.h5") as sh5, \
            h5py.File(rel / "tvr_query.h5") as qh5:
        for split in ("train", "val"):
            for vid, (duration, _) in v2d[split].items():
                n = max(1, int(np.ceil(duration / 1.5)))
                assert vh5[vid].shape == (n, 48) and vh5[vid].dtype == np.float16
                assert sh5[vid].shape == (n, 16) and sh5[f"{vid}-mask"].shape == (n,)
                assert not np.abs(np.asarray(sh5[vid])[np.asarray(sh5[f"{vid}-mask"]) == 0]).any()
        for a in val + train:
            tokens = qh5[str(a["desc_id"])]
            assert tokens.shape[1] == 16 and 1 <= tokens.shape[0] <= 30
    assert "xmr data convert tvr" in (rel / "README.txt").read_text() and "convert with:" in out


def test_convert_tvr_reads_it_back(release, tmp_path):
    root, _, _ = release
    rel = root / "rel"
    out = xmr("data", "convert", "tvr", "--out", str(tmp_path / "shards"), "--quiet",
              "--splits", f"train={rel / 'tvr_train_release.jsonl'}", f"val={rel / 'tvr_val_release.jsonl'}",
              "--video-feats", str(rel / "tvr_visual_cl-1.5.h5"), "--sub-feats", str(rel / "tvr_sub_cl-1.5.h5"),
              "--query-feats", str(rel / "tvr_query.h5"), "--video2dur", str(rel / "tvr_video2dur_idx.json"))
    assert "skipped videos 0, queries 0" in out and "peak memory" in out and "converted in" in out
    m = load_manifest(str(tmp_path / "shards"))
    n_val = len(read_tvr_jsonl(rel / "tvr_val_release.jsonl"))
    assert m.splits["train"].num_samples == 12 and m.splits["val"].num_samples == 8
    assert m.splits["val"].num_queries == n_val
    assert m.modalities["visual"].shape == [48] and m.modalities["query"].shape == [16]
    batch = next(iter(make_loader(str(tmp_path / "shards"), "val", local_batch_size=4, shuffle=False, unit="query")))
    assert batch["q_tokens"].shape[-1] == 16 and batch["visual"].shape[-1] == 48
