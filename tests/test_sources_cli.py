"""``xmr data synth|convert`` through the argparse wiring that ``xmr.data.cli`` uses."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from xmr.data.manifest import load_manifest
from xmr.data.sources.cli import register_sources

pytestmark = pytest.mark.timeout(60)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="xmr data")
    register_sources(parser.add_subparsers(dest="data_command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_synth_category_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cat"
    assert _run(["synth", "category", "--out", str(out), "--splits", "train=30", "test=10", "--n-classes", "6",
                 "--hierarchy", "2", "--seq-len-b", "4", "--dim-b", "8", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}/manifest.json" in printed
    assert "synth-category (category): train 30 in 1 shard(s), test 10" in printed
    m = load_manifest(str(out))
    assert m.labels.kind == "hierarchical" and m.labels.num_classes == [2, 6] and m.modalities["b"].shape == [4, 8]
    assert m.source["details"]["hierarchy"] == 2


def test_synth_vcmr_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "vcmr"
    assert _run(["synth", "vcmr", "--out", str(out), "--splits", "train=5,val=3", "--max-queries", "2",
                 "--dim-visual", "12", "--quiet"]) == 0
    assert "synth-vcmr (vcmr): train 5 (" in capsys.readouterr().out
    m = load_manifest(str(out))
    assert m.modalities["visual"].shape == [12] and m.splits["val"].num_samples == 3
    assert 5 <= m.splits["train"].num_queries <= 10


def test_convert_features_with_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "f.npz", ia=rng.normal(size=(20, 3)), ta=rng.normal(size=(20, 2)), la=np.arange(20) % 2,
             I_te=rng.normal(size=(6, 3)), T_te=rng.normal(size=(6, 2)), L_te=np.arange(6) % 2)
    out = tmp_path / "out"
    assert _run(["convert", "features", str(tmp_path / "f.npz"), "--out", str(out), "--keys",
                 "a_train=ia,b_train=ta,label_train=la", "--val-fraction", "0.2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "labels int, 0-based, 2 classes" in printed
    assert load_manifest(str(out)).splits["val"].num_samples == 4


def test_errors_are_one_line_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    np.savez(tmp_path / "f.npz", x=np.zeros((3, 2)))
    assert _run(["convert", "features", str(tmp_path / "f.npz"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xmr data convert: error:") and "cannot find" in err and "'x'" in err
    assert _run(["synth", "category", "--out", str(tmp_path / "c"), "--hierarchy", "3", "--quiet"]) == 2
    assert "hierarchy" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--splits: expected NAME=VALUE"):
        _run(["synth", "vcmr", "--out", str(tmp_path / "v"), "--splits", "train"])


def test_source_options_come_from_their_configs_without_restated_defaults():
    """Every ``xmr data synth|avdigits`` option that is a config field is generated from the
    dataclass: absent unless given (the dataclass applies its own default), its help stating
    that default."""
    import argparse
    import dataclasses

    from xmr.cli import build_parser
    from xmr.data.sources.configs import AvdigitsConfig, SynthCategoryConfig, SynthVcmrConfig, TvrReleaseConfig

    def sub(parser, *path):
        for name in path:
            action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            parser = action.choices[name]
        return parser

    root = build_parser()
    for path, config in [(("data", "synth", "category"), SynthCategoryConfig), (("data", "synth", "vcmr"), SynthVcmrConfig),
                         (("data", "synth", "tvr-release"), TvrReleaseConfig), (("data", "avdigits"), AvdigitsConfig)]:
        fields = {f.name for f in dataclasses.fields(config)}
        generated = [a for a in sub(root, *path)._actions if a.dest in fields]
        assert generated, path
        restated = [a.dest for a in generated if a.default is not argparse.SUPPRESS]
        assert restated == [], (path, restated)
        assert all("(default: " in a.help for a in generated), path
    ns = build_parser().parse_args(["data", "synth", "category", "--out", "x", "--n-classes", "4"])
    from xmr.data.sources.options import given

    assert SynthCategoryConfig(**given(ns, SynthCategoryConfig)) == SynthCategoryConfig(n_classes=4)
