"""Feature-matrix converter on .npz, .mat (v5 and v7.3/HDF5) and .h5 fixtures made here."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from xmr.data.sources.features import FeatureInputError, convert_features, load_arrays, stratified_split

pytestmark = pytest.mark.timeout(60)

N_TR, N_TE, C, DA, DB = 40, 12, 4, 6, 5


def _data(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"I_tr": rng.normal(size=(N_TR, DA)), "T_tr": rng.normal(size=(N_TR, DB)),
            "I_te": rng.normal(size=(N_TE, DA)), "T_te": rng.normal(size=(N_TE, DB)),
            "L_tr": np.arange(N_TR) % C, "L_te": np.arange(N_TE) % C}


def _read(root: Path, m, split: str) -> list[dict]:
    samples: dict[str, dict] = {}
    for shard in m.splits[split].shards:
        with tarfile.open(root / shard.path) as t:
            for mem in t.getmembers():
                key, rest = mem.name.split(".", 1)
                data = t.extractfile(mem).read()
                samples.setdefault(key, {})[rest] = json.loads(data) if rest == "json" else np.load(io.BytesIO(data))
    return [samples[k] for k in sorted(samples, key=lambda k: samples[k]["json"]["index"])]


def _write_mat73(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A MATLAB v7.3 file: HDF5 after a 512-byte MAT header, matrices stored column-major."""
    import h5py

    with h5py.File(path, "w", userblock_size=512) as f:
        for k, v in arrays.items():
            f[k] = np.asarray(v, dtype=np.float64).reshape(v.shape[0], -1).T    # MATLAB [N, D] -> HDF5 [D, N]
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM" + b"\x00" * (512 - 128))


@pytest.mark.parametrize("fmt", ["npz", "mat5", "mat73", "h5"])
def test_each_format_round_trips(fmt: str, tmp_path: Path) -> None:
    import h5py
    import scipy.io

    d = _data()
    if fmt == "npz":
        path = tmp_path / "bench.npz"
        np.savez(path, **d)
    elif fmt == "mat5":
        path = tmp_path / "bench.mat"
        scipy.io.savemat(path, {k: (v + 1 if k.startswith("L") else v) for k, v in d.items()})   # 1-based labels
    elif fmt == "mat73":
        path = tmp_path / "bench.mat"
        _write_mat73(path, {k: (v + 1 if k.startswith("L") else v) for k, v in d.items()})
    else:
        path = tmp_path / "bench.h5"
        with h5py.File(path, "w") as f:
            for k, v in d.items():
                f[k] = v
    assert load_arrays(path)["I_tr"].shape == (N_TR, DA)
    out = tmp_path / "out"
    m, rep = convert_features(str(path), str(out), dtype="float32", progress=False)
    assert rep.keys["a_train"] == "I_tr" and rep.keys["label_test"] == "L_te"
    assert rep.label_format == "int" and rep.label_base == (1 if fmt.startswith("mat") else 0)
    assert m.labels.num_classes == [C] and m.modalities["a"].shape == [DA] and m.modalities["b"].shape == [DB]
    test = _read(out, m, "test")
    assert len(test) == N_TE
    for i, s in enumerate(test):
        assert np.allclose(s["a.npy"], d["I_te"][i]) and np.allclose(s["b.npy"], d["T_te"][i])
        assert s["json"]["label"] == d["L_te"][i]


def test_one_hot_multi_hot_and_val_fraction(tmp_path: Path) -> None:
    d = _data()
    one_hot = {**d, "L_tr": np.eye(C)[d["L_tr"]], "L_te": np.eye(C)[d["L_te"]]}
    np.savez(tmp_path / "oh.npz", **one_hot)
    m, rep = convert_features(str(tmp_path / "oh.npz"), str(tmp_path / "oh"), val_fraction=0.25, seed=3,
                              progress=False)
    assert rep.label_format == "one-hot" and m.labels.kind == "single"
    assert m.splits["val"].num_samples == 12 and m.splits["train"].num_samples == 28
    val_labels = [s["json"]["label"] for s in _read(tmp_path / "oh", m, "val")]
    assert sorted(np.bincount(val_labels, minlength=C).tolist()) == [3, 3, 3, 3], "stratified carve"
    multi = one_hot["L_tr"].copy()
    rows = np.arange(0, N_TR, 3)
    multi[rows, (d["L_tr"][rows] + 1) % C] = 1          # every third sample gets a second label
    np.savez(tmp_path / "mh.npz", **{**one_hot, "L_tr": multi})
    m, rep = convert_features(str(tmp_path / "mh.npz"), str(tmp_path / "mh"), progress=False)
    assert rep.label_format == "multi-hot" and m.labels.kind == "multi"
    first = _read(tmp_path / "mh", m, "train")[0]["json"]
    assert first["label_set"] == sorted(np.nonzero(multi[0])[0].tolist()) and len(first["label_set"]) == 2


def test_keys_option_and_autodetect_errors(tmp_path: Path) -> None:
    d = _data()
    renamed = {"img_feats_a": d["I_tr"], "txt_feats_a": d["T_tr"], "lab_a": d["L_tr"],
               "test_img": d["I_te"], "test_txt": d["T_te"], "test_labels": d["L_te"]}
    np.savez(tmp_path / "r.npz", **renamed)
    with pytest.raises(FeatureInputError, match=r"cannot find \['a_train', 'b_train', 'label_train'\]"):
        convert_features(str(tmp_path / "r.npz"), str(tmp_path / "x"), progress=False)
    m, rep = convert_features(str(tmp_path / "r.npz"), str(tmp_path / "ok"), progress=False,
                              keys={"a_train": "img_feats_a", "b_train": "txt_feats_a", "label_train": "lab_a"})
    assert rep.keys["a_test"] == "test_img" and m.splits["train"].num_samples == N_TR
    np.savez(tmp_path / "amb.npz", **d, img_train=d["I_tr"])
    with pytest.raises(FeatureInputError, match="a_train is ambiguous"):
        convert_features(str(tmp_path / "amb.npz"), str(tmp_path / "y"), progress=False)
    np.savez(tmp_path / "bad.npz", **{**d, "T_tr": d["T_tr"][:-1]})
    with pytest.raises(FeatureInputError, match="I_tr has 40 rows but T_tr has 39"):
        convert_features(str(tmp_path / "bad.npz"), str(tmp_path / "z"), progress=False)
    with pytest.raises(FeatureInputError, match="no array 'nope' for a_train"):
        convert_features(str(tmp_path / "bad.npz"), str(tmp_path / "z"), keys={"a_train": "nope"}, progress=False)


def test_stratified_split_is_seeded_and_complete() -> None:
    labels = np.repeat(np.arange(5), 20)
    a = stratified_split(labels, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=1)
    b = stratified_split(labels, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(100))
    assert np.bincount(labels[a["val"]]).tolist() == [3] * 5
