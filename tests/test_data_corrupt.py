"""Bad input: corrupt/truncated shards and bad samples fail with messages naming shard and
key, or are skipped and counted (never silently dropped); bad manifests and bad samples
given to the writer fail naming the field."""

from __future__ import annotations

import copy
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import write_tiny_category, write_tiny_vcmr
from xmr.data.decode import BadSampleError
from xmr.data.manifest import LabelSpec, Manifest, ManifestError, ModalitySpec, load_manifest
from xmr.data.reader import make_loader
from xmr.data.writer import DatasetWriter, SampleError

pytestmark = pytest.mark.timeout(120)
N = 20  # samples in the train split, shards of 5


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_category(tmp_path_factory.mktemp("pristine"), splits={"train": N}, samples_per_shard=5)


@pytest.fixture
def dataset(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "ds"))


def rewrite_shard(path: Path, edit: Callable[[dict[str, bytes]], dict[str, bytes]]) -> None:
    """Rewrite a tar shard with ``edit`` applied to its {member name: bytes} (order kept)."""
    with tarfile.open(path) as t:
        members = {m.name: t.extractfile(m).read() for m in t.getmembers()}  # type: ignore[union-attr]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in edit(members).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def read_all(root: Path, on_bad_sample: str, **kw) -> tuple[list[str], int]:
    keys, skipped = [], 0
    for b in make_loader(str(root), "train", local_batch_size=4, on_bad_sample=on_bad_sample, **kw):
        keys += b["key"]
        skipped += b["n_skipped"]
    return keys, skipped


SHARD1 = "train-000001.tar"  # holds train_00005 .. train_00009


def _missing_b(m: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in m.items() if k != "train_00006.b.npy"}


def _wrong_dim(m: dict[str, bytes]) -> dict[str, bytes]:
    return dict(m, **{"train_00007.a.npy": npy(np.zeros(9, np.float16))})


def _nan(m: dict[str, bytes]) -> dict[str, bytes]:
    a = np.zeros(8, np.float16)
    a[3] = np.nan
    return dict(m, **{"train_00008.a.npy": npy(a)})


def _bad_json(m: dict[str, bytes]) -> dict[str, bytes]:
    return dict(m, **{"train_00005.json": b"{not json"})


