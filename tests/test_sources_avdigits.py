"""avdigits: the committed dataset verifies, a small build works where espeak-ng is installed,
and a missing espeak-ng fails with an install hint."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from xmr.data.manifest import load_manifest
from xmr.data.sources.avdigits import AvdigitsConfig, build_avdigits, place_in_window
from xmr.data.sources.cli import register_sources

pytestmark = pytest.mark.timeout(120)

COMMITTED = Path(__file__).resolve().parents[1] / "data" / "avdigits"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xmr data")
    register_sources(parser.add_subparsers(dest="data_command", required=True))
    return parser


def test_committed_dataset_matches_its_manifest() -> None:
    m = load_manifest(str(COMMITTED))
    assert m.name == "avdigits" and m.task == "category" and m.labels.num_classes == [10]
    assert m.modalities["a"].shape == [64] and m.modalities["b"].shape == [32, 40]
    assert set(m.splits) == {"train", "val", "test"}
    total = 0
    for split in m.splits.values():
        for s in split.shards:
            data = (COMMITTED / s.path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == s.sha256, s.path
            assert len(data) == s.bytes
            total += len(data)
    assert total < 6_000_000, f"committed avdigits is {total} bytes; keep it a few MB"
    details = m.source["details"]
    assert details["espeak_ng_version"].startswith("eSpeak NG") and details["voices"] and details["mel"]["n_mels"] == 40
    ids: dict[str, set[str]] = {}
    for name, split in m.splits.items():
        for s in split.shards:
            with tarfile.open(COMMITTED / s.path) as t:
                ids[name] = ids.get(name, set()) | {json.loads(t.extractfile(n).read())["id"]
                                                    for n in t.getnames() if n.endswith(".json")}
    assert sum(len(v) for v in ids.values()) == sum(sp.num_samples for sp in m.splits.values())
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["val"], "splits must not share images"


def _labels(path: Path) -> list[int]:
    with tarfile.open(path) as t:
        return [json.loads(t.extractfile(n).read())["label"] for n in t.getnames() if n.endswith(".json")]


def test_small_build_is_deterministic_and_labelled(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two builds of 40 samples (the CLI's and the library's): espeak-ng runs once per
    sample, about 2-2.5 s a build under load (100 samples took 5-7 s); 40 gives two per
    digit in train and one in each of val and test (30, the least ``AvdigitsConfig.validate``
    allows, leaves val empty with the default fractions and fails)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed: apt-get install espeak-ng (make setup does this)")
    parser = _parser()
    args = parser.parse_args(["avdigits", "--out", str(tmp_path / "one"), "--limit", "40", "--quiet"])
    assert args.func(args) == 0
    assert "avdigits (category): train 20" in capsys.readouterr().out
    m1 = load_manifest(str(tmp_path / "one"))
    m2 = build_avdigits(str(tmp_path / "two"), AvdigitsConfig(limit=40), progress=False)
    assert [s.sha256 for s in m1.splits["train"].shards] == [s.sha256 for s in m2.splits["train"].shards]
    assert np.bincount(_labels(tmp_path / "one" / m1.splits["train"].shards[0].path)).tolist() == [2] * 10
    test_shard = tmp_path / "one" / m1.splits["test"].shards[0].path
    labels = _labels(test_shard)
    with tarfile.open(test_shard) as t:
        names = t.getnames()
        audio = np.load(io.BytesIO(t.extractfile(next(n for n in names if n.endswith(".b.npy"))).read()))
        image = np.load(io.BytesIO(t.extractfile(next(n for n in names if n.endswith(".a.npy"))).read()))
    assert sorted(set(labels)) == list(range(10)) and np.bincount(labels).tolist() == [1] * 10
    assert audio.shape == (32, 40) and audio.dtype == np.float16 and np.isfinite(audio).all()
    assert image.shape == (64,) and 0 <= image.min() and image.max() <= 1
    assert audio.std() > 0.5, "speech plus noise must not be a flat spectrogram"


def test_missing_espeak_fails_with_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))            # an empty directory: no espeak-ng on PATH
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        build_avdigits(str(tmp_path / "out"), AvdigitsConfig(limit=30), progress=False)
    args = _parser().parse_args(["avdigits", "--out", str(tmp_path / "out"), "--quiet"])
    assert args.func(args) == 2
    assert "espeak-ng not installed" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_place_in_window_pads_and_crops() -> None:
    rng = np.random.default_rng(0)
    x = np.ones(10, np.float32)
    y = place_in_window(x, 25, rng)
    assert y.shape == (25,) and y.sum() == 10
    assert np.array_equal(place_in_window(np.arange(30, dtype=np.float32), 10, rng), np.arange(10, 20))
