"""digits_views (sklearn's real digits cut into two views) builds small, labelled, disjoint
splits whose views are the image's halves; synth vcmr's type_cue weakens what a query's
words say about its type."""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from xmr.data.manifest import load_manifest
from xmr.data.sources.cli import register_sources
from xmr.data.sources.digits_views import DigitsViewsConfig, generate_digits_views, split_views, write_digits_views
from xmr.data.sources.synth_vcmr import SynthVcmrConfig, generate_vcmr, planted_maps


def _ids(root: Path, split_shards) -> set[str]:
    out = set()
    for s in split_shards:
        with tarfile.open(root / s.path) as t:
            out |= {json.loads(t.extractfile(n).read())["id"] for n in t.getnames() if n.endswith(".json")}
    return out


def test_small_build_is_labelled_disjoint_and_halves_the_image(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    cfg = DigitsViewsConfig(train_per_class=5, val_per_class=3, test_per_class=4, seed=1)
    m = write_digits_views(str(tmp_path / "dv"), cfg)
    assert m.task == "category" and m.labels.kind == "single" and m.labels.num_classes == [10]
    assert {k: s.num_samples for k, s in m.splits.items()} == {"train": 50, "val": 30, "test": 40}
    assert m.modalities["a"].shape == [32] and m.modalities["b"].shape == [32]
    assert m.source["kind"] == "digits-views" and "load_digits" in m.source["details"]["from"]
    ids = {k: _ids(tmp_path / "dv", s.shards) for k, s in m.splits.items()}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    images = load_digits().data.astype(np.float32) / 16.0
    rows, a, b, labels = generate_digits_views(cfg)["test"]
    grid = np.concatenate([a.reshape(-1, 8, 4), b.reshape(-1, 8, 4)], axis=2)  # left | right
    np.testing.assert_array_equal(grid.reshape(-1, 64), images[rows])
    assert np.bincount(labels, minlength=10).tolist() == [4] * 10


def test_val_and_test_do_not_move_with_the_training_size() -> None:
    small = generate_digits_views(DigitsViewsConfig(train_per_class=10))
    full = generate_digits_views(DigitsViewsConfig(train_per_class=None))
    for split in ("val", "test"):
        np.testing.assert_array_equal(small[split][0], full[split][0])
    assert set(small["train"][0]) < set(full["train"][0]) and len(full["train"][0]) >= 940


def test_top_bottom_views_and_field_named_errors() -> None:
    x = np.arange(64, dtype=np.float32)[None]
    a, b = split_views(x, "top_bottom")
    assert a[0].tolist() == list(range(32)) and b[0].tolist() == list(range(32, 64))
    with pytest.raises(ValueError, match="views"):
        DigitsViewsConfig(views="diagonal").validate()
    with pytest.raises(ValueError, match="train_per_class"):
        DigitsViewsConfig(train_per_class=100, val_per_class=30, test_per_class=50).validate()


def test_cli_builds_digits_views(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser(prog="xmr data")
    register_sources(parser.add_subparsers(dest="data_command", required=True))
    a = parser.parse_args(["digits-views", "--out", str(tmp_path / "d"), "--train-per-class", "3",
                           "--views", "top_bottom", "--quiet"])
    assert a.func(a) == 0
    m = load_manifest(str(tmp_path / "d"))
    assert m.splits["train"].num_samples == 30 and m.modalities["a"].name == "digit_top"
    assert "digits-views (category)" in capsys.readouterr().out


def _vocab_share(cfg: SynthVcmrConfig) -> dict[str, float]:
    """Per type, the mean share of a query's tokens nearer the visual vocabulary's offset."""
    maps, offsets = planted_maps(cfg)
    shares: dict[str, list[float]] = {"v": [], "t": [], "vt": []}
    for v in generate_vcmr(cfg).videos["train"]:
        tokens, start = v.arrays["query_tokens"], 0
        for q in v.meta["queries"]:
            t = tokens[start:start + q["n_tokens"]]
            start += q["n_tokens"]
            nearer_v = np.linalg.norm(t - offsets["query_v"], axis=1) < np.linalg.norm(t - offsets["query_t"], axis=1)
            shares[q["type"]].append(float(nearer_v.mean()))
    return {k: float(np.mean(x)) for k, x in shares.items() if x}


def test_type_cue_mixes_a_single_stream_querys_vocabularies() -> None:
    base = dict(splits={"train": 40}, max_duration=30.0, query_offset_scale=4.0, seed=3)
    plain, weak = _vocab_share(SynthVcmrConfig(**base)), _vocab_share(SynthVcmrConfig(**base, type_cue=0.0))
    assert plain["v"] > 0.9 and plain["t"] < 0.1  # at 1 the words name the stream
    assert 0.3 < plain["vt"] < 0.7 and 0.3 < weak["vt"] < 0.7  # a vt query alternates, whatever the cue
    assert 0.3 < weak["v"] < 0.7 and 0.3 < weak["t"] < 0.7  # at 0 either vocabulary alike
    with pytest.raises(ValueError, match="type_cue"):
        SynthVcmrConfig(type_cue=1.5).validate()