SAMPLE_CASES = {
    "missing-key": (_missing_b, r"train-000001\.tar: sample 'train_00006': missing train_00006\.b\.npy"),
    "wrong-dim": (_wrong_dim, r"train-000001\.tar: sample 'train_00007': a\.npy has shape \[9\], manifest expects \[8\]"),
    "nan": (_nan, r"train-000001\.tar: sample 'train_00008': a\.npy has 1 NaN/Inf value"),
    "bad-json": (_bad_json, r"train-000001\.tar: sample 'train_00005': train_00005\.json is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(SAMPLE_CASES))
def test_bad_sample_errors_and_skips(dataset: Path, case: str) -> None:
    edit, message = SAMPLE_CASES[case]
    rewrite_shard(dataset / SHARD1, edit)
    with pytest.raises(BadSampleError, match=message):
        read_all(dataset, "error")
    keys, skipped = read_all(dataset, "skip", world_size=1, num_workers=2)
    assert skipped == 1 and len(keys) == N - 1 and len(set(keys)) == N - 1


def test_truncated_shard(dataset: Path) -> None:
    path = dataset / SHARD1
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    # tarfile ends quietly at a cut header, so the cut shows as a half sample or a short shard.
    with pytest.raises(BadSampleError, match=r"train-000001\.tar: (unreadable tar|shard ended|sample '\w+': missing)"):
        read_all(dataset, "error")
    keys, skipped = read_all(dataset, "skip")
    assert len(keys) + skipped == N and 1 <= skipped <= 5
    assert not {f"train_{i:05d}" for i in range(5)} - set(keys), "other shards must be read in full"


def test_truncated_at_member_boundary_is_caught_by_count(dataset: Path) -> None:
    rewrite_shard(dataset / SHARD1, lambda m: {k: v for k, v in m.items() if not k.startswith("train_00009")})
    with pytest.raises(BadSampleError, match=r"train-000001\.tar: shard ended after 4 samples .* manifest says 5"):
        read_all(dataset, "error")
    keys, skipped = read_all(dataset, "skip", world_size=1, num_workers=2)
    assert skipped == 1 and len(keys) == N - 1


def test_corrupt_tar_bytes(dataset: Path) -> None:
    path = dataset / SHARD1
    data = bytearray(path.read_bytes())
    data[0:1024] = np.random.default_rng(0).bytes(1024)  # destroy the first header
    path.write_bytes(bytes(data))
    with pytest.raises(BadSampleError, match=r"train-000001\.tar: unreadable tar after sample None"):
        read_all(dataset, "error")
    keys, skipped = read_all(dataset, "skip", mode="sample")
    assert skipped == 5 and len(keys) == N - 5


def test_missing_shard_file(dataset: Path) -> None:
    (dataset / SHARD1).unlink()
    with pytest.raises(BadSampleError, match=r"train-000001\.tar: cannot open shard"):
        read_all(dataset, "error")
    keys, skipped = read_all(dataset, "skip")
    assert skipped == 5 and len(keys) == N - 5


def test_vcmr_bad_video_skips_its_queries(tmp_path: Path) -> None:
    root = write_tiny_vcmr(tmp_path / "v", splits={"train": 8}, samples_per_shard=4)
    m = load_manifest(str(root))
    total_q = m.splits["train"].num_queries

    def wrong_visual(members: dict[str, bytes]) -> dict[str, bytes]:
        return dict(members, **{"train_00005.visual.npy": npy(np.zeros((2, 6), np.float16))})

    rewrite_shard(root / SHARD1, wrong_visual)
    meta = json.loads(next(iter(tarfile.open(root / SHARD1).extractfile("train_00005.json"))))  # type: ignore
    with pytest.raises(BadSampleError, match=r"sample 'train_00005': visual\.npy has shape \[2, 6\]"):
        list(make_loader(str(root), "train", local_batch_size=4))
    rows = skipped = 0
    for b in make_loader(str(root), "train", local_batch_size=4, on_bad_sample="skip", world_size=1, num_workers=2):
        rows += len(b["key"])
        skipped += b["n_skipped"]
    assert skipped == len(meta["queries"]) >= 1 and rows + skipped == total_q


# -- manifests ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_manifest(pristine: Path) -> dict:
    return load_manifest(str(pristine)).to_dict()


MANIFEST_CASES = [
    (lambda d: d.pop("task"), r"manifest\.task: missing"),
    (lambda d: d.update(task="audio"), r"manifest\.task: expected one of"),
    (lambda d: d.update(schema_version=2), r"manifest\.schema_version: this xmr reads 1, got 2"),
    (lambda d: d["modalities"].pop("b"), r"manifest\.modalities: task 'category' needs roles \['a', 'b'\]"),
    (lambda d: d["modalities"]["a"].update(dtype="int8"), r"manifest\.modalities\.a\.dtype: expected one of"),
    (lambda d: d["modalities"]["b"].update(shape=[2, 0]), r"manifest\.modalities\.b\.shape\[1\]: expected an int >= 1"),
    (lambda d: d["labels"].update(num_classes=[4, 2]), r"manifest\.labels\.num_classes: kind 'single' needs 1"),
    (lambda d: d["splits"]["train"]["shards"][2].update(sha256="abc"),
     r"manifest\.splits\.train\.shards\[2\]\.sha256: expected 64 lowercase hex"),
    (lambda d: d["splits"]["train"].update(num_samples=21), r"manifest\.splits\.train\.num_samples: 21 != sum over shards 20"),
    (lambda d: d["splits"]["train"]["shards"][0].update(path="../x.tar"), r"shards\[0\]\.path: must be relative"),
    (lambda d: d.update(clip_len=1.5), r"manifest\.clip_len: only vcmr datasets"),
]


@pytest.mark.parametrize("i", range(len(MANIFEST_CASES)))
def test_manifest_validation_names_the_field(good_manifest: dict, i: int) -> None:
    edit, message = MANIFEST_CASES[i]
    d = copy.deepcopy(good_manifest)
    edit(d)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(d)
    assert Manifest.from_dict(copy.deepcopy(good_manifest)).to_dict() == good_manifest


def test_broken_manifest_file_names_the_path(dataset: Path) -> None:
    (dataset / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match=r"ds/manifest\.json: not valid JSON"):
        load_manifest(str(dataset))
    with pytest.raises(FileNotFoundError, match=r"nowhere/manifest\.json: no manifest\.json"):
        load_manifest(str(dataset / "nowhere"))


# -- the writer -----------------------------------------------------------------------


def _writer(root: Path, kind: str = "single") -> DatasetWriter:
    return DatasetWriter(str(root), name="w", task="category",
                         modalities={"a": ModalitySpec("x", [4], "float16"), "b": ModalitySpec("y", [2], "float32")},
                         labels=LabelSpec(kind, [3] if kind != "hierarchical" else [2, 3]), source={"kind": "t"})


WRITER_CASES = [
    ({"a": np.zeros(5), "b": np.zeros(2)}, {"label": 0}, r"sample 'k': a has shape \[5\], manifest expects \[4\]"),
    ({"a": np.zeros(4), "b": np.array([0.0, np.inf])}, {"label": 0}, r"sample 'k': b has 1 NaN/Inf"),
    ({"a": np.full(4, 1e6), "b": np.zeros(2)}, {"label": 0}, r"sample 'k': a has 4 NaN/Inf value\(s\) \(as float16\)"),
    ({"a": np.zeros(4, np.int32), "b": np.zeros(2)}, {"label": 0}, r"sample 'k': a must be floating point"),
    ({"a": np.zeros(4)}, {"label": 0}, r"sample 'k': category samples need arrays 'a' and 'b'"),
    ({"a": np.zeros(4), "b": np.zeros(2)}, {"label": 3}, r"sample 'k': meta\.label must be an int in \[0, 3\)"),
    ({"a": np.zeros(4), "b": np.zeros(2)}, {"label": 0, "x": object()}, r"sample 'k': meta is not plain JSON"),
]


@pytest.mark.parametrize("i", range(len(WRITER_CASES)))
def test_writer_rejects_bad_samples(tmp_path: Path, i: int) -> None:
    arrays, meta, message = WRITER_CASES[i]
    with _writer(tmp_path).split("train") as s:
        with pytest.raises(SampleError, match=message):
            s.write("k", arrays, meta)
        s.write("ok", {"a": np.zeros(4), "b": np.zeros(2)}, {"label": 1})


def test_writer_rejects_bad_keys_and_indices(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    s = w.split("train")
    with pytest.raises(SampleError, match=r"key 'a\.b' must match"):
        s.write("a.b", {"a": np.zeros(4), "b": np.zeros(2)}, {"label": 0})
    s.write("k0", {"a": np.zeros(4), "b": np.zeros(2)}, {"label": 0, "index": 0})
    with pytest.raises(SampleError, match=r"sample 'k0': duplicate key"):
        s.write("k0", {"a": np.zeros(4), "b": np.zeros(2)}, {"label": 0})
    s.write("k1", {"a": np.zeros(4), "b": np.zeros(2)}, {"label": 0, "index": 5})
    with pytest.raises(SampleError, match=r"w/train: meta\.index values must be 0\.\.1 exactly once"):
        s.close()
    with pytest.raises(ValueError, match="already written"):
        w.split("train")
